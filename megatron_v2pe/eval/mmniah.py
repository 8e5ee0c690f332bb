"""The MM-NIAH evaluation harness: records -> prompts -> responses -> scores -> length x depth report.

Two inputs become one ``NiahRecord``:

- MM-NIAH's jsonl (OpenGVLab): one object per line with ``id``, ``images_list`` (paths, relative to the
  file's directory unless an image root is given), ``context`` (text with ``<image>`` placeholders),
  ``question``, ``answer``, ``meta`` {``placed_depth``, ``context_length``, ...} and, for multiple choice,
  ``choices`` (option texts) or ``choices_image_list`` (option images). The task comes from the file name
  (``retrieval-text-val.jsonl``) or is given explicitly.
- Our synthetic shards (``data/long_context_synth.py``, family ``mmniah``): the human turn is the prompt,
  ``metadata`` holds ``task`` (``retrieval-text`` ...), ``depths``, ``context_tokens`` and ``answer``.
  Samples of the other families are skipped (counted).

A prompt is rendered by the training pipeline's own ``SampleBuilder`` (chat template, InternVL tiling,
``<image>`` -> ``<img>`` + tokens_per_tile x tiles ``<IMG_CONTEXT>`` + ``</img>``) with the gold answer as
the assistant turn, then cut just before the answer: the model sees exactly the layout it was trained on,
and the cut-off tail is the gold answer for teacher-forced scoring.

Scores follow ``eval/scoring.py``: a sample's depth is its first (smallest) needle depth, its length the
prompt's token count (or the length its metadata records), and ``aggregate`` bins them.
"""

from __future__ import annotations

import ast
import glob
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from megatron_v2pe.data.batch import IGNORE_INDEX
from megatron_v2pe.data.images import TilingConfig, normalize_tiles
from megatron_v2pe.data.sample import SampleBuilder, SampleConfig, TokenizedSample
from megatron_v2pe.data.shards import iter_groups, unpack_sample
from megatron_v2pe.data.skips import BadSample
from megatron_v2pe.data.source import expand_urls
from megatron_v2pe.data.tokenizer import IM_END, Tokenizer
from megatron_v2pe.eval.scoring import DEPTH_BINS, TASK_KINDS, Report, Scored, aggregate, score_response

OPTION_LETTERS = "ABCD"
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
LengthSource = Literal["tokens", "meta"]


# --------------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class NiahRecord:
    """One evaluation sample, whichever format it came from.

    ``prompt``: the user text, every ``<image>`` standing for the next of ``images`` (encoded bytes);
    ``task``: a scoring task name (``retrieval-text-needle`` ...); ``answer``: an option letter, a text or a
    list of counts; ``depth``: the first needle's depth in [0, 1]; ``meta_length``: the context length
    the source records (None when it records none)."""

    id: str
    task: str
    prompt: str
    images: list[bytes]
    answer: str | list[int]
    depth: float
    meta_length: int | None = None
    source: str = ""

    @property
    def answer_text(self) -> str:
        """The answer as the model should write it."""
        return self.answer if isinstance(self.answer, str) else str(list(self.answer))


def task_name(name: str) -> str:
    """The scoring name of a task: ``retrieval-text``, ``retrieval_text``, ``retrieval-text-needle`` or a
    file name containing one of them (``counting-image-val.jsonl``)."""
    text = name.lower().replace("_", "-")
    for task in TASK_KINDS:
        short = task.removesuffix("-needle")
        if task in text or re.search(rf"(^|[^a-z]){re.escape(short)}($|[^a-z])", text):
            return task
    raise ValueError(
        f"cannot tell the MM-NIAH task from {name!r}; expected one of "
        f"{sorted(t.removesuffix('-needle') for t in TASK_KINDS)} (pass it with --task)"
    )


def _depth(value: Any, where: str) -> float:
    """The first (smallest) needle depth of a depth or a list of depths."""
    depths = value if isinstance(value, list | tuple) else [value]
    if not depths or not all(isinstance(d, int | float) for d in depths):
        raise ValueError(f"{where}: needle depth must be a number or a non-empty list, got {value!r}")
    depth = float(min(depths))
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"{where}: needle depth {depth} is outside [0, 1]")
    return depth


def _counts(value: Any, where: str) -> list[int]:
    """A counting answer: a list of ints, or its text (``"[1, 2]"``)."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ValueError(f"{where}: counting answer {value!r} is not a list of numbers") from None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list | tuple) or not value or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{where}: counting answer must be a non-empty list of integers, got {value!r}")
    return [int(v) for v in value]


def _choice_letter(answer: Any, choices: Sequence[Any], where: str) -> str:
    """The option letter of a multiple-choice answer given as a letter, an index or the option itself."""
    n = len(choices) if choices else len(OPTION_LETTERS)
    letters = OPTION_LETTERS[:n]
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < n:
        return letters[answer]
    if isinstance(answer, str):
        text = answer.strip()
        if len(text) == 1 and text.upper() in letters:
            return text.upper()
        if text.isdigit() and int(text) < n:
            return letters[int(text)]
        if text in [str(c) for c in choices]:
            return letters[[str(c) for c in choices].index(text)]
    raise ValueError(f"{where}: answer {answer!r} names none of the {n} options")


def _answer(task: str, value: Any, choices: Sequence[Any], where: str) -> str | list[int]:
    kind = TASK_KINDS[task]
    if kind == "counting":
        return _counts(value, where)
    if kind == "choice":
        return _choice_letter(value, choices, where)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str | int | float) or isinstance(value, bool) or not str(value).strip():
        raise ValueError(f"{where}: free-text answer must be a non-empty text, got {value!r}")
    return str(value)


def read_mmniah_jsonl(
    path: str | Path, task: str | None = None, image_root: str | Path | None = None
) -> Iterator[NiahRecord]:
    """The records of an MM-NIAH jsonl file; ``task`` defaults to the one its file name names."""
    path = Path(path)
    task = task_name(task or path.name)
    root = Path(image_root) if image_root is not None else path.parent
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not JSON ({err})") from None
            yield _mmniah_record(item, task, root, where)


def _mmniah_record(item: Any, task: str, root: Path, where: str) -> NiahRecord:
    if not isinstance(item, dict):
        raise TypeError(f"{where}: expected a JSON object, got {type(item).__name__}")
    missing = [k for k in ("context", "question", "answer") if k not in item]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    meta = item.get("meta") or {}
    context, question = str(item["context"]), str(item["question"])
    image_paths = list(item.get("images_list") or [])
    choices = list(item.get("choices") or [])
    choice_images = list(item.get("choices_image_list") or [])
    lines = [question]
    if choice_images:
        lines += [f"{OPTION_LETTERS[k]}. <image>" for k in range(len(choice_images))]
        choices = choice_images
    else:
        lines += [f"{OPTION_LETTERS[k]}. {c}" for k, c in enumerate(choices)]
    if TASK_KINDS[task] == "choice":
        lines.append(CHOICE_INSTRUCTION)
    prompt = context + "\n" + "\n".join(lines)
    paths = image_paths + choice_images
    if prompt.count("<image>") != len(paths):
        raise ValueError(f"{where}: {prompt.count('<image>')} <image> placeholders but {len(paths)} images")
    images = []
    for p in paths:
        file = Path(p) if os.path.isabs(p) else root / p
        if not file.is_file():
            raise FileNotFoundError(f"{where}: image {file} not found (set the image root)")
        images.append(file.read_bytes())
    if "placed_depth" not in meta:
        raise ValueError(f"{where}: meta has no placed_depth")
    length = meta.get("context_length")
    return NiahRecord(
        id=str(item.get("id", where)),
        task=task,
        prompt=prompt,
        images=images,
        answer=_answer(task, item["answer"], choices, where),
        depth=_depth(meta["placed_depth"], where),
        meta_length=int(length) if isinstance(length, int | float) else None,
        source=where,
    )


@dataclass
class ShardReadStats:
    read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # family or reason -> count


def read_synth_shards(spec: str | Sequence[str], stats: ShardReadStats | None = None) -> Iterator[NiahRecord]:
    """The MM-NIAH samples of our synthetic shards (a directory, glob, manifest or brace pattern);
    samples of other families are counted in ``stats.skipped``."""
    stats = stats if stats is not None else ShardReadStats()
    urls = expand_urls(spec)
    if not urls:
        raise FileNotFoundError(f"no shards match {spec!r}")
    for url in urls:
        for group in iter_groups(url):
            where = f"{url}:{group.key}"
            try:
                record, images = unpack_sample(group.members)
            except BadSample as err:
                raise ValueError(f"{where}: {err}") from err
            meta = record.get("metadata") or {}
            family = meta.get("family", "unknown")
            if family != "mmniah":
                stats.skipped[family] = stats.skipped.get(family, 0) + 1
                continue
            turns = record["conversations"]
            prompt = next(t["value"] for t in turns if t["from"] in ("human", "user"))
            task = task_name(str(meta["task"]))
            length = meta.get("context_tokens")
            stats.read += 1
            yield NiahRecord(
                id=group.key,
                task=task,
                prompt=prompt,
                images=list(images),
                answer=_answer(task, meta["answer"], (), where),
                depth=_depth(meta["depths"], where),
                meta_length=int(length) if isinstance(length, int | float) else None,
                source=where,
            )


def read_records(
    data: Sequence[str | Path],
    task: str | None = None,
    image_root: str | Path | None = None,
    stats: ShardReadStats | None = None,
) -> list[NiahRecord]:
    """Records of every input: ``.jsonl`` files (MM-NIAH) or shard specs (directories, globs, ``.tar``)."""
    records: list[NiahRecord] = []
    for item in data:
        text = str(item)
        jsonl = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
        if jsonl and all(p.endswith(".jsonl") for p in jsonl):
            for p in jsonl:
                records += read_mmniah_jsonl(p, task, image_root)
        else:
            records += read_synth_shards(text, stats)
    if not records:
        raise ValueError(f"no MM-NIAH samples in {[str(d) for d in data]}")
    return records


# --------------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class BuiltPrompt:
    """A record's prompt tokens (ending with the assistant header), its tiles and the gold answer's
    tokens (the answer and the ``<|im_end|>`` closing it), as training would have laid them out."""

    tokens: np.ndarray
    tiles: np.ndarray  # uint8 [tiles, S, S, 3]
    answer_tokens: np.ndarray


def prompt_builder(
    tokenizer: Tokenizer, tokens_per_tile: int, tile_size: int, max_tiles: int = 6
) -> SampleBuilder:
    return SampleBuilder(
        tokenizer,
        SampleConfig(
            tokens_per_tile=tokens_per_tile, tiling=TilingConfig(tile_size=tile_size, max_tiles=max_tiles)
        ),
    )


def build_prompt(builder: SampleBuilder, record: NiahRecord) -> BuiltPrompt:
    conversation = {
        "conversations": [
            {"from": "human", "value": record.prompt},
            {"from": "gpt", "value": record.answer_text},
        ]
    }
    try:
        sample: TokenizedSample = builder.build(record.id, conversation, record.images)
    except BadSample as err:
        raise ValueError(f"{record.source}: cannot build the prompt ({err})") from err
    supervised = np.flatnonzero(sample.labels != IGNORE_INDEX)
    start, end = int(supervised[0]), int(supervised[-1]) + 1
    cut = sample.prefix(start)
    return BuiltPrompt(tokens=cut.tokens, tiles=cut.tiles, answer_tokens=sample.tokens[start:end])


# --------------------------------------------------------------------------------------------------
# Running and scoring


@dataclass(frozen=True)
class SampleResult:
    id: str
    task: str
    context_length: int
    prompt_tokens: int
    depth: float
    answer: str | list[int]
    response: str
    score: float


def _prompt(built: BuiltPrompt):
    from megatron_v2pe.eval.generation import Prompt

    pixels = normalize_tiles(built.tiles) if built.tiles.shape[0] else None
    return Prompt(built.tokens.tolist(), pixels)


def evaluate_records(
    model,
    tokenizer: Tokenizer,
    records: Sequence[NiahRecord],
    *,
    delta_policy: str | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 4,
    teacher_forced: bool = False,
    length_source: LengthSource = "tokens",
    max_tiles: int = 6,
    progress: Any = None,
    prefill_chunk: int | None = None,
) -> list[SampleResult]:
    """Run the model on every record (greedy generation, or one teacher-forced forward) and score it."""
    from megatron_v2pe.eval.generation import generate
    from megatron_v2pe.eval.teacher_forced import teacher_forced_correct

    config = model.vlm_config
    builder = prompt_builder(tokenizer, config.tokens_per_tile, config.vision.image_size, max_tiles)
    stop = [tokenizer.token_id(IM_END)]  # the chat template closes every answer with it
    results: list[SampleResult] = []
    for first in range(0, len(records), batch_size):
        batch = records[first : first + batch_size]
        built = [build_prompt(builder, r) for r in batch]
        prompts = [_prompt(b) for b in built]
        if teacher_forced:
            correct = teacher_forced_correct(
                model, prompts, [b.answer_tokens.tolist() for b in built], delta_policy=delta_policy,
                prefill_chunk=prefill_chunk,
            )
            responses = [r.answer_text if ok else "" for r, ok in zip(batch, correct)]
            scores = [float(ok) for ok in correct]
        else:
            out = generate(model, prompts, max_new_tokens, delta_policy=delta_policy, stop_tokens=stop,
                           prefill_chunk=prefill_chunk)
            responses = [tokenizer.decode([t for t in toks if t not in stop]).strip() for toks in out.tokens]
            scores = [score_response(r.task, text, r.answer) for r, text in zip(batch, responses)]
        for record, b, response, score in zip(batch, built, responses, scores):
            length = len(b.tokens)
            if length_source == "meta":
                if record.meta_length is None:
                    raise ValueError(f"{record.source}: no context length recorded; use the token count")
                length = record.meta_length
            results.append(
                SampleResult(
                    id=record.id,
                    task=record.task,
                    context_length=int(length),
                    prompt_tokens=len(b.tokens),
                    depth=record.depth,
                    answer=record.answer,
                    response=response,
                    score=float(score),
                )
            )
        if progress is not None:
            progress(len(results), len(records))
    return results


# --------------------------------------------------------------------------------------------------
# Report


def default_length_edges(lengths: Iterable[int]) -> list[int]:
    """Powers of two from the shortest length's down to the longest's: bins [2^k, 2^(k+1))."""
    lengths = list(lengths)
    low = 2 ** math.floor(math.log2(max(1, min(lengths))))
    edges = [low]
    while edges[-1] * 2 <= max(lengths):
        edges.append(edges[-1] * 2)
    return edges


def depth_labels() -> list[str]:
    return [f"{k / DEPTH_BINS:.1f}-{(k + 1) / DEPTH_BINS:.1f}" for k in range(DEPTH_BINS)]


def length_labels(edges: Sequence[int]) -> list[str]:
    return [f"{lo}-{edges[i + 1]}" if i + 1 < len(edges) else f">={lo}" for i, lo in enumerate(edges)]


def report_dict(results: Sequence[SampleResult], length_edges: Sequence[int]) -> dict[str, Any]:
    """The JSON-ready summary: dense [length bin][depth bin] matrices per task (None where empty),
    scores per length bin, per task and overall, sample counts, and every sample's result."""
    edges = sorted(int(e) for e in length_edges)
    report: Report = aggregate([Scored(r.task, r.context_length, r.depth, r.score) for r in results], edges)
    from megatron_v2pe.eval.scoring import depth_bin, length_bin

    n_len = len(edges)
    counts: dict[str, list[list[int]]] = {t: [[0] * DEPTH_BINS for _ in range(n_len)] for t in report.cells}
    for r in results:
        counts[r.task][length_bin(r.context_length, edges)][depth_bin(r.depth)] += 1
    tasks = [t for t in TASK_KINDS if t in report.cells]
    cells = {
        t: [[report.cells[t].get(lb, {}).get(db) for db in range(DEPTH_BINS)] for lb in range(n_len)]
        for t in tasks
    }
    per_length = {t: [report.per_length[t].get(lb) for lb in range(n_len)] for t in tasks}
    mean_per_length = []
    for lb in range(n_len):
        values = [per_length[t][lb] for t in tasks if per_length[t][lb] is not None]
        mean_per_length.append(sum(values) / len(values) if values else None)
    return {
        "length_edges": edges,
        "length_bins": length_labels(edges),
        "depth_bins": depth_labels(),
        "tasks": tasks,
        "overall": report.overall,
        "per_task": {t: report.per_task[t] for t in tasks},
        "per_length": per_length,
        "mean_per_length": mean_per_length,
        "cells": cells,
        "counts": {t: counts[t] for t in tasks},
        "samples": [asdict(r) for r in results],
    }


def plot_heatmap(summary: dict[str, Any], path: str | Path, title: str = "") -> None:
    """One length x depth heatmap per task (rows: length bins, columns: depth bins; blank = no sample)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = summary["tasks"]
    columns = min(3, len(tasks))
    rows = math.ceil(len(tasks) / columns)
    height = rows * (2.4 + 0.4 * len(summary["length_bins"]))
    figure, axes = plt.subplots(
        rows, columns, figsize=(4.4 * columns + 1.2, height), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[len(tasks) :]:
        ax.axis("off")
    image = None
    for ax, task in zip(axes.flat, tasks):
        matrix = np.array(
            [[np.nan if v is None else v for v in row] for row in summary["cells"][task]], dtype=float
        )
        image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="lower")
        for (i, j), value in np.ndenumerate(matrix):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
        ax.set_title(f"{task} ({summary['per_task'][task]:.2f})", fontsize=9)
        ax.set_xticks(range(len(summary["depth_bins"])), summary["depth_bins"], fontsize=7, rotation=45)
        ax.set_yticks(range(len(summary["length_bins"])), summary["length_bins"], fontsize=7)
        ax.set_xlabel("needle depth", fontsize=8)
        ax.set_ylabel("context length (tokens)", fontsize=8)
    if image is not None:
        figure.colorbar(image, ax=axes, shrink=0.8, label="score")
    figure.suptitle(title or f"MM-NIAH, overall {summary['overall']:.3f}", fontsize=10)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_accuracy_vs_length(summary: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Score per length bin: one line per task and their mean (bold)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(summary["length_bins"]))
    figure, ax = plt.subplots(figsize=(7, 4.2))
    for task in summary["tasks"]:
        y = np.array([np.nan if v is None else v for v in summary["per_length"][task]], dtype=float)
        ax.plot(x, y, marker="o", linewidth=1, label=task)
    mean = np.array([np.nan if v is None else v for v in summary["mean_per_length"]], dtype=float)
    ax.plot(x, mean, marker="s", linewidth=2.5, color="black", label="mean of tasks")
    ax.set_xticks(x, summary["length_bins"], rotation=30, fontsize=8)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or "MM-NIAH score vs context length", fontsize=10)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
