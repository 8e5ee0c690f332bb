"""What is checked before anything is written; every problem is collected, then raised as one error."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from megatron_v2pe.errors import UsageError


class ConversionError(UsageError):
    """Everything wrong with one conversion's input, listed at once (one problem: on one line)."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        if len(problems) == 1:
            super().__init__(f"cannot convert {source}: {problems[0]}; nothing was written")
            return
        listing = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"cannot convert {source}: {len(problems)} problem(s); nothing was written\n{listing}"
        )


def tensor_problems(
    found: Mapping[str, torch.Size], expected: Mapping[str, torch.Size], ignored: Iterable[str] = ()
) -> list[str]:
    """Missing tensors, unexpected tensors and shape mismatches between a checkpoint and a table."""
    ignored = set(ignored)
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected and n not in ignored]
    mismatched = [n for n in expected if n in found and tuple(found[n]) != tuple(expected[n])]
    return (
        [f"missing tensor {n} (shape {tuple(expected[n])})" for n in missing]
        + [f"unexpected tensor {n} (shape {tuple(found[n])})" for n in unexpected]
        + [
            f"shape mismatch {n}: {tuple(found[n])} in the checkpoint, {tuple(expected[n])} expected"
            for n in mismatched
        ]
    )
