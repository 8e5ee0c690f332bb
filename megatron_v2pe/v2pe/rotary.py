"""V2PE rotary position embedding: real-valued per-token positions -> rotary angles -> rotated q/k.

Positions are data (built on the host in float64, see ``positions.py``), so the module takes positions
rather than a sequence length. Angles are computed in float64 and reduced modulo 2π before the cast to
float32: a float32 ``p * inv_freq`` is off by ~0.06 rad near p = 1e6 and by > 0.01 rad near 2^22, while
the reduced float64 angle is within ~4e-7 rad of the exact value at any position.

``DynamicNTK`` is InternLM2's ``rope_scaling: {type: dynamic}``: a sequence of L > max_positions tokens
rotates with the base θ·(f·L/max_positions − (f − 1))^(d/(d−2)), every sequence of a pack with its own L.
It only describes δ = 1 inference of a released model; V2PE runs use plain RoPE (the paper drops it), so
the trainer never turns it on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

TWO_PI = 2.0 * math.pi


def inverse_frequencies(rotary_dim: int, base: float) -> Tensor:
    """θ^(-2j/d) for j = 0 … d/2-1, in float64."""
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary dimension must be a positive even number, got {rotary_dim}")
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    return base ** (-exponents)


def rotary_angles(positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Angles [s, b, 1, d] (float32, in [0, 2π)) for positions [b, s] (or [s] for one sequence).

    The last dimension repeats the d/2 frequencies twice: the rotate-half (GPT-NeoX) layout.
    """
    if positions.dim() == 1:
        positions = positions.unsqueeze(0)
    if positions.dim() != 2:
        raise ValueError(f"positions must be [b, s] or [s], got shape {tuple(positions.shape)}")
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq.to(positions.device)
    angles = torch.remainder(angles, TWO_PI).to(torch.float32)
    angles = torch.cat((angles, angles), dim=-1)  # [b, s, d]
    return angles.transpose(0, 1).unsqueeze(2).contiguous()  # [s, b, 1, d]


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate the first ``angles.shape[-1]`` channels of x [s, b, h, hd] by per-token angles [s, b, 1, d].

    Channels past d (rotary_percent < 1) pass through unchanged. cos/sin are taken in float32 and cast
    to x's dtype, as Megatron-Core does for its own rope.
    """
    rot_dim = angles.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    cos = torch.cos(angles).to(x.dtype)
    sin = torch.sin(angles).to(x.dtype)
    rotated = x_rot * cos + _rotate_half(x_rot) * sin
    return torch.cat((rotated, x_pass), dim=-1) if x_pass.numel() else rotated


@dataclass(frozen=True)
class DynamicNTK:
    """InternLM2's dynamic NTK scaling: ``factor`` f and the trained window ``max_positions``."""

    factor: float
    max_positions: int

    def __post_init__(self) -> None:
        if not (self.factor >= 1 and self.max_positions >= 1):
            raise ValueError(
                f"dynamic NTK needs factor >= 1 and max_positions >= 1, got {self.factor}, "
                f"{self.max_positions}"
            )

    def inverse_frequencies(self, base: float, lengths: Tensor, rotary_dim: int) -> Tensor:
        """θ'^(-2j/d) [..., d/2] in float64 for sequences of ``lengths`` tokens [...]: θ' = θ up to
        max_positions, θ·(f·L/M − (f − 1))^(d/(d−2)) past it."""
        lengths = lengths.to(torch.float64)
        stretch = self.factor * lengths / self.max_positions - (self.factor - 1)
        scaled = base * stretch.clamp(min=1) ** (rotary_dim / (rotary_dim - 2))
        bases = torch.where(lengths > self.max_positions, scaled, torch.full_like(lengths, base))
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=lengths.device) / rotary_dim
        return bases.unsqueeze(-1) ** -exponents


def sequence_lengths(positions: Tensor, cu_seqlens: Tensor, group=None) -> Tensor:
    """Per token of a packed [1, t] batch, its sub-sample's largest position + 1: the length dynamic NTK
    scales by. Under context parallelism (``group``) every sub-sample is split over the ranks, so the
    local boundaries are ``cu_seqlens // world`` and the maxima are reduced over the group."""
    world = 1 if group is None else torch.distributed.get_world_size(group)
    flat = positions.reshape(-1).to(torch.float64)
    bounds = (cu_seqlens.to(flat.device).long() // world)[1:]
    token = torch.arange(flat.numel(), device=flat.device)
    segment = torch.searchsorted(bounds, token, right=True).clamp_(max=bounds.numel() - 1)
    longest = torch.full((bounds.numel(),), -1.0, dtype=torch.float64, device=flat.device)
    longest = longest.scatter_reduce(0, segment, flat, "amax")
    if world > 1:
        torch.distributed.all_reduce(longest, op=torch.distributed.ReduceOp.MAX, group=group)
    return (longest.floor() + 1)[segment].reshape(positions.shape)


class V2PERotaryEmbedding(nn.Module):
    """Maps per-token V2PE positions to rotary angles [s, b, 1, d].

    Args:
        kv_channels: attention head dimension.
        rotary_percent: fraction of the head dimension that is rotated.
        rotary_base: θ (1e6 for InternLM2).
        dynamic_ntk: scale θ for sequences past the trained window (δ = 1 inference of a release). The
            length of a token's sequence is given per token (``sequence_lengths`` for packed batches) or
            taken as each row's largest position + 1. For a prompt that is InternLM2's L; for a decoding
            step's one token (position p) it is p + 1, InternLM2's cache length, so each new key is
            rotated with the base of the length so far, as InternLM2's cache does.
    """

    def __init__(
        self,
        kv_channels: int,
        rotary_percent: float = 1.0,
        rotary_base: float = 1e6,
        dynamic_ntk: DynamicNTK | None = None,
    ):
        super().__init__()
        if not 0.0 < rotary_percent <= 1.0:
            raise ValueError(f"rotary_percent must be in (0, 1], got {rotary_percent}")
        self.rotary_dim = int(kv_channels * rotary_percent)
        # A plain attribute, not a buffer: Float16Module's .bfloat16() would cast a buffer and
        # destroy the float64 precision this module exists for.
        self.inv_freq = inverse_frequencies(self.rotary_dim, rotary_base)
        self.rotary_base = rotary_base
        self.dynamic_ntk = dynamic_ntk

    def forward(self, positions: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Angles for positions [b, s] (or [s]); ``lengths`` (like positions) only matter with dynamic NTK."""
        if self.dynamic_ntk is None or not positions.numel():
            return rotary_angles(positions, self.inv_freq)
        if lengths is None:
            lengths = positions.to(torch.float64).amax(dim=-1, keepdim=True).floor() + 1
        inv_freq = self.dynamic_ntk.inverse_frequencies(self.rotary_base, lengths, self.rotary_dim)
        return rotary_angles(positions, inv_freq)
