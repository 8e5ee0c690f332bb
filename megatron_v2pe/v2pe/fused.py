"""Rotating q and k with V2PE angles: the fused Triton kernel on CUDA, the unfused PyTorch path elsewhere.

This is the one place that chooses. Both paths rotate by the same float32 angles from ``rotary_angles``.
"""

from __future__ import annotations

import functools

from torch import Tensor

from megatron_v2pe.optional_deps import is_available
from megatron_v2pe.v2pe.rotary import apply_rotary


@functools.cache
def _triton_available() -> bool:
    return is_available("triton")


def uses_fused_rotary(query: Tensor) -> bool:
    """True when ``rotate_qk`` takes the fused kernel for this query: on CUDA with Triton importable."""
    return query.is_cuda and _triton_available()


def rotate_qk(query: Tensor, key: Tensor, angles: Tensor) -> tuple[Tensor, Tensor]:
    """query [s, b, hq, hd] and key [s, b, hk, hd] rotated by per-token angles [s, b, 1, d]."""
    if uses_fused_rotary(query):
        from megatron_v2pe.kernels.rotary_triton import fused_rotary_qk

        return fused_rotary_qk(query, key, angles)
    return apply_rotary(query, angles), apply_rotary(key, angles)
