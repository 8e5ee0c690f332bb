"""Peak RSS and time of checkpoint conversion, Hugging Face -> Megatron dist checkpoint -> Hugging Face.

A random-weight model with the exact InternVL2-2B shapes (bf16, as released) is written to disk in the
transformers-native layout, shard by shard; each direction then runs in a fresh child process that reports
the growth of its peak RSS over its RSS after imports (``ru_maxrss``, the whole-process peak, so what the
conversion added is over- rather than under-stated). Target: below 1.5x (largest shard + one layer).

    PYTHONPATH=. python benchmarks/convert_memory.py [--small] [--shard-size-mib 1024] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def _config(small: bool):
    from megatron_v2pe.model.presets import internvl2_2b

    config = internvl2_2b()
    if small:  # same widths, a quarter of the depth
        config = dataclasses.replace(
            config,
            vision=dataclasses.replace(config.vision, num_layers=6),
            language=dataclasses.replace(config.language, num_layers=6),
        )
    return config


def _runtime() -> None:
    from megatron_v2pe.parallel import initialize

    initialize(seed=0)


def prepare(directory: Path, small: bool, shard_bytes: int) -> None:
    """Random tensors under the transformers-native names and InternVL2-2B shapes, one shard in memory."""
    import torch

    from megatron_v2pe.convert.random_release import write_random_release

    _runtime()
    write_random_release(_config(small), directory, shard_bytes, torch.bfloat16)


def measure(argv: list[str]) -> dict:
    import psutil

    from megatron_v2pe.convert.cli import main

    _runtime()
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(code)
    return {"growth": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before, "seconds": seconds}


def _child(*args: str) -> str:
    done = subprocess.run([sys.executable, __file__, *args], check=False, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"child {args[:2]} failed:\n{done.stderr[-4000:]}")
    return done.stdout


def _sizes(directory: Path) -> tuple[int, int, int]:
    """Total bytes, largest safetensors file, largest transformer layer."""
    from megatron_v2pe.convert.safetensors_io import SafetensorsSource

    source, layers, total = SafetensorsSource(directory), defaultdict(int), 0
    for name, shape in source.shapes().items():
        size = shape.numel() * 2  # bf16
        total += size
        match = re.match(r"(.*\.layers?\.\d+)\.", name)
        if match:
            layers[match[1]] += size
    largest = max(p.stat().st_size for p in directory.glob("*.safetensors"))
    return total, largest, max(layers.values())


def run(small: bool, shard_mib: int, workdir: Path) -> None:
    from common import machine_description, print_table

    shard = shard_mib * 2**20
    hf, megatron, exported = workdir / "hf", workdir / "megatron", workdir / "exported"
    start = time.perf_counter()
    _child("--child", "prepare", str(hf), str(int(small)), str(shard))
    print(f"random model written in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    runs = [
        (
            "HF -> Megatron",
            hf,
            ["hf-to-megatron", "--hf-layout", "hf", "--input", str(hf), "--output", str(megatron)],
        ),
        (
            "Megatron -> HF",
            exported,
            [
                "megatron-to-hf",
                "--hf-layout",
                "hf",
                "--input",
                str(megatron),
                "--output",
                str(exported),
                "--max-shard-size",
                str(shard),
            ],
        ),
    ]
    rows = []
    for label, hf_side, argv in runs:
        result = json.loads(_child("--child", "measure", *argv).splitlines()[-1])
        total, largest, layer = _sizes(hf_side)
        bound = 1.5 * (largest + layer)
        mib = lambda b: f"{b / 2**20:,.0f}"
        rows.append(
            [
                label,
                mib(total),
                mib(largest),
                mib(layer),
                mib(result["growth"]),
                mib(bound),
                f"{result['growth'] / bound:.2f}",
                f"{result['seconds']:.1f}",
            ]
        )
    name = "InternVL2-2B shapes" + (" (6+6 layers)" if small else "") + ", bf16, random weights"
    print(f"machine: {machine_description()}\n")
    print_table(
        f"Checkpoint conversion memory: {name}",
        [
            "direction",
            "model MiB",
            "largest shard MiB",
            "largest layer MiB",
            "peak RSS growth MiB",
            "target 1.5x(shard+layer) MiB",
            "growth / target",
            "seconds",
        ],
        rows,
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        if sys.argv[2] == "prepare":
            prepare(Path(sys.argv[3]), bool(int(sys.argv[4])), int(sys.argv[5]))
        else:
            print(json.dumps(measure(sys.argv[3:])))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="6 + 6 layers instead of 24 + 24")
    parser.add_argument("--shard-size-mib", type=int, default=1024)
    parser.add_argument("--workdir", type=Path, help="where the checkpoints go (default: a temporary one)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="convert_memory."))
    try:
        run(args.small, args.shard_size_mib, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
