"""FP8 training through Transformer Engine: which recipe, and whether this machine can run it.

FP8 GEMMs run on Hopper (compute capability 9.0) and newer, through TE's FP8-aware linears and
attention (the 'te' attention backend). Recipes, as Megatron-Core names them:
``delayed`` (per-tensor scales from an amax history), ``tensorwise`` (per-tensor current scaling) and
``blockwise`` (1x128 / 128x128 block scales, Hopper's DeepSeek-style recipe). FP8 also constrains
sequence layout: every rank's share of a packed sub-sample must be a multiple of 16 tokens, which
``data.packing.padding_multiple(..., fp8=True)`` takes care of.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch

from megatron_v2pe.optional_deps import require

FP8Recipe = Literal["delayed", "tensorwise", "blockwise"]
FP8_RECIPES = get_args(FP8Recipe)
HOPPER = (9, 0)


def fp8_transformer_overrides(recipe: str | None, amax_history_len: int = 1024) -> dict[str, Any]:
    """TransformerConfig fields for FP8 with ``recipe`` (None: no FP8), after checking the machine."""
    if recipe is None:
        return {}
    if recipe not in FP8_RECIPES:
        raise ValueError(f"unknown FP8 recipe {recipe!r}; choose one of {FP8_RECIPES} (or none)")
    require("transformer_engine", f"FP8 training (recipe '{recipe}')")
    if not torch.cuda.is_available():
        raise RuntimeError("FP8 training needs a CUDA GPU (Hopper or newer); this host has none")
    capability = torch.cuda.get_device_capability()
    if capability < HOPPER:
        raise RuntimeError(
            f"FP8 training needs a Hopper (sm_90) or newer GPU; this one is sm_{capability[0]}{capability[1]} "
            f"({torch.cuda.get_device_name()}). Train in bf16 instead (fp8 recipe: none)"
        )
    overrides: dict[str, Any] = {"fp8": "e4m3" if recipe == "blockwise" else "hybrid", "fp8_recipe": recipe}
    if recipe == "delayed":
        overrides.update(fp8_amax_history_len=amax_history_len, fp8_amax_compute_algo="max")
    return overrides
