"""Throughput of evaluation: decoding with and without the KV cache, and one long teacher-forced forward.

    python benchmarks/eval_throughput.py                      # tiny model, fp32 (CPU or GPU)
    python benchmarks/eval_throughput.py --preset internvl2_2b --lengths 4096 32768   # on a GPU, bf16

Prompts are random text ids (no images, so the numbers are the language model's) at V2PE positions with
δ auto; the model has random weights, which costs the same as trained ones. Decoding: ``--batch`` prompts
of ``--prompt-tokens`` each (lengths spread ±25% so the packed batch is ragged), ``--new-tokens`` greedy
steps; tokens/s counts generated tokens. Teacher-forced: one prompt of each of ``--lengths`` tokens,
one forward, prompt tokens/s. The attention backend is the one ``auto`` picks (``torch`` on a GPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when not installed

from common import machine_description, print_table

from megatron_v2pe.eval.generation import Prompt, generate, packed_params, prompt_positions
from megatron_v2pe.model.presets import language_transformer_config, preset
from megatron_v2pe.model.vlm import InternVLModel
from megatron_v2pe.parallel import initialize
from megatron_v2pe.parallel.attention_backends import resolve_attention_backend
from megatron_v2pe.v2pe.positions import AutoDelta


def build(name: str, device: torch.device, dtype: torch.dtype) -> tuple[InternVLModel, str]:
    config = preset(name)
    backend = resolve_attention_backend("auto")
    transformer = language_transformer_config(config, params_dtype=dtype, bf16=dtype == torch.bfloat16)
    with torch.device(device):
        model = InternVLModel(config, transformer, attention_backend=backend)
    return model.to(device=device, dtype=dtype).eval(), backend


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def decode_tokens_per_s(model, prompts: list[Prompt], new_tokens: int, use_cache: bool, device) -> float:
    generate(model, prompts, 2, use_cache=use_cache)  # warm-up (kernels, allocator)
    _sync(device)
    start = time.perf_counter()
    out = generate(model, prompts, new_tokens, use_cache=use_cache)
    _sync(device)
    return sum(len(t) for t in out.tokens) / (time.perf_counter() - start)


def forward_tokens_per_s(model, length: int, rng: np.random.Generator, device) -> float:
    vocab = model.vlm_config.language.vocab_size
    prompt = Prompt(rng.integers(10, vocab, size=length).tolist())
    (positions,), _ = prompt_positions(model, [prompt], AutoDelta(length))
    inputs = {
        "input_ids": torch.tensor(prompt.tokens, device=device)[None],
        "positions": torch.from_numpy(positions).to(device)[None],
        "pixel_values": None,
        "packed_seq_params": packed_params([length], device),
    }
    seconds = []
    for _ in range(3):  # the first is the warm-up
        _sync(device)
        start = time.perf_counter()
        model(**inputs)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return length / min(seconds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    args = parser.parse_args()
    initialize(seed=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" and args.preset != "tiny" else torch.float32
    model, backend = build(args.preset, device, dtype)
    rng = np.random.default_rng(0)
    vocab = model.vlm_config.language.vocab_size
    lengths = rng.integers(
        int(args.prompt_tokens * 0.75), int(args.prompt_tokens * 1.25) + 1, size=args.batch
    )
    prompts = [Prompt(rng.integers(10, vocab, size=int(n)).tolist()) for n in lengths]
    print(f"{machine_description()}; {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'no GPU'}")
    print(f"model {args.preset} ({str(dtype).removeprefix('torch.')}), attention backend {backend}\n")
    rows = []
    with torch.no_grad():
        for use_cache in (True, False):
            rate = decode_tokens_per_s(model, prompts, args.new_tokens, use_cache, device)
            what = f"decode, {args.batch} prompts of ~{args.prompt_tokens}, {args.new_tokens} new tokens"
            rows.append([what, "KV cache" if use_cache else "recompute", f"{rate:,.1f}"])
        for length in args.lengths:
            rate = forward_tokens_per_s(model, length, rng, device)
            rows.append([f"teacher-forced forward, 1 prompt of {length:,}", "-", f"{rate:,.1f}"])
    print_table("evaluation throughput", ["work", "mode", "tokens/s"], rows)


if __name__ == "__main__":
    main()
