"""Small datasets for the data-pipeline tests: numbered items whose answers name them, so that a pack
can be traced back to the samples in it."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import numpy as np
from PIL import Image

from megatron_v2pe.batch import IGNORE_INDEX, PackedBatch
from megatron_v2pe.data.shards import ShardWriter
from megatron_v2pe.data.tokenizer import Tokenizer

WORDS = "Describe item is fine what the image shows answer number red green blue circle square"


def png_bytes(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def item_images(i: int) -> list[tuple[int, int]]:
    """Sizes of item i's images: 0, 1 or 2 images of varying aspect ratio."""
    return [(40 + 9 * ((i + k) % 5), 30 + 13 * ((i + 2 * k) % 4)) for k in range(i % 3)]


def item_record(i: int) -> dict:
    placeholders = "<image>" * len(item_images(i))
    return {
        "conversations": [
            {"from": "human", "value": f"{placeholders}Describe item {i}."},
            {"from": "gpt", "value": f"Item {i} is fine."},
        ],
        "metadata": {"item": i},
    }


def write_items(directory: Path, items: Sequence[int], max_bytes: int = 6000) -> Path:
    """Shards of the numbered items (several shards: max_bytes is small); returns the manifest."""
    with ShardWriter(directory, max_bytes=max_bytes) as writer:
        for i in items:
            images = [("png", png_bytes(w, h, (i % 256, 80, 160))) for w, h in item_images(i)]
            writer.write(f"item{i:05d}", item_record(i), images)
    return directory / "manifest.json"


def write_tar(path: Path, members: Sequence[tuple[str, bytes]]) -> Path:
    """A tar written member by member, without ShardWriter, for shards damaged on purpose."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def item_members(i: int) -> list[tuple[str, bytes]]:
    record = json.dumps(item_record(i)).encode()
    images = [(f"item{i:05d}.{k}.png", png_bytes(w, h)) for k, (w, h) in enumerate(item_images(i))]
    return [(f"item{i:05d}.json", record), *images]


def subsample_items(batch: PackedBatch, tokenizer: Tokenizer) -> list[int]:
    """The item number of every sub-sample of a pack, read from its supervised labels."""
    items = []
    cu = batch.cu_seqlens_padded.tolist()
    for start, end in pairwise(cu):
        labels = batch.labels[start:end]
        text = tokenizer.decode(labels[labels != IGNORE_INDEX].tolist())
        match = re.fullmatch(r"Item (\d+) is fine\.<\|im_end\|>", text)
        assert match, f"unexpected supervised text {text!r}"
        items.append(int(match.group(1)))
    return items


def context_runs(tokens: np.ndarray, context_id: int) -> list[int]:
    """Lengths of the maximal runs of <IMG_CONTEXT> tokens, in order (counted directly)."""
    runs, length = [], 0
    for token in [*tokens.tolist(), None]:
        if token == context_id:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    return runs


def load_tool(name: str):
    """A script of tools/ as a module (tools/ is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"tools_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
