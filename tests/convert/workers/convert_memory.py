"""Peak memory of one conversion, measured in this process (run as a child of the test / benchmark).

    convert_memory.py prepare DIR LAYERS HIDDEN SHARD_BYTES   # random HF-native model, written shard by shard
    convert_memory.py measure ARGS...                        # v2pe-convert-checkpoint ARGS...

``measure`` prints one JSON line: the growth of peak RSS over the RSS after imports (``ru_maxrss`` is the
process's lifetime peak, so this over- rather than under-states what the conversion added), the seconds,
and the sizes that bound it (largest safetensors file, largest layer).
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

from megatron_v2pe.model.presets import tiny


def config(layers: int, hidden: int):
    base = tiny()
    return dataclasses.replace(
        base,
        vision=dataclasses.replace(
            base.vision,
            num_layers=layers,
            hidden_size=hidden,
            num_attention_heads=8,
            ffn_hidden_size=4 * hidden,
        ),
        language=dataclasses.replace(
            base.language,
            num_layers=layers,
            hidden_size=hidden,
            num_attention_heads=8,
            num_query_groups=4,
            ffn_hidden_size=4 * hidden,
            vocab_size=4096,
        ),
        name="memory",
    )


def _runtime() -> None:
    from megatron_v2pe.parallel import initialize

    initialize(seed=0)


def prepare(directory: Path, layers: int, hidden: int, shard_bytes: int) -> None:
    from megatron_v2pe.convert.random_release import write_random_release

    _runtime()
    write_random_release(config(layers, hidden), directory, shard_bytes, torch.float32)


def _largest_file(directory: Path, suffix: str) -> int:
    return max((p.stat().st_size for p in directory.rglob(f"*{suffix}")), default=0)


def _status() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon", "RssFile", "RssShmem")):
            name, value = line.split(":")
            fields[name] = int(value.split()[0]) * 1024
    return fields


class _Sampler(threading.Thread):
    """Peak anonymous and file-backed RSS, sampled every millisecond (what ``ru_maxrss`` does not split)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak: dict[str, int] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.001):
            for k, v in _status().items():
                self.peak[k] = max(self.peak.get(k, 0), v)


def measure(argv: list[str]) -> dict:
    from megatron_v2pe.convert.cli import main

    _runtime()
    before = psutil.Process().memory_info().rss
    status_before = _status()
    sampler = _Sampler()
    sampler.start()
    start = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - start
    sampler.done.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if code != 0:
        raise SystemExit(code)
    hf_dir = Path(argv[argv.index("--input" if argv[0] == "hf-to-megatron" else "--output") + 1])
    return {
        "growth": peak - before,
        **{f"{k}_growth": v - status_before[k] for k, v in sampler.peak.items()},
        "seconds": seconds,
        "largest_shard": _largest_file(hf_dir, ".safetensors"),
        "total": sum(p.stat().st_size for p in hf_dir.glob("*.safetensors")),
    }


if __name__ == "__main__":
    if sys.argv[1] == "prepare":
        prepare(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        print(json.dumps(measure(sys.argv[2:])))
