"""Throughput and memory of evaluation: chunked prefill and decoding per prompt length, and batched
decoding with the KV cache against recomputation.

    python benchmarks/eval_throughput.py                                  # tiny model, fp32 (CPU or GPU)
    python benchmarks/eval_throughput.py --preset internvl2_2b --lengths 32768 131072 --chunk 16384  # bf16

Prompts are random text ids (no images, so the numbers are the language model's) at V2PE positions with
δ auto; the model has random weights, which costs the same as trained ones. Per prompt length (batch 1):
prefill tokens/s (chunks of ``--chunk`` tokens into the preallocated cache), decode tokens/s over
``--decode-tokens`` steps, the KV cache and the peak memory of the prefill above weights + cache (its
activations); ``--compare-unchunked`` adds the same prefill in one chunk, to show that chunked
activations do not grow with the prompt. On a GPU peaks come from PyTorch's allocator; on the CPU every
measurement runs in its own process (with glibc mapping every block of 128 KiB or more on its own, so
that freed tensors leave the resident set) and the peak is the resident set's high-water mark, reset
once the cache is allocated, above the resident set then. Decoding: ``--batch`` prompts of
~``--prompt-tokens`` (±25%, ragged), ``--new-tokens`` greedy steps, KV cache vs recomputation; tokens/s
counts generated tokens. The attention backend is the one ``auto`` picks (``torch`` on a GPU without
Transformer Engine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when not installed

from common import machine_description, print_table

from megatron_v2pe.eval.decode_step import DecodeStep
from megatron_v2pe.eval.generation import Prompt, generate, pack_prompts, prompt_positions
from megatron_v2pe.eval.kv_cache import kv_cache
from megatron_v2pe.eval.memory_plan import plan_memory
from megatron_v2pe.eval.prefill import prefill
from megatron_v2pe.model.presets import language_transformer_config, preset
from megatron_v2pe.model.vlm import InternVLModel
from megatron_v2pe.parallel import initialize
from megatron_v2pe.parallel.attention_backends import resolve_attention_backend
from megatron_v2pe.v2pe.positions import AutoDelta

MIB = 2**20


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


def _status(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: its peak), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _memory_now(device: torch.device) -> int:
    """Memory in use now, with the peak reset to it (Linux: writing 5 to clear_refs resets VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _memory_peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _status("VmHWM")


def _random_prompt(model, length: int, reserve: int, seed: int):
    vocab = model.vlm_config.language.vocab_size
    prompt = Prompt(np.random.default_rng(seed).integers(10, vocab, size=length).tolist())
    positions, _ = prompt_positions(model, [prompt], AutoDelta(length + reserve), reserve)
    return pack_prompts([prompt], positions)


def measure_length(model, length: int, chunk: int, decode_tokens: int, device: torch.device) -> dict:
    """Prefill one prompt of ``length`` tokens in chunks, then decode; rates, cache and peak memory."""
    warm = _random_prompt(model, min(chunk, length), 2, seed=1)
    with kv_cache(model, 1, len(warm.tokens) + 2) as cache:  # kernels, allocator
        prefill(model, cache, warm, chunk, warm.ends)
    packed = _random_prompt(model, length, decode_tokens, seed=0)
    plan = plan_memory(model, 1, length + decode_tokens + 1, min(chunk, length), 1)
    print(f"  {plan}", file=sys.stderr, flush=True)
    plan.check()
    with kv_cache(model, 1, length + decode_tokens + 1) as cache:
        base = _memory_now(device)
        _sync(device)
        start = time.perf_counter()
        logits = prefill(model, cache, packed, chunk, packed.ends)
        _sync(device)
        prefill_s = time.perf_counter() - start
        peak = _memory_peak(device) - base
        decode_s = _decode(model, cache, logits, float(packed.positions[-1]) + 1, decode_tokens, device)
        cache_bytes = sum(k.nbytes + v.nbytes for k, v in zip(cache.keys, cache.values))
    return {"length": length, "chunk": chunk, "prefill_tokens_per_s": length / prefill_s,
            "decode_tokens_per_s": decode_tokens / decode_s, "cache_mib": cache_bytes / MIB,
            "activation_peak_mib": peak / MIB, "planned_activation_mib": plan.activations / MIB}


def _decode(model, cache, logits, position: float, steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` greedy steps of one sequence through the cache (as ``generate`` decodes:
    a CUDA graph on a GPU, captured in the first step, which is left out of the timing)."""
    step = DecodeStep(model, cache, use_graph=True)
    positions = position + torch.arange(steps + 1, dtype=torch.float64)
    logits = step(logits.argmax(dim=-1), positions[:1])
    _sync(device)
    start = time.perf_counter()
    for k in range(1, steps + 1):
        logits = step(logits.argmax(dim=-1), positions[k : k + 1])
    _sync(device)
    return time.perf_counter() - start


def decode_tokens_per_s(model, prompts: list[Prompt], new_tokens: int, use_cache: bool, device) -> float:
    generate(model, prompts, 2, use_cache=use_cache)  # warm-up (kernels, allocator)
    _sync(device)
    start = time.perf_counter()
    out = generate(model, prompts, new_tokens, use_cache=use_cache)
    _sync(device)
    return sum(len(t) for t in out.tokens) / (time.perf_counter() - start)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk (tokens)")
    parser.add_argument("--decode-tokens", type=int, default=16, help="decoding steps after each prefill")
    parser.add_argument("--compare-unchunked", action="store_true",
                        help="also prefill each prompt in one chunk")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--one", nargs=2, type=int, metavar=("LENGTH", "CHUNK"), help=argparse.SUPPRESS)
    return parser


def _setup(args) -> tuple[InternVLModel, str, torch.device, torch.dtype]:
    initialize(seed=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" and args.preset != "tiny" else torch.float32
    model, backend = build(args.preset, device, dtype)
    return model, backend, device, dtype


def _length_runs(args, model, device) -> list[dict]:
    """Every (length, chunk) measurement; on the CPU each in a fresh process (peak resident sets)."""
    runs = [(n, args.chunk) for n in args.lengths]
    if args.compare_unchunked:
        runs += [(n, n) for n in args.lengths]
    results = []
    for length, chunk in runs:
        if device.type == "cuda":
            try:
                with torch.no_grad():
                    results.append(measure_length(model, length, chunk, args.decode_tokens, device))
            except ValueError as err:  # the memory plan refused it
                print(f"  {length:,} tokens refused: {err}", file=sys.stderr, flush=True)
                continue
        else:
            command = [sys.executable, __file__, "--preset", args.preset, "--decode-tokens",
                       str(args.decode_tokens), "--one", str(length), str(chunk)]
            # big blocks mapped and unmapped one by one, so the resident set follows the live tensors
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
            out = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
        print(f"  measured {json.dumps(results[-1])}", file=sys.stderr, flush=True)
    return results


def main() -> None:
    args = _parser().parse_args()
    model, backend, device, dtype = _setup(args)
    if args.one:
        with torch.no_grad():
            print(json.dumps(measure_length(model, *args.one, args.decode_tokens, device)))
        return
    print(f"{machine_description()}; {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'no GPU'}")
    print(f"model {args.preset} ({str(dtype).removeprefix('torch.')}), attention backend {backend}\n")
    rng = np.random.default_rng(0)
    vocab = model.vlm_config.language.vocab_size
    spread = (int(args.prompt_tokens * 0.75), int(args.prompt_tokens * 1.25) + 1)
    lengths = rng.integers(*spread, size=args.batch)
    prompts = [Prompt(rng.integers(10, vocab, size=int(n)).tolist()) for n in lengths]
    with torch.no_grad():
        rates = {c: decode_tokens_per_s(model, prompts, args.new_tokens, c, device) for c in (True, False)}
    what = f"{args.batch} prompts of ~{args.prompt_tokens}, {args.new_tokens} new tokens"
    print_table("batched decoding", ["work", "mode", "tokens/s"],
                [[what, "KV cache", f"{rates[True]:,.1f}"], [what, "recompute", f"{rates[False]:,.1f}"],
                 [what, "speed-up", f"{rates[True] / rates[False]:,.1f}x"]])
    results = _length_runs(args, model, device)
    rows = [[f"{r['length']:,}", f"{r['chunk']:,}", f"{r['prefill_tokens_per_s']:,.0f}",
             f"{r['decode_tokens_per_s']:,.1f}", f"{r['cache_mib']:,.1f}", f"{r['activation_peak_mib']:,.1f}",
             f"{r['planned_activation_mib']:,.1f}"] for r in results]
    print_table("prefill and decoding, batch 1",
                ["prompt", "chunk", "prefill tok/s", "decode tok/s", "KV cache MiB", "peak above cache MiB",
                 "planned MiB"], rows)
    if args.json:
        args.json.write_text(json.dumps({"decode": {"cache": rates[True], "recompute": rates[False]},
                                         "lengths": results, "argv": sys.argv[1:]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
