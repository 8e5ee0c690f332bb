"""Shared helpers for the benchmarks: name the machine, print results as markdown tables."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable


def _cpu_model() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else whatever the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _version(module_name: str) -> str | None:
    """A module's version if it can be imported; torch is heavy, so only import it here, on demand."""
    try:
        module = __import__(module_name)
    except (ImportError, OSError):
        return None
    return getattr(module, "__version__", "unknown")


def machine_description() -> str:
    """One line naming the CPU, core count and library versions, to print next to every result."""
    parts = [f"{_cpu_model()}, {os.cpu_count()} cores", f"python {platform.python_version()}"]
    for name in ("numpy", "torch"):
        version = _version(name)
        if version is not None:
            parts.append(f"{name} {version}")
    return "; ".join(parts)


def print_table(title: str, header: list[str], rows: list[list[object]], file=sys.stdout) -> None:
    """An aligned markdown table under a `### title` line."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    print(f"### {title}\n", file=file)
    print(line(cells[0]), file=file)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=file)
    for row in cells[1:]:
        print(line(row), file=file)
    print(file=file)


def median_ms(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median wall time of `fn` in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)
