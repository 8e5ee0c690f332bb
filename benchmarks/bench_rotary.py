"""CPU benchmark of the V2PE rotary path: float64 angles, rotation, and their share of a forward pass.

Run from the repository root: `python benchmarks/bench_rotary.py`. Times the angle computation for
32K and 256K positions (d = 128, θ = 1e6), the q/k rotation at 32K tokens, and the angles' share of one
forward pass of the tiny V2PE language model on a 4K-token pack.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from common import machine_description, median_ms, print_table

try:
    import megatron_v2pe  # noqa: F401
except ImportError:  # not installed: use the checkout this script lives in
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_v2pe.v2pe.rotary import apply_rotary, inverse_frequencies, rotary_angles

HEAD_DIM, THETA = 128, 1e6


def v2pe_positions(tokens: int) -> torch.Tensor:
    """Fractional positions like a pack's: runs of δ = 1/4 steps between text."""
    steps = torch.where(torch.arange(tokens) % 300 < 256, 0.25, 1.0).to(torch.float64)
    return torch.cumsum(steps, 0) - 1


def angle_rows(threads: int) -> list[list[object]]:
    torch.set_num_threads(threads)
    inv_freq = inverse_frequencies(HEAD_DIM, THETA)
    rows = []
    for tokens in (32_768, 262_144):
        positions = v2pe_positions(tokens)
        ms = median_ms(lambda: rotary_angles(positions, inv_freq))
        rows.append([f"angles, {tokens // 1024}K tokens", threads, f"{ms:.1f}", f"{ms / tokens * 1e6:.0f}"])
    return rows


def rotation_rows(threads: int) -> list[list[object]]:
    torch.set_num_threads(threads)
    tokens, heads = 32_768, 16
    angles = rotary_angles(v2pe_positions(tokens), inverse_frequencies(HEAD_DIM, THETA))
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(tokens, 1, heads, HEAD_DIM, dtype=dtype)
        ms = median_ms(lambda: apply_rotary(q, angles), repeats=3)
        rows.append([f"rotate q, 32K x {heads} heads, {str(dtype)[6:]}", threads, f"{ms:.1f}",
                     f"{ms / tokens * 1e6:.0f}"])
    return rows


def forward_share() -> list[list[object]]:
    """Angles vs one forward of the tiny V2PE LM (2 layers, hidden 64) on a packed 4K-token batch."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_v2pe.model.config import internlm2_transformer_config
    from megatron_v2pe.model.language_model import V2PEGPTModel
    from megatron_v2pe.model.layer_specs import v2pe_layer_spec
    from megatron_v2pe.parallel import initialize

    initialize()
    torch.set_num_threads(1)
    model = V2PEGPTModel(internlm2_transformer_config(2, 64, 4, 2, 160), v2pe_layer_spec("reference"), 256, 8192,
                         share_embeddings_and_output_weights=False).eval()
    tokens, pieces = 4096, 8
    cu = torch.arange(0, tokens + 1, tokens // pieces, dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=tokens // pieces, max_seqlen_kv=tokens // pieces)
    ids = torch.randint(0, 256, (1, tokens))
    positions = torch.cat([v2pe_positions(tokens // pieces)] * pieces)[None]
    with torch.no_grad():
        forward = median_ms(lambda: model(ids, positions=positions, packed_seq_params=packed), repeats=3)
        angles = median_ms(lambda: model.rotary_pos_emb(positions))
    return [["tiny LM forward, 4K packed tokens", 1, f"{forward:.1f}", f"angles {angles:.2f} ms = "
             f"{100 * angles / forward:.2f}% of it"]]


def main() -> None:
    print(f"machine: {machine_description()}\n")
    rows = angle_rows(1) + angle_rows(os.cpu_count() or 1) + rotation_rows(1)
    rows += forward_share()
    print_table("V2PE rotary on CPU", ["what", "threads", "ms", "ns / token (or share)"], rows)


if __name__ == "__main__":
    main()
