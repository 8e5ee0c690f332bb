"""MM-NIAH inputs read into ``NiahRecord``s: the released jsonl files and our synthetic shards.

The released jsonl (OpenGVLab/MM-NIAH, one object a line): ``id``; ``images_list``, the paths (relative to
the image root) of the images of ``context`` and ``question``, one per ``<image>``, in order;
``context``, the haystack; ``question``; ``answer``, a 0-based option number (multiple choice), a list of
counts (counting; possibly as JSON text) or a text; ``meta`` with ``placed_depth`` (a depth in [0, 1] or
one per needle), ``context_length`` (tokens of the haystack, text and images), ``needles`` (the needles'
texts or image paths), ``choices`` (text options or null) and ``choices_image_path`` (image options or
null; these images are not in ``images_list``). The task comes from the file name
(``retrieval-text.jsonl``, ``counting-image-val.jsonl``) or is given.

Our synthetic shards (``data/long_context_synth.py``, family ``mmniah``): the human turn is the prompt,
``metadata`` holds ``task``, ``depths``, ``context_tokens`` and ``answer``; other families are skipped
(counted).
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_v2pe.data.shards import iter_groups, unpack_sample
from megatron_v2pe.data.skips import BadSample
from megatron_v2pe.data.source import expand_urls
from megatron_v2pe.eval.mmniah.prompts import OPTION_LETTERS, TILES_PER_IMAGE, Protocol, official_prompt
from megatron_v2pe.eval.scoring import TASK_KINDS

Answer = str | int | list[int]


@dataclass(frozen=True)
class NiahRecord:
    """One evaluation sample, whichever format it came from.

    ``prompt``: the user text, every ``<image>`` standing for the next of ``images`` (encoded bytes);
    ``answer``: a 0-based option number, a list of counts or a text; ``depths``: every needle's depth
    in [0, 1]; ``meta_length``: the context length the source records (None when it records none);
    ``tiles_per_image``: the most tiles of one image (the protocol's: 1 for MM-NIAH's own evaluation),
    None to tile within the sample's budget as training does."""

    id: str
    task: str
    prompt: str
    images: list[bytes]
    answer: Answer
    depths: tuple[float, ...]
    meta_length: int | None = None
    source: str = ""
    needles: tuple[str, ...] = ()
    tiles_per_image: int | None = None

    @property
    def answer_text(self) -> str:
        """The answer as the model should write it: an option letter, ``[1, 2]`` or the text."""
        if TASK_KINDS[self.task] == "choice":
            return OPTION_LETTERS[int(self.answer)]
        return json.dumps(self.answer) if isinstance(self.answer, list) else str(self.answer)


def task_name(name: str) -> str:
    """The task a name or file name names: ``retrieval-text``, ``retrieval_text``,
    ``retrieval-text-needle``, ``counting-image-val.jsonl`` ..."""
    text = name.lower().replace("_", "-")
    for task in TASK_KINDS:
        if re.search(rf"(^|[^a-z]){re.escape(task)}($|[^a-z])", text):
            return task
    raise ValueError(
        f"cannot tell the MM-NIAH task from {name!r}; expected one of {list(TASK_KINDS)} (pass --task)"
    )


def _depths(value: Any, where: str) -> tuple[float, ...]:
    depths = value if isinstance(value, list | tuple) else [value]
    if not depths or not all(isinstance(d, int | float) and not isinstance(d, bool) for d in depths):
        raise ValueError(f"{where}: needle depth must be a number or a non-empty list, got {value!r}")
    if not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"{where}: needle depths {depths} are not all in [0, 1]")
    return tuple(float(d) for d in depths)


def _counts(value: Any, where: str) -> list[int]:
    """A counting answer: a list of integers, or its JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if not isinstance(value, list) or not value or not all(type(v) is int for v in value):
        raise ValueError(f"{where}: counting answer must be a non-empty list of integers, got {value!r}")
    return value


def _option(value: Any, options: int, where: str) -> int:
    """A multiple-choice answer: a 0-based option number (MM-NIAH) or an option letter (our shards)."""
    if isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in OPTION_LETTERS:
        value = OPTION_LETTERS.index(value.strip().upper())
    if type(value) is not int or not 0 <= value < options:
        raise ValueError(f"{where}: answer {value!r} names none of the {options} options")
    return value


def parse_answer(task: str, value: Any, where: str, options: int = len(OPTION_LETTERS)) -> Answer:
    """The answer of a task, checked: its kind must fit the task's rule."""
    kind = TASK_KINDS[task]
    if kind == "counting":
        return _counts(value, where)
    if kind == "choice":
        return _option(value, options, where)
    if isinstance(value, bool) or not isinstance(value, str | int | float) or not str(value).strip():
        raise ValueError(f"{where}: free-text answer must be a non-empty text, got {value!r}")
    return str(value)


def read_mmniah_jsonl(
    path: str | Path,
    task: str | None = None,
    image_root: str | Path | None = None,
    protocol: Protocol = "mmniah",
) -> Iterator[NiahRecord]:
    """The records of an MM-NIAH jsonl file, prompts as ``protocol`` builds them; ``task`` defaults to
    the one its file name names."""
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
            yield _mmniah_record(item, task, root, where, protocol)


def _image_bytes(paths: Sequence[str], root: Path, where: str) -> list[bytes]:
    images = []
    for p in paths:
        file = Path(p) if os.path.isabs(p) else root / p
        if not file.is_file():
            raise FileNotFoundError(f"{where}: image {file} not found (set --image-root)")
        images.append(file.read_bytes())
    return images


def _mmniah_record(item: Any, task: str, root: Path, where: str, protocol: Protocol) -> NiahRecord:
    if not isinstance(item, dict):
        raise TypeError(f"{where}: expected a JSON object, got {type(item).__name__}")
    missing = [k for k in ("context", "question", "answer", "meta") if k not in item]
    meta = item.get("meta")
    if missing or not isinstance(meta, dict) or "placed_depth" not in meta:
        raise ValueError(
            f"{where}: not an MM-NIAH record (it needs context, question, answer and meta.placed_depth)"
        )
    choices, choice_images = meta.get("choices") or [], meta.get("choices_image_path") or []
    if choices and choice_images:
        raise ValueError(f"{where}: meta has both text choices and choices_image_path")
    images = list(item.get("images_list") or [])
    text = str(item["context"]), str(item["question"])
    prompt = official_prompt(*text, choices, len(choice_images), protocol, isinstance(item["answer"], list))
    if prompt.count("<image>") != len(images) + len(choice_images):
        raise ValueError(
            f"{where}: {prompt.count('<image>')} <image> placeholders but {len(images)} images_list entries "
            f"and {len(choice_images)} image options"
        )
    length = meta.get("context_length")
    options = len(choices) or len(choice_images) or len(OPTION_LETTERS)
    return NiahRecord(
        id=str(item.get("id", where)),
        task=task,
        prompt=prompt,
        images=_image_bytes(images + list(choice_images), root, where),
        answer=parse_answer(task, item["answer"], where, options),
        depths=_depths(meta["placed_depth"], where),
        meta_length=int(length) if isinstance(length, int | float) else None,
        source=where,
        needles=tuple(str(n) for n in meta.get("needles") or ()),
        tiles_per_image=TILES_PER_IMAGE[protocol],
    )


@dataclass
class ShardReadStats:
    read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # family -> count


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
            task = task_name(str(meta["task"]))
            length = meta.get("context_tokens")
            stats.read += 1
            yield NiahRecord(
                id=group.key,
                task=task,
                prompt=next(t["value"] for t in record["conversations"] if t["from"] in ("human", "user")),
                images=list(images),
                answer=parse_answer(task, meta["answer"], where),
                depths=_depths(meta["depths"], where),
                meta_length=int(length) if isinstance(length, int | float) else None,
                source=where,
            )


def read_records(
    data: Sequence[str | Path],
    task: str | None = None,
    image_root: str | Path | None = None,
    stats: ShardReadStats | None = None,
    protocol: Protocol = "mmniah",
) -> list[NiahRecord]:
    """Records of every input: ``.jsonl`` files (MM-NIAH, prompts as ``protocol`` builds them) or shard
    specs (directories, globs, ``.tar``)."""
    records: list[NiahRecord] = []
    for item in data:
        text = str(item)
        jsonl = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
        if jsonl and all(p.endswith(".jsonl") for p in jsonl):
            for p in jsonl:
                records += read_mmniah_jsonl(p, task, image_root, protocol)
        else:
            records += read_synth_shards(text, stats)
    if not records:
        raise ValueError(f"no MM-NIAH samples in {[str(d) for d in data]}")
    return records
