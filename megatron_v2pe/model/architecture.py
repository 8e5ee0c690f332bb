"""Which ``VLMConfig`` fields describe the weights, and how two configurations differ in them (a checkpoint
against the model it is loaded into, a converted release against its preset)."""

from __future__ import annotations

import dataclasses

from megatron_v2pe.model.presets import VLMConfig

NOT_ARCHITECTURE = {
    "max_sequence_length", "drop_path_rate", "name", "family", "dynamic_ntk_factor", "image_format",
}  # fmt: skip
"""Config fields that do not describe the weights: training settings, the data pipeline's tiling defaults,
dynamic NTK (δ = 1 inference only; V2PE training drops it), and ``family``, which names the tensors of one
layout (InternLM2 read from the transformers layout is Llama, the same computation)."""


def config_differences(found: VLMConfig, expected: VLMConfig) -> list[str]:
    """``field: found != expected`` for every architecture field that differs."""
    differences = []

    def compare(a, b, prefix: str) -> None:
        for f in dataclasses.fields(a):
            if f.name in NOT_ARCHITECTURE:
                continue
            x, y = getattr(a, f.name), getattr(b, f.name)
            if dataclasses.is_dataclass(x):
                compare(x, y, f"{prefix}{f.name}.")
            elif x != y:
                differences.append(f"{prefix}{f.name}: {x!r} in the checkpoint, {y!r} expected")

    compare(found, expected, "")
    return differences
