"""V2PE positions for an exported Hugging Face model, so it keeps V2PE behaviour outside this code base.

transformers takes ``position_ids`` as given and feeds them to the rotary embedding, so V2PE needs only the
right (fractional) positions, plus an explicit attention mask: without one transformers reads any step
other than +1 as the start of a new packed sequence. ``generate`` extends ``position_ids`` by +1 per new
token, which is V2PE's rule (last prompt position + k). ``use_float64_rotary`` swaps the model's rotary
module for one that computes angles in float64 and reduces them mod 2π, like ours: float32 positions
collapse fractional steps at long context (README, "Positions are data").

One unpadded prompt per batch row.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from megatron_v2pe.v2pe.positions import DeltaPolicy, compute_positions, parse_delta_policy
from megatron_v2pe.v2pe.rotary import inverse_frequencies, rotary_angles

V2PE_CONFIG_KEY = "v2pe"


def _settings(model) -> dict[str, Any]:
    settings = getattr(model.config, V2PE_CONFIG_KEY, None)
    if settings is None:
        raise ValueError(
            f"{type(model).__name__}'s config has no {V2PE_CONFIG_KEY!r} section: pass delta_policy"
        )
    return settings


def v2pe_position_ids(input_ids: Tensor, img_context_token_id: int, policy: DeltaPolicy) -> Tensor:
    """Float64 V2PE positions [b, t] of prompts [b, t]: text +1, each `<IMG_CONTEXT>` slot +δ of its image."""
    rows = []
    for row in input_ids.cpu().numpy():
        visual = row == img_context_token_id
        rows.append(compute_positions(visual, policy.deltas(visual, rng=np.random.default_rng(0))))
    return torch.from_numpy(np.stack(rows)).to(input_ids.device)


def v2pe_inputs(model, input_ids: Tensor, delta_policy: str | None = None) -> dict[str, Tensor]:
    """``position_ids`` and ``attention_mask`` to pass to ``model(...)`` or ``model.generate(...)`` with
    ``input_ids``; the δ policy defaults to the one the exported config records."""
    settings = None if delta_policy is not None else _settings(model)
    policy = parse_delta_policy(delta_policy or settings["delta_policy"])
    return {
        "position_ids": v2pe_position_ids(input_ids, model.config.image_token_id, policy),
        "attention_mask": torch.ones_like(input_ids),
    }


class Float64RotaryEmbedding(nn.Module):
    """A drop-in for transformers' default rotary module: (x, position_ids) -> (cos, sin) [b, t, d],
    with the angles computed in float64 and reduced mod 2π (``v2pe.rotary``)."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.inv_freq = inverse_frequencies(head_dim, base)  # float64: not a buffer, never cast

    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        angles = rotary_angles(position_ids, self.inv_freq)[:, :, 0].transpose(0, 1)
        return torch.cos(angles).to(x.dtype), torch.sin(angles).to(x.dtype)


def use_float64_rotary(model) -> None:
    """Give the language model of a transformers InternVL (default RoPE) the float64 rotary module."""
    text = model.config.text_config
    rope = text.rope_parameters
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {rope['rope_type']!r}: V2PE uses plain RoPE")
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    model.model.language_model.rotary_emb = Float64RotaryEmbedding(head_dim, rope["rope_theta"])
