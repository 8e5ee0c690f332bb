"""Peak host memory of the language-model loss (output GEMM + cross entropy, forward and backward) on a
long pack: Megatron-Core's path, which materialises the [tokens × vocab] float32 logits, against the
chunked loss (megatron_v2pe/model/chunked_loss.py), which holds [chunk × vocab] at a time.

Each path runs in a fresh child process that reports the growth of its peak RSS (``ru_maxrss``) over its
RSS once the inputs exist, next to the arithmetic: one [tokens × vocab] float32 tensor for the unfused
path (Megatron-Core's cross entropy works in place on the logits, their softmax and its gradient; in
bf16 training the GEMM's bf16 logits and their gradient come on top), one [chunk × vocab] plus the
float32 weight gradient [vocab × hidden] for the chunked one.

    PYTHONPATH=. python benchmarks/loss_memory.py [--tokens 8192] [--vocab 92553] [--hidden 256] [--chunk 1024]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

GIB = 2**30


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def child(args) -> None:
    """One loss forward + backward; prints {"peak_gib": growth of peak RSS, "loss": mean loss}."""
    import torch
    from megatron.core import tensor_parallel

    from megatron_v2pe.model.chunked_loss import chunked_cross_entropy
    from megatron_v2pe.parallel import initialize

    initialize()
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=generator).requires_grad_(True)
    weight = (torch.randn(args.vocab, args.hidden, generator=generator) / args.hidden**0.5).requires_grad_(True)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=generator)
    start = _rss_gib()
    if args.chunk:
        loss = chunked_cross_entropy(hidden, weight, labels, args.chunk)
    else:
        logits = hidden @ weight.t()
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits[:, None], labels[:, None])[:, 0]
        del logits
    loss.mean().backward()
    print(json.dumps({"peak_gib": _rss_gib() - start, "loss": loss.mean().item()}))


def measure(args, chunk: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--tokens", str(args.tokens), "--vocab", str(args.vocab),
           "--hidden", str(args.hidden), "--chunk", str(chunk)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=92553)  # InternVL2-2B's
    parser.add_argument("--hidden", type=int, default=256)  # narrower than 2B's 2048: same logits, less time
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    from common import machine_description, print_table

    logits_gib = args.tokens * args.vocab * 4 / GIB
    chunk_gib = args.chunk * args.vocab * 4 / GIB
    weight_grad_gib = args.vocab * args.hidden * 4 / GIB
    print(f"machine: {machine_description()}\n", flush=True)
    rows = []
    for name, chunk, unit in (("unfused (Megatron-Core)", 0, logits_gib),
                              (f"chunked, {args.chunk} tokens", args.chunk, chunk_gib + weight_grad_gib)):
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        got = measure(args, chunk)
        rows.append([name, f"{got['loss']:.6f}", f"{got['peak_gib']:.2f}", f"{unit:.2f}",
                     f"{got['peak_gib'] / unit:.1f}"])
    print_table(f"loss forward + backward, {args.tokens:,} tokens x vocabulary {args.vocab:,}, hidden "
                f"{args.hidden} (float32)", ["path", "mean loss", "peak RSS growth GiB",
                                             "one unit GiB", "peak / unit"], rows)
    print(f"unit: tokens x vocab x 4 B = {logits_gib:.2f} GiB (unfused); chunk x vocab x 4 B = {chunk_gib:.2f} GiB "
          f"+ weight gradient vocab x hidden x 4 B = {weight_grad_gib:.2f} GiB (chunked)")
    print(f"at 32K tokens the unfused unit is {32768 * args.vocab * 4 / GIB:.1f} GiB of float32 logits")


if __name__ == "__main__":
    main()
