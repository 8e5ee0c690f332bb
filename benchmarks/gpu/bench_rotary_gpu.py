"""GPU benchmark of the q/k rotation: fused V2PE kernel, unfused V2PE path, stock Megatron-Core rope.

Run from the repository root on a CUDA machine: `python benchmarks/gpu/bench_rotary_gpu.py`. InternVL2-2B
attention shapes (16 query heads, 8 KV heads, head_dim 128, bf16), one packed THD micro-batch of 32K
and 256K tokens (sub-samples of 8K tokens), q and k laid out as the split of the fused QKV projection
leaves them (q a contiguous copy, k a strided view).

Bandwidth counts the bytes of q and k read and written once, 2·(16 + 8)·128·2 B per token (the angles,
128·4 B per token, are not counted), against a device-to-device copy of the same bytes, measured here.
Times are medians of triton.testing.do_bench, which flushes the L2 cache before every run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, when not installed

from common import print_table

from megatron_v2pe.kernels.rotary_triton import BLOCK_TOKENS, NUM_WARPS, rotate_qk_once
from megatron_v2pe.v2pe.fused import rotate_qk
from megatron_v2pe.v2pe.rotary import apply_rotary, inverse_frequencies, rotary_angles

Q_HEADS, KV_HEADS, HEAD_DIM, THETA, SUBSAMPLE = 16, 8, 128, 1e6, 8192
TOKEN_COUNTS = (32_768, 262_144)
LAUNCH_SHAPES = [(block, warps) for block in (16, 32, 64) for warps in (4, 8)]


def qk_inputs(tokens: int):
    """q [t, 1, 16, 128] and k [t, 1, 8, 128] from a fused QKV projection output (per KV group
    [q q | k | v]), and float64 V2PE positions of packed sub-samples (runs of 256 δ = 1/4 steps between
    text), restarting at 0 in each."""
    per_group = Q_HEADS // KV_HEADS + 2
    mixed = torch.randn(tokens, 1, KV_HEADS, per_group * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    query = mixed[..., : (per_group - 2) * HEAD_DIM].reshape(tokens, 1, Q_HEADS, HEAD_DIM)
    key = mixed[..., (per_group - 2) * HEAD_DIM : (per_group - 1) * HEAD_DIM]
    offsets = torch.arange(tokens, device="cuda") % SUBSAMPLE
    steps = torch.where(offsets % 300 < 256, 0.25, 1.0).to(torch.float64)
    steps[offsets == 0] = 0.0
    positions = torch.cumsum(steps, 0)
    return query, key, positions - torch.cummax(torch.where(offsets == 0, positions, 0.0), 0).values


def stock_megatron(tokens: int, query, key):
    """Megatron-Core's own rope on the same packed batch with integer positions (THD: per sub-sample),
    unfused unless Transformer Engine provides its fused kernel."""
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings.rope_utils import (
        _apply_rotary_pos_emb_bshd,
        apply_rotary_pos_emb,
        fused_apply_rotary_pos_emb_thd,
    )
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_v2pe.model.config import internlm2_transformer_config

    rope = RotaryEmbedding(HEAD_DIM, 1.0, rotary_base=THETA)
    group = parallel_state.get_context_parallel_group()
    cu = torch.arange(0, tokens + 1, SUBSAMPLE, device="cuda", dtype=torch.int32)
    q_thd, k_thd = query[:, 0], key[:, 0]
    cases = []
    for fusion in ([False, True] if fused_apply_rotary_pos_emb_thd is not None else [False]):
        config = internlm2_transformer_config(2, 2048, Q_HEADS, KV_HEADS, 8192)
        config.apply_rope_fusion = fusion
        freqs = rope(SUBSAMPLE, packed_seq=True)
        name = "stock Megatron rope, THD, " + ("TE fused" if fusion else "unfused")
        cases.append((name, lambda c=config, f=freqs: (
            apply_rotary_pos_emb(q_thd, f, c, cu_seqlens=cu, cp_group=group),
            apply_rotary_pos_emb(k_thd, f, c, cu_seqlens=cu, cp_group=group))))
    freqs = rope(tokens)
    cases.append(("stock Megatron rope, one sequence (bshd), unfused",
                  lambda: (_apply_rotary_pos_emb_bshd(query, freqs), _apply_rotary_pos_emb_bshd(key, freqs))))
    return cases


def forward_backward(rotate, query, key, angles):
    """A step of ``rotate(query, key, angles) -> (q, k)`` and its backward (fixed random output grads)."""
    query, key = query.detach().requires_grad_(True), key.detach().requires_grad_(True)
    grads = None

    def step():
        nonlocal grads
        q_out, k_out = rotate(query, key, angles)
        if grads is None:
            grads = (torch.randn_like(q_out), torch.randn_like(k_out))
        torch.autograd.backward((q_out, k_out), grads)
    return step


def unfused(query, key, angles):
    return apply_rotary(query, angles), apply_rotary(key, angles)


def rows_for(tokens: int) -> tuple[list[list[object]], list[list[object]]]:
    query, key, positions = qk_inputs(tokens)
    inv_freq = inverse_frequencies(HEAD_DIM, THETA).cuda()
    angles = rotary_angles(positions, inv_freq)
    qk_bytes = 2 * (Q_HEADS + KV_HEADS) * HEAD_DIM * 2 * tokens  # read + write
    source = torch.empty(qk_bytes // 4, dtype=torch.bfloat16, device="cuda")
    target = torch.empty_like(source)
    copy_ms = do_bench(lambda: target.copy_(source), return_mode="median")
    copy_bw = qk_bytes / copy_ms / 1e6  # GB/s

    def row(name: str, ms: float, passes: int = 1) -> list[object]:
        bandwidth = passes * qk_bytes / ms / 1e6
        return [f"{tokens // 1024}K", name, f"{ms * 1e3:.0f}", f"{bandwidth:.0f}", f"{100 * bandwidth / copy_bw:.0f}%"]

    cases = [
        (f"fused V2PE (Triton), forward [{BLOCK_TOKENS} tokens, {NUM_WARPS} warps]",
         lambda: rotate_qk_once(query, key, angles), 1),
        ("fused V2PE (Triton), forward + backward", forward_backward(rotate_qk, query, key, angles), 2),
        ("unfused V2PE (PyTorch), forward", lambda: unfused(query, key, angles), 1),
        ("unfused V2PE (PyTorch), forward + backward", forward_backward(unfused, query, key, angles), 2),
        ("angles from positions (once per micro-batch, all layers)", None, 0),
    ] + [(name, fn, 1) for name, fn in stock_megatron(tokens, query, key)]
    rows = [row("device-to-device copy of the q, k bytes", copy_ms)]
    for name, fn, passes in cases:
        if fn is None:
            ms = do_bench(lambda: rotary_angles(positions, inv_freq), return_mode="median")
            rows.append([f"{tokens // 1024}K", name, f"{ms * 1e3:.0f}", "-", "-"])
        else:
            rows.append(row(name, do_bench(fn, return_mode="median"), passes))

    sweep = []
    for block, warps in LAUNCH_SHAPES:
        ms = do_bench(lambda b=block, w=warps: rotate_qk_once(query, key, angles, block_tokens=b, num_warps=w),
                      return_mode="median")
        sweep.append(row(f"fused forward, {block} tokens x {warps} warps", ms))
    return rows, sweep


def main() -> None:
    from megatron_v2pe.parallel import initialize

    initialize()
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
          f"triton {triton.__version__}\n")
    header = ["tokens", "what", "µs", "GB/s (q, k bytes)", "of copy"]
    rows, sweep = [], []
    for tokens in TOKEN_COUNTS:
        r, s = rows_for(tokens)
        rows += r
        sweep += s
        torch.cuda.empty_cache()
    print_table("q/k rotation, InternVL2-2B shapes, bf16", header, rows)
    print_table("fused kernel launch shapes (forward)", header, sweep)


if __name__ == "__main__":
    main()
