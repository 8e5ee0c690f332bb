"""GPU benchmark of one training step of the InternVL2-2B-shaped VLM on packed batches.

Run from the repository root on a CUDA machine: `python benchmarks/gpu/bench_step.py` (without a GPU it
runs in fp32 on the CPU, e.g. `--preset tiny --tokens 2048` as a dry run). One process, bf16 on
GPU, Megatron DDP + distributed optimizer (AdamW), packs of 8K-token sub-samples with one 7-tile image
each (δ random per image). The variant is chosen by flags: layer spec (`--spec torch`, no Transformer
Engine, or `te`), FP8 recipe, recompute (`full`, `none`, `selective[:modules]`, `block:N` = full
recompute of the first N layers), chunked loss, compiled RMSNorm, fused SwiGLU. Reports step time,
tokens/s, model TFLOP/s and MFU against the H100/H200 dense bf16 peak (989 TFLOP/s; FLOPs from
megatron_v2pe.model.flops) and, under FP8, against the dense FP8 peak (1979 TFLOP/s), peak memory,
and the V2PE share of the step: host positions, the float64 angles, and the q/k rotations of every
layer (forward and backward), each timed on its own.
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

from megatron_v2pe.batch import IGNORE_INDEX, PackedBatch
from megatron_v2pe.model.flops import H100_BF16_DENSE_PEAK, mfu, training_flops_per_pack
from megatron_v2pe.model.fusions import Fusions, vision_recompute_fields
from megatron_v2pe.model.presets import language_transformer_config, preset, vision_transformer_config
from megatron_v2pe.model.vlm import InternVLModel
from megatron_v2pe.parallel import initialize
from megatron_v2pe.parallel.fp8 import FP8_RECIPES, fp8_transformer_overrides
from megatron_v2pe.training.step import forward_backward
from megatron_v2pe.v2pe.fused import rotate_qk
from megatron_v2pe.v2pe.positions import RandomDelta, compute_positions
from megatron_v2pe.v2pe.rotary import inverse_frequencies, rotary_angles

SUBSAMPLE, TILES_PER_IMAGE = 8192, 7
FP8_DENSE_PEAK = 2 * H100_BF16_DENSE_PEAK  # H100/H200 SXM dense FP8, FLOP/s


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


def recompute_fields(recompute: str) -> dict:
    """TransformerConfig fields for 'full', 'none', 'selective[:core_attn,mlp]' or 'block:N'."""
    kind, _, arg = recompute.partition(":")
    if kind == "full" and not arg:
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if kind == "block" and arg.isdigit():
        return dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=int(arg))
    if kind == "selective":
        return dict(recompute_granularity="selective", **({"recompute_modules": arg.split(",")} if arg else {}))
    if kind == "none" and not arg:
        return {}
    raise SystemExit(f"--recompute {recompute!r}: use full, none, selective[:core_attn,mlp] or block:N")


def fp8_recipe(args) -> str | None:
    return None if args.fp8 == "none" else args.fp8


def build(config, args, bf16: bool):
    dtype = torch.bfloat16 if bf16 else torch.float32
    extra = recompute_fields(args.recompute)
    language = language_transformer_config(config, params_dtype=dtype, calculate_per_token_loss=True,
                                           variable_seq_lengths=True, moe_token_dispatcher_type="alltoall",
                                           bias_activation_fusion=args.fused_swiglu,
                                           **fp8_transformer_overrides(fp8_recipe(args)), **extra)
    vision = vision_transformer_config(config, params_dtype=dtype, **vision_recompute_fields(extra))  # no FP8
    backend = args.spec if bf16 else "reference"
    fusions = Fusions(loss_chunk_tokens=args.loss_chunk, compiled_norm=args.compiled_norm)
    model = InternVLModel(config, language, vision, attention_backend=backend, fusions=fusions)
    model = model.to(torch.device("cuda") if torch.cuda.is_available() else "cpu")
    inner = Float16Module(language, model) if bf16 else model
    ddp = DistributedDataParallel(language, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True), inner)
    optimizer = get_megatron_optimizer(OptimizerConfig(lr=1e-5, bf16=bf16, params_dtype=dtype,
                                                       use_distributed_optimizer=True), [ddp])
    return ddp, optimizer


def variant_name(args, bf16: bool) -> str:
    parts = [f"{'bf16' if bf16 else 'fp32, CPU'}", f"{args.spec if bf16 else 'reference'} spec",
             f"recompute {args.recompute}"]
    parts += [f"fp8 {args.fp8}"] * bool(fp8_recipe(args))
    parts += [f"loss chunks of {args.loss_chunk}"] * bool(args.loss_chunk)
    parts += ["compiled RMSNorm"] * args.compiled_norm + ["fused SwiGLU"] * args.fused_swiglu
    return ", ".join(parts)


def add_variant_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="internvl2_2b")
    parser.add_argument("--spec", choices=["torch", "te"], default="torch", help="layer spec on the GPU")
    parser.add_argument("--fp8", choices=("none", *FP8_RECIPES), default="none")
    parser.add_argument("--recompute", default="full", help="full | none | selective[:modules] | block:N")
    parser.add_argument("--no-recompute", dest="recompute", action="store_const", const="none")
    parser.add_argument("--loss-chunk", type=int, default=None, help="chunked loss: tokens per chunk")
    parser.add_argument("--compiled-norm", action="store_true")
    parser.add_argument("--fused-swiglu", action="store_true")


def one_step(ddp, optimizer, batch) -> None:
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    forward_backward([ddp], [batch])
    optimizer.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_ms(ddp, optimizer, batch, repeats: int) -> float:
    return median_ms(lambda: one_step(ddp, optimizer, batch), repeats)


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


def measure(config, ddp, optimizer, tokens: int, repeats: int, bf16: bool, rng) -> list:
    """One table row: the step of a `tokens` pack and its V2PE share."""
    batch, positions_ms = synthetic_pack(config, tokens, rng)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        ms = step_ms(ddp, optimizer, batch, repeats)
    except torch.OutOfMemoryError as err:  # a row that says so; the next pack size still runs
        del batch
        torch.cuda.empty_cache()
        return [f"{tokens // 1024}K", f"out of memory: {str(err).splitlines()[0][:90]}", *["-"] * 9]
    seqlens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    flops = training_flops_per_pack(config, seqlens, batch.pixel_values.shape[0]) / (ms / 1e3)
    device_positions = batch.positions.to("cuda" if torch.cuda.is_available() else "cpu")
    head_dim = config.language.hidden_size // config.language.num_attention_heads
    angles_ms = median_ms(lambda: rotary_angles(device_positions, inverse_frequencies(head_dim, 1e6)))
    rotate_ms = rotation_ms(config, tokens, torch.bfloat16 if bf16 else torch.float32)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return [f"{tokens // 1024}K", f"{ms:.0f}", f"{tokens / ms * 1e3:,.0f}", f"{flops / 1e12:.1f}",
            f"{100 * mfu(flops):.1f}%", f"{100 * flops / FP8_DENSE_PEAK:.1f}%", f"{peak:.1f}",
            f"{positions_ms:.2f}", f"{angles_ms:.2f}", f"{rotate_ms:.2f}", f"{100 * (angles_ms + rotate_ms) / ms:.2f}%"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_variant_arguments(parser)
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    initialize()
    config = preset(args.preset)
    bf16 = torch.cuda.is_available()
    ddp, optimizer = build(config, args, bf16=bf16)
    rng = np.random.default_rng(0)
    rows = [measure(config, ddp, optimizer, tokens, args.repeats, bf16, rng) for tokens in args.tokens]
    print(f"machine: {machine_description()}; peaks for MFU: dense bf16 {H100_BF16_DENSE_PEAK / 1e12:.0f}, "
          f"dense FP8 {FP8_DENSE_PEAK / 1e12:.0f} TFLOP/s\n")
    print_table(f"{args.preset} training step ({variant_name(args, bf16)})",
                ["pack", "step ms", "tokens/s", "TFLOP/s", "MFU (bf16 peak)", "of FP8 peak", "peak GiB",
                 "host positions ms", "angles ms", "rotations ms", "V2PE share (GPU)"], rows)


if __name__ == "__main__":
    main()
