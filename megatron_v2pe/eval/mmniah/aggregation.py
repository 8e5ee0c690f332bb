"""Scores binned by context length and needle depth, and averaged into MM-NIAH's numbers.

``official`` binning (the default) is MM-NIAH's ``calculate_scores.py``: a sample's depth is the mean
of its needles' depths, its length the context length the record states; length bins are fixed
(``[1000, 2000), [2000, 4000), ..., [48000, 64000), [64000, inf)``) and samples under 1,000 tokens are
dropped (counted); a cell is the mean score of its samples; a length bin's score is the mean over all 5
depth bins, an empty cell counting 0; a task's score is the mean over all 11 length bins, an empty one
counting 0; the overall score is the mean over the tasks (image / text: over the image- / text-needle
tasks, the paper's columns).

``adaptive`` binning: a sample's depth is its first (smallest) needle depth; length bins are powers of
two covering the data (or the edges given); empty cells and empty length bins are left out of every
mean; a sample below the first edge is an error.

Depth bins are fifths. Official (and v2pe): ``int(depth / 0.2)`` with 1.0 moved to 0.99, so a depth of exactly
0.6 lands in bin 2 (``0.6 / 0.2 = 2.9999999999999996``); strict: the floor of ``depth * 5`` rounded to
9 decimals (0.6 -> bin 3), 1.0 in the last bin.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from megatron_v2pe.eval.answer_normaliser import Mode
from megatron_v2pe.eval.scoring import TASK_KINDS

Binning = Literal["official", "adaptive"]
BINNINGS: tuple[Binning, ...] = ("official", "adaptive")
OFFICIAL_LENGTH_EDGES = (1000, 2000, 4000, 8000, 12000, 16000, 24000, 32000, 40000, 48000, 64000)
DEPTH_BINS = 5


@dataclass(frozen=True)
class Scored:
    """One scored sample: its task, context length (tokens), needle depths in [0, 1] and score."""

    task: str
    context_length: int
    depths: Sequence[float]
    score: float


def sample_depth(depths: Sequence[float], binning: Binning = "official") -> float:
    """The depth a sample is binned by: the mean of its needles' (official) or the smallest."""
    if not depths:
        raise ValueError("a sample needs at least one needle depth")
    return sum(depths) / len(depths) if binning == "official" else min(depths)


def depth_bin(depth: float, mode: Mode = "official") -> int:
    """Bin 0..4 of a depth in [0, 1] (see the module docstring for the two modes)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"needle depth must lie in [0, 1], got {depth}")
    if mode != "strict":
        return int((0.99 if depth == 1.0 else depth) / 0.2)
    return min(math.floor(round(depth * DEPTH_BINS, 9)), DEPTH_BINS - 1)


def length_bin(length: int, edges: Sequence[int]) -> int | None:
    """Index i of the bin edges[i] <= length < edges[i + 1] (the last one open), None below edges[0]."""
    if length < edges[0]:
        return None
    return sum(length >= e for e in edges) - 1


def default_length_edges(lengths: Iterable[int], binning: Binning = "official") -> list[int]:
    """Official: MM-NIAH's fixed edges. Adaptive: powers of two from the shortest length's down to the
    longest's."""
    if binning == "official":
        return list(OFFICIAL_LENGTH_EDGES)
    lengths = list(lengths)
    low = 2 ** math.floor(math.log2(max(1, min(lengths))))
    edges = [low]
    while edges[-1] * 2 <= max(lengths):
        edges.append(edges[-1] * 2)
    return edges


@dataclass(frozen=True)
class Report:
    """Per task: ``cells[task][length_bin][depth_bin]`` mean score (None: no sample), ``counts`` the
    same shape, ``per_length[task][length_bin]`` (None: left out), ``per_task``; across tasks:
    ``mean_per_length``, ``overall`` and ``by_needle`` (``image``, ``text``: means of those tasks);
    ``dropped``: samples below the first length edge (official binning)."""

    tasks: list[str]
    cells: dict[str, list[list[float | None]]]
    counts: dict[str, list[list[int]]]
    per_length: dict[str, list[float | None]]
    per_task: dict[str, float]
    mean_per_length: list[float | None]
    overall: float
    by_needle: dict[str, float]
    dropped: int


def _mean(values: Iterable[float | None], binning: Binning) -> float | None:
    """Official: None counts 0; adaptive: None is left out (None when nothing is left)."""
    values = [0.0 if v is None else v for v in values] if binning == "official" else list(values)
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _bin(samples: Iterable[Scored], edges: Sequence[int], binning: Binning, mode: Mode):
    """(score sums, counts, dropped) per task, length bin and depth bin."""
    sums: dict[str, list[list[float]]] = {}
    counts: dict[str, list[list[int]]] = {}
    dropped = 0
    for s in samples:
        if s.task not in TASK_KINDS:
            raise ValueError(f"unknown MM-NIAH task {s.task!r}; expected one of {list(TASK_KINDS)}")
        lb = length_bin(s.context_length, edges)
        if lb is None and binning == "official":
            dropped += 1
            continue
        if lb is None:
            raise ValueError(f"context length {s.context_length} is below the first length bin ({edges[0]})")
        db = depth_bin(sample_depth(s.depths, binning), mode)
        for table in (sums, counts):
            table.setdefault(s.task, [[0] * DEPTH_BINS for _ in edges])
        sums[s.task][lb][db] += s.score
        counts[s.task][lb][db] += 1
    return sums, counts, dropped


def aggregate(
    samples: Iterable[Scored],
    length_edges: Sequence[int],
    binning: Binning = "official",
    mode: Mode = "official",
) -> Report:
    """Bin scored samples by task, length and depth and average them (module docstring)."""
    edges = sorted(int(e) for e in length_edges)
    if not edges:
        raise ValueError("need at least one length bin edge")
    sums, counts, dropped = _bin(samples, edges, binning, mode)
    if not counts:
        raise ValueError(
            f"no sample reaches the first length bin ({edges[0]} tokens; {dropped} dropped): "
            "use --binning adaptive or lower --length-bins"
        )
    tasks = [t for t in TASK_KINDS if t in counts]
    cells = {
        t: [[s / n if n else None for s, n in zip(srow, nrow)] for srow, nrow in zip(sums[t], counts[t])]
        for t in tasks
    }
    per_length = {t: [_mean(row, binning) for row in cells[t]] for t in tasks}
    per_task = {t: _mean(per_length[t], binning) for t in tasks}
    mean_per_length = [_mean((per_length[t][lb] for t in tasks), binning) for lb in range(len(edges))]
    by_needle = {
        needle: sum(per_task[t] for t in group) / len(group)
        for needle in ("image", "text")
        if (group := [t for t in tasks if t.endswith(needle)])
    }
    overall = sum(per_task.values()) / len(tasks)
    return Report(tasks, cells, counts, per_length, per_task, mean_per_length, overall, by_needle, dropped)
