"""Inputs and references shared by the rotary kernel checks (interpreter on CPU, and CUDA)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from megatron_v2pe.v2pe.rotary import apply_rotary, inverse_frequencies, rotary_angles

THETA = 1e6


def v2pe_angles(seq: int, batch: int, rot_dim: int, device: str, offset: float = 0.0, seed: int = 0) -> Tensor:
    """Angles [seq, batch, 1, rot_dim] for fractional V2PE positions (steps of 1, 1/4 and 1/256, exact in
    float64) starting at ``offset``, each batch row its own sequence."""
    steps = np.random.default_rng(seed).choice([1.0, 0.25, 1 / 256], size=(batch, seq))
    positions = torch.from_numpy(np.cumsum(steps, axis=1) - steps[:, :1] + offset)
    return rotary_angles(positions, inverse_frequencies(rot_dim, THETA)).to(device)


def split_qkv(seq: int, batch: int, q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
              device: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Non-contiguous q [s, b, hq, hd] and k [s, b, hk, hd] laid out as a fused QKV projection leaves
    them: k (and v) are strided views into the per-group [q … q | k | v] rows; q is a view of a
    [b, s, …] buffer with its s and b strides swapped, and its heads strided (so that it is not
    contiguous even when b = 1)."""
    generator = torch.Generator().manual_seed(seed)
    per_group = q_heads // kv_heads + 2
    mixed = torch.randn(seq, batch, kv_heads, per_group * head_dim, generator=generator)
    key = mixed.to(device, dtype)[..., (per_group - 2) * head_dim : (per_group - 1) * head_dim]
    padded = torch.randn(batch, seq, q_heads, 2 * head_dim, generator=generator).to(device, dtype)
    query = padded[..., :head_dim].transpose(0, 1)
    assert not key.is_contiguous() and not query.is_contiguous()
    return query, key


def reference_rotation(x: Tensor, angles: Tensor) -> Tensor:
    """The rotation by exactly the given float32 angles, computed in float64."""
    return apply_rotary(x.double(), angles.double())
