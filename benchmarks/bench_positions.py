"""CPU benchmark of V2PE position building on realistic packed batches, on one core.

Run from the repository root: `python benchmarks/bench_positions.py`. Target: compute_positions takes at
most 20 ms per 1M tokens; the exit status is 1 if any batch misses it.
"""

# ruff: noqa: E402  (the thread settings must precede the numpy import)
from __future__ import annotations

import os

# One thread, set before numpy is imported so that its BLAS / OpenMP pools read it.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import sys
from pathlib import Path

import numpy as np

from common import machine_description, median_ms, print_table

try:
    from megatron_v2pe.v2pe.positions import RandomDelta, compute_positions
except ImportError:  # not installed: use the checkout this script lives in
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from megatron_v2pe.v2pe.positions import RandomDelta, compute_positions

TARGET_MS_PER_1M_TOKENS = 20.0
BATCH_TOKENS = (32 * 1024, 256 * 1024, 1024 * 1024)
TOKENS_PER_TILE = 256


def packed_batch(num_tokens: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(visual_mask, cu_seqlens): sub-samples of 2K-8K tokens, each text then images of 256·T tokens
    (T = 1..7) separated by text, ending with text; the last sub-sample is cut at `num_tokens`."""
    kinds: list[bool] = []
    lengths: list[int] = []
    cu = [0]
    while cu[-1] < num_tokens:
        target, size = int(rng.integers(2048, 8192)), 0
        while size < target:
            text, image = int(rng.integers(16, 160)), TOKENS_PER_TILE * int(rng.integers(1, 8))
            kinds += [False, True]
            lengths += [text, image]
            size += text + image
        kinds.append(False)
        lengths.append(int(rng.integers(16, 160)))
        cu.append(cu[-1] + size + lengths[-1])
    cu[-1] = num_tokens
    return np.repeat(kinds, lengths)[:num_tokens], np.array(cu, dtype=np.int64)


def pin_to_one_core() -> None:
    """numpy is single-threaded here anyway; pinning also keeps the scheduler from moving us."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def bench_batch(num_tokens: int, policy: RandomDelta, rng: np.random.Generator) -> tuple[list[object], bool]:
    """One table row for a packed batch of `num_tokens`, and whether it meets the target."""
    mask, cu = packed_batch(num_tokens, rng)
    deltas = policy.deltas(mask, cu, rng)
    repeats = max(10, (1 << 21) // num_tokens)
    positions_ms = median_ms(lambda: compute_positions(mask, deltas, cu), repeats)
    deltas_ms = median_ms(lambda: policy.deltas(mask, cu, rng), repeats)
    per_1m = positions_ms * (1 << 20) / num_tokens
    passed = per_1m <= TARGET_MS_PER_1M_TOKENS
    row = [
        f"{num_tokens // 1024}K",
        cu.size - 1,
        deltas.size,
        f"{100 * mask.mean():.1f}%",
        f"{positions_ms:.2f}",
        f"{per_1m:.2f}",
        f"{deltas_ms:.2f}",
        "PASS" if passed else "FAIL",
    ]
    return row, passed


def main() -> int:
    pin_to_one_core()
    rng = np.random.default_rng(0)
    results = [bench_batch(num_tokens, RandomDelta(), rng) for num_tokens in BATCH_TOKENS]
    print(f"machine: {machine_description()} (benchmark pinned to one core)\n")
    header = ["tokens", "sub-samples", "images", "visual", "positions ms", "ms / 1M tokens"]
    header += ["random deltas() ms", f"<= {TARGET_MS_PER_1M_TOKENS:g} ms / 1M"]
    print_table(
        "compute_positions and RandomDelta.deltas on packed batches (median ms per call)",
        header,
        [row for row, _ in results],
    )
    return 0 if all(passed for _, passed in results) else 1


if __name__ == "__main__":
    sys.exit(main())
