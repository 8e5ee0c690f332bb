"""Fused V2PE rotary embedding in Triton: q and k rotated in one pass, forward and backward.

The unfused path (``megatron_v2pe.v2pe.rotary.apply_rotary``) runs about ten elementwise kernels per
tensor (cos, sin, casts, a negation, two concatenations, products and a sum), most of them reading
and writing the whole tensor. This kernel reads q, k and the angles once and writes the rotated q and k
once: the memory traffic of a copy plus the angles.

Angles are the float32 angles [s, b, 1, d] that ``rotary_angles`` computes once per micro-batch (float64
product, reduced modulo 2π, then cast), shared by every layer; the kernel takes their cos and sin in
registers. It therefore rotates by exactly the angles of the unfused path, with the precision that
path proves (within 1e-6 rad of the exact angle at positions up to 2^22; the kernel tests check the
rotation itself against the same bound).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Launch shape: the fastest of the sweep in benchmarks/gpu/bench_rotary_gpu.py on an H200 (forward at
# InternVL2-2B shapes, bf16: 83% of copy bandwidth at 32K tokens and 90% at 256K, against 76% and 82%
# for 32 tokens x 4 warps; benchmarks/results/2026-11-26-nvidia-h200.md).
BLOCK_TOKENS = 16  # tokens per program instance
NUM_WARPS = 8


@triton.jit
def _rotate_heads(
    src_ptr, dst_ptr, heads, src_rows, src_stride_h, dst_rows, token_mask,
    cos1, sin1, cos2, sin2,
    HALF: tl.constexpr, HALF_BLOCK: tl.constexpr, PASS: tl.constexpr, PASS_BLOCK: tl.constexpr,
):
    """Rotate every head of one block of tokens of one tensor (q or k) with the given cos/sin.

    Per head: y1 = x1·cos1 − x2·sin1 and y2 = x2·cos2 + x1·sin2 on the two halves of the rotary channels
    (rotate-half layout), computed in float32; the channels past the rotary ones are copied unchanged.
    """
    head_dim: tl.constexpr = 2 * HALF + PASS
    half = tl.arange(0, HALF_BLOCK)
    mask = token_mask[:, None] & (half < HALF)[None, :]
    rest = tl.arange(0, PASS_BLOCK)
    rest_mask = token_mask[:, None] & (rest < PASS)[None, :]
    for h in range(heads):
        src = src_ptr + src_rows[:, None] + h * src_stride_h
        dst = dst_ptr + dst_rows[:, None] + h * head_dim
        x1 = tl.load(src + half[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + half[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dst + half[None, :], (x1 * cos1 - x2 * sin1).to(dst_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF + half[None, :], (x2 * cos2 + x1 * sin2).to(dst_ptr.dtype.element_ty), mask=mask)
        if PASS > 0:
            passed = tl.load(src + 2 * HALF + rest[None, :], mask=rest_mask)
            tl.store(dst + 2 * HALF + rest[None, :], passed, mask=rest_mask)


@triton.jit
def _rotary_qk_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, angles_ptr,
    num_tokens, batch, q_heads, k_heads,
    q_stride_s, q_stride_b, q_stride_h,
    k_stride_s, k_stride_b, k_stride_h,
    angles_stride_s, angles_stride_b,
    HALF: tl.constexpr, HALF_BLOCK: tl.constexpr, PASS: tl.constexpr, PASS_BLOCK: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr, TRANSPOSE: tl.constexpr,
):
    """One program instance handles BLOCK_TOKENS consecutive tokens (s, b flattened, b fastest) and all
    of their q heads and k heads.

    Why this split: the cos/sin of a token's d angles are the only work that is not streaming; taking
    them once per token block and reusing them in registers for every q and k head (16 + 8 for
    InternVL2-2B) keeps the kernel memory bound. Inputs are read through their strides (q and k come out
    of a split of the fused QKV projection); outputs are contiguous [s, b, heads, head_dim].

    With angles a1 (first half) and a2 (second half) the forward pass computes
    y1 = x1·cos a1 − x2·sin a1, y2 = x2·cos a2 + x1·sin a2. TRANSPOSE applies the transposed map,
    g1·cos a1 + g2·sin a2 and g2·cos a2 − g1·sin a1: the backward pass, which for the rotate-half
    layout (a1 = a2) is the rotation by −angle.
    """
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    token_mask = tokens < num_tokens
    s = tokens // batch
    b = tokens % batch

    half = tl.arange(0, HALF_BLOCK)
    angle_mask = token_mask[:, None] & (half < HALF)[None, :]
    angles = angles_ptr + (s * angles_stride_s + b * angles_stride_b)[:, None] + half[None, :]
    a1 = tl.load(angles, mask=angle_mask, other=0.0)
    a2 = tl.load(angles + HALF, mask=angle_mask, other=0.0)
    cos1 = tl.cos(a1)
    cos2 = tl.cos(a2)
    if TRANSPOSE:
        sin1 = -tl.sin(a2)
        sin2 = -tl.sin(a1)
    else:
        sin1 = tl.sin(a1)
        sin2 = tl.sin(a2)

    head_dim: tl.constexpr = 2 * HALF + PASS
    _rotate_heads(q_ptr, q_out_ptr, q_heads, s * q_stride_s + b * q_stride_b, q_stride_h,
                  tokens * (q_heads * head_dim), token_mask, cos1, sin1, cos2, sin2,
                  HALF, HALF_BLOCK, PASS, PASS_BLOCK)
    _rotate_heads(k_ptr, k_out_ptr, k_heads, s * k_stride_s + b * k_stride_b, k_stride_h,
                  tokens * (k_heads * head_dim), token_mask, cos1, sin1, cos2, sin2,
                  HALF, HALF_BLOCK, PASS, PASS_BLOCK)


def _check_inputs(query: Tensor, key: Tensor, angles: Tensor) -> None:
    if query.dim() != 4 or key.dim() != 4 or angles.dim() != 4:
        raise ValueError(
            "fused rotary needs query [s, b, hq, hd], key [s, b, hk, hd] and angles [s, b, 1, d]; got "
            f"{tuple(query.shape)}, {tuple(key.shape)} and {tuple(angles.shape)}"
        )
    s, b, _, head_dim = query.shape
    if key.shape[:2] != (s, b) or key.shape[3] != head_dim:
        raise ValueError(f"key {tuple(key.shape)} does not match query {tuple(query.shape)} in s, b or head_dim")
    rot_dim = angles.shape[3]
    if angles.shape[0] != s or angles.shape[1] not in (1, b) or angles.shape[2] != 1:
        raise ValueError(f"angles must be [s, b or 1, 1, d] for query {tuple(query.shape)}, "
                         f"got {tuple(angles.shape)}")
    if rot_dim % 2 or not 0 < rot_dim <= head_dim:
        raise ValueError(f"the rotary dimension {rot_dim} must be even and in (0, head_dim = {head_dim}]")
    if query.dtype != key.dtype or query.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"query and key must share a float32, bfloat16 or float16 dtype, got "
                        f"{query.dtype} and {key.dtype}")
    if angles.dtype != torch.float32:
        raise TypeError(f"angles must be float32 (from rotary_angles), got {angles.dtype}")
    if not query.device == key.device == angles.device:
        raise ValueError(f"query, key and angles are on {query.device}, {key.device} and {angles.device}")


def rotate_qk_once(query: Tensor, key: Tensor, angles: Tensor, *, transpose: bool = False,
                   block_tokens: int = BLOCK_TOKENS, num_warps: int = NUM_WARPS) -> tuple[Tensor, Tensor]:
    """Launch the kernel once (no autograd): rotated (or, with ``transpose``, back-rotated) q and k.

    query [s, b, hq, hd] and key [s, b, hk, hd] may have any strides in s, b and heads; the outputs are
    new contiguous tensors of the same shapes. ``block_tokens`` and ``num_warps`` set the launch shape
    (the benchmark sweeps them).
    """
    _check_inputs(query, key, angles)
    s, b, q_heads, head_dim = query.shape
    k_heads = key.shape[2]
    rot_dim = angles.shape[3]
    query = query if query.stride(3) == 1 else query.contiguous()
    key = key if key.stride(3) == 1 else key.contiguous()
    angles = angles.expand(s, b, 1, rot_dim)
    angles = angles if angles.stride(3) == 1 else angles.contiguous()
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    k_out = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    num_tokens = s * b
    if num_tokens == 0:
        return q_out, k_out
    half, passed = rot_dim // 2, head_dim - rot_dim
    _rotary_qk_kernel[(triton.cdiv(num_tokens, block_tokens),)](
        query, key, q_out, k_out, angles,
        num_tokens, b, q_heads, k_heads,
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        angles.stride(0), angles.stride(1),
        HALF=half, HALF_BLOCK=triton.next_power_of_2(half),
        PASS=passed, PASS_BLOCK=triton.next_power_of_2(max(passed, 1)),
        BLOCK_TOKENS=block_tokens, TRANSPOSE=transpose, num_warps=num_warps,
    )
    return q_out, k_out


class FusedRotaryQK(torch.autograd.Function):
    """Rotate q and k by per-token angles in one kernel; the backward pass is the same kernel, transposed.

    The angles are constants of the micro-batch (computed from positions): they get no gradient.
    """

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, angles: Tensor) -> tuple[Tensor, Tensor]:
        if angles.requires_grad:
            raise ValueError("the fused rotary gives no gradient for the angles; pass angles.detach()")
        ctx.save_for_backward(angles)
        return rotate_qk_once(query, key, angles)

    @staticmethod
    def backward(ctx, grad_query: Tensor, grad_key: Tensor) -> tuple[Tensor, Tensor, None]:
        (angles,) = ctx.saved_tensors
        grad_query, grad_key = rotate_qk_once(grad_query, grad_key, angles, transpose=True)
        return grad_query, grad_key, None


def fused_rotary_qk(query: Tensor, key: Tensor, angles: Tensor) -> tuple[Tensor, Tensor]:
    """q [s, b, hq, hd] and k [s, b, hk, hd] rotated by angles [s, b, 1, d] (d ≤ hd; channels past d pass
    through), differentiably. Same rotation as ``apply_rotary`` on each; the arithmetic is float32 with one
    rounding to q's dtype at the end, where ``apply_rotary`` rounds cos, sin and every product to it."""
    return FusedRotaryQK.apply(query, key, angles)
