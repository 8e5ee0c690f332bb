"""GPU benchmark of one training step of the InternVL2-2B-shaped VLM on packed batches.

Run from the repository root on a CUDA machine: `python benchmarks/gpu/bench_step.py` (without a GPU it
runs in fp32 on the CPU, e.g. `--preset tiny --tokens 2048` as a dry run). One process, bf16 on
GPU, the PyTorch attention backend (no Transformer Engine), Megatron DDP + distributed optimizer (AdamW),
packs of 8K-token sub-samples with one 7-tile image each (δ random per image). Reports step time,
tokens/s, model TFLOP/s and MFU against the H100 SXM dense bf16 peak (989 TFLOP/s; FLOPs from
megatron_v2pe.model.flops), peak memory, and the V2PE share of the step: host positions, the float64
angles, and the q/k rotations of every layer (forward and backward), each timed on its own.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, when not installed

from common import machine_description, median_ms, print_table

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.module import Float16Module

from megatron_v2pe.data.batch import IGNORE_INDEX, PackedBatch
from megatron_v2pe.model.flops import H100_BF16_DENSE_PEAK, mfu, training_flops_per_pack
from megatron_v2pe.model.presets import language_transformer_config, preset, vision_transformer_config
from megatron_v2pe.model.vlm import InternVLModel
from megatron_v2pe.parallel import initialize
from megatron_v2pe.training.step import forward_backward
from megatron_v2pe.v2pe.fused import rotate_qk
from megatron_v2pe.v2pe.positions import RandomDelta, compute_positions
from megatron_v2pe.v2pe.rotary import inverse_frequencies, rotary_angles

SUBSAMPLE, TILES_PER_IMAGE = 8192, 7


def synthetic_pack(config, tokens: int, rng: np.random.Generator) -> tuple[PackedBatch, float]:
    """A pack of `tokens` tokens; returns it and the host time of its V2PE positions (ms)."""
    lengths = [min(SUBSAMPLE, tokens - start) for start in range(0, tokens, SUBSAMPLE)]
    image = TILES_PER_IMAGE * config.tokens_per_tile
    ids = rng.integers(10, config.language.vocab_size, tokens)
    visual = np.zeros(tokens, dtype=bool)
    for start, n in zip(np.cumsum([0, *lengths[:-1]]), lengths):
        if n > image + 64:
            visual[start + 32 : start + 32 + image] = True
    ids[visual] = config.img_context_token_id
    cu = np.concatenate([[0], np.cumsum(lengths)])
    deltas = RandomDelta().deltas(visual, cu, rng)
    start = time.perf_counter()
    positions = compute_positions(visual, deltas, cu)
    positions_ms = 1e3 * (time.perf_counter() - start)
    labels = np.append(ids[1:], IGNORE_INDEX)
    size = config.vision.image_size
    batch = PackedBatch(
        tokens=torch.from_numpy(ids), labels=torch.from_numpy(labels),
        loss_weights=torch.from_numpy((labels != IGNORE_INDEX) & ~visual).float(),
        positions=torch.from_numpy(positions), cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
        cu_seqlens_padded=torch.from_numpy(cu.astype(np.int32)),
        pixel_values=torch.randn(len(deltas) * TILES_PER_IMAGE, 3, size, size),
        tiles_per_image=torch.full((len(deltas),), TILES_PER_IMAGE), deltas=torch.from_numpy(deltas),
    )
    return batch, positions_ms


def build(config, recompute: bool, bf16: bool):
    dtype = torch.bfloat16 if bf16 else torch.float32
    extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) if recompute else {}
    language = language_transformer_config(config, params_dtype=dtype, calculate_per_token_loss=True,
                                           variable_seq_lengths=True, moe_token_dispatcher_type="alltoall", **extra)
    vision = vision_transformer_config(config, params_dtype=dtype, **extra)
    model = InternVLModel(config, language, vision, attention_backend="torch" if bf16 else "reference")
    model = model.to(torch.device("cuda") if torch.cuda.is_available() else "cpu")
    inner = Float16Module(language, model) if bf16 else model
    ddp = DistributedDataParallel(language, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True), inner)
    optimizer = get_megatron_optimizer(OptimizerConfig(lr=1e-5, bf16=bf16, params_dtype=dtype,
                                                       use_distributed_optimizer=True), [ddp])
    return ddp, optimizer


def step_ms(ddp, optimizer, batch, repeats: int) -> float:
    def one_step():
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward([ddp], [batch])
        optimizer.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return median_ms(one_step, repeats)


def rotation_ms(config, tokens: int, dtype) -> float:
    """q/k rotation of all layers, forward + backward (the backward is one more rotation)."""
    lm = config.language
    head_dim = lm.hidden_size // lm.num_attention_heads
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(tokens, 1, lm.num_attention_heads, head_dim, device=device, dtype=dtype)
    k = torch.randn(tokens, 1, lm.num_query_groups, head_dim, device=device, dtype=dtype)
    angles = rotary_angles(torch.arange(tokens, device=device, dtype=torch.float64),
                           inverse_frequencies(head_dim, lm.rotary_base))
    return 2 * lm.num_layers * median_ms(lambda: rotate_qk(q, k, angles))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="internvl2_2b")
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-recompute", action="store_true")
    args = parser.parse_args()
    initialize()
    config = preset(args.preset)
    bf16 = torch.cuda.is_available()
    ddp, optimizer = build(config, recompute=not args.no_recompute, bf16=bf16)
    rng = np.random.default_rng(0)
    rows = []
    for tokens in args.tokens:
        batch, positions_ms = synthetic_pack(config, tokens, rng)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        ms = step_ms(ddp, optimizer, batch, args.repeats)
        seqlens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
        flops = training_flops_per_pack(config, seqlens, batch.pixel_values.shape[0]) / (ms / 1e3)
        device_positions = batch.positions.to("cuda" if torch.cuda.is_available() else "cpu")
        head_dim = config.language.hidden_size // config.language.num_attention_heads
        angles_ms = median_ms(lambda: rotary_angles(device_positions, inverse_frequencies(head_dim, 1e6)))
        rotate_ms = rotation_ms(config, tokens, torch.bfloat16 if bf16 else torch.float32)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        rows.append([f"{tokens // 1024}K", f"{ms:.0f}", f"{tokens / ms * 1e3:,.0f}", f"{flops / 1e12:.1f}",
                     f"{100 * mfu(flops):.1f}%", f"{peak:.1f}", f"{positions_ms:.2f}", f"{angles_ms:.2f}",
                     f"{rotate_ms:.2f}", f"{100 * (angles_ms + rotate_ms) / ms:.2f}%"])
    print(f"machine: {machine_description()}; peak for MFU: {H100_BF16_DENSE_PEAK / 1e12:.0f} TFLOP/s\n")
    print_table(f"{args.preset} training step ({'bf16, torch attention' if bf16 else 'fp32, CPU'}"
                f"{', full recompute' if not args.no_recompute else ''})",
                ["pack", "step ms", "tokens/s", "TFLOP/s", "MFU", "peak GiB", "host positions ms",
                 "angles ms", "rotations ms", "V2PE share (GPU)"], rows)


if __name__ == "__main__":
    main()
