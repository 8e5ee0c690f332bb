"""MM-NIAH scoring rules and their aggregation (V2PE.md §6).

Six tasks = {retrieval, counting, reasoning} × {text needle, image needle}. Image-needle retrieval and
reasoning are multiple choice, counting answers are lists, text-needle retrieval and reasoning are free
text. Scores are binned by context length and needle depth (5 bins of 0.2): a task's score for one
length bin is the mean over its depth bins, so every depth weighs the same however many samples it has.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

AnswerKind = Literal["choice", "counting", "free"]

TASK_KINDS: dict[str, AnswerKind] = {
    "retrieval-text-needle": "free",
    "counting-text-needle": "counting",
    "reasoning-text-needle": "free",
    "retrieval-image-needle": "choice",
    "counting-image-needle": "counting",
    "reasoning-image-needle": "choice",
}
DEPTH_BINS = 5


def parse_choice(response: str, letters: str = "ABCD") -> str | None:
    """The option letter a response names, or None unless it is exactly one letter once "the answer is",
    `*` and everything from the first '.' on are removed (surrounding spaces and brackets too)."""
    text = re.sub(r"the answer is\s*:?", "", response.replace("*", ""), flags=re.IGNORECASE)
    text = text.split(".", 1)[0].strip().strip("()[]").strip()
    return text.upper() if len(text) == 1 and text.upper() in letters.upper() else None


def score_choice(response: str, answer: str, letters: str = "ABCD") -> float:
    return float(parse_choice(response, letters) == answer.strip().upper())


def parse_list(response: str) -> list[int] | None:
    """The integers of the first [...] in the response, or of the whole response when it has none."""
    bracketed = re.search(r"\[([^\]]*)\]", response)
    numbers = re.findall(r"-?\d+", bracketed.group(1) if bracketed else response)
    return [int(n) for n in numbers] if numbers or bracketed else None


def score_counting(response: str, answer: Sequence[int]) -> float:
    """Fraction of the answer's positions where the parsed list holds the same count."""
    if not answer:
        raise ValueError("a counting answer needs at least one count")
    predicted = parse_list(response) or []
    return sum(p == a for p, a in zip(predicted, answer)) / len(answer)


def normalise(text: str) -> str:
    """Lower case, punctuation to spaces, runs of whitespace to one space."""
    text = text.lower().translate(str.maketrans(string.punctuation, " " * len(string.punctuation)))
    return " ".join(text.split())


def score_free(response: str, answer: str) -> float:
    """1 for a normalised exact match or when the answer appears in the response as whole words."""
    said, gold = normalise(response), normalise(answer)
    if not gold:
        raise ValueError(f"free-text answer {answer!r} is empty after normalisation")
    return float(said == gold or f" {gold} " in f" {said} ")


def score_response(task: str, response: str, answer: str | Sequence[int]) -> float:
    """The score in [0, 1] of one response under its task's rule."""
    kind = TASK_KINDS.get(task)
    if kind is None:
        raise ValueError(f"unknown MM-NIAH task {task!r}; expected one of {sorted(TASK_KINDS)}")
    if kind == "counting":
        return score_counting(response, answer)
    if not isinstance(answer, str):
        raise TypeError(f"task {task!r} needs a text answer, got {answer!r}")
    return score_choice(response, answer) if kind == "choice" else score_free(response, answer)


@dataclass(frozen=True)
class Scored:
    """One scored sample: its task, context length (tokens), needle depth in [0, 1] and score."""

    task: str
    context_length: int
    depth: float
    score: float


def depth_bin(depth: float) -> int:
    """Bin 0..4 of a needle depth: [0, 0.2), …, [0.8, 1] (1.0 goes to the last bin)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"needle depth must lie in [0, 1], got {depth}")
    return min(int(round(depth * DEPTH_BINS, 9)), DEPTH_BINS - 1)


def length_bin(length: int, edges: Sequence[int]) -> int:
    """Index i of the bin edges[i] <= length < edges[i + 1] (the last bin is open-ended)."""
    if not edges or length < edges[0]:
        raise ValueError(f"context length {length} is below the first length bin edge {list(edges)[:1]}")
    return sum(length >= e for e in edges) - 1


@dataclass(frozen=True)
class Report:
    """``cells[task][length_bin][depth_bin]``: mean score of the samples there (the heatmap);
    ``per_length[task][length_bin]``: mean over the non-empty depth bins; ``per_task``: mean over length
    bins; ``overall``: mean over the tasks."""

    cells: dict[str, dict[int, dict[int, float]]]
    per_length: dict[str, dict[int, float]]
    per_task: dict[str, float]
    overall: float


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


def aggregate(samples: Iterable[Scored], length_edges: Sequence[int]) -> Report:
    """Bin scored samples by task, length and depth and average as MM-NIAH does."""
    grouped: dict[str, dict[int, dict[int, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for s in samples:
        if s.task not in TASK_KINDS:
            raise ValueError(f"unknown MM-NIAH task {s.task!r}; expected one of {sorted(TASK_KINDS)}")
        grouped[s.task][length_bin(s.context_length, length_edges)][depth_bin(s.depth)].append(s.score)
    if not grouped:
        raise ValueError("no scored samples to aggregate")
    cells = {
        t: {lb: {db: _mean(v) for db, v in sorted(d.items())} for lb, d in sorted(ls.items())}
        for t, ls in grouped.items()
    }
    per_length = {t: {lb: _mean(d.values()) for lb, d in ls.items()} for t, ls in cells.items()}
    per_task = {t: _mean(ls.values()) for t, ls in per_length.items()}
    return Report(cells, per_length, per_task, _mean(per_task.values()))
