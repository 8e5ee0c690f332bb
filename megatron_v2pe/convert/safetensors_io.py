"""Hugging Face checkpoint files, read and written one tensor at a time.

Reading goes through ``safe_open`` (memory-mapped, one tensor materialised per call), so a model larger than
the machine's memory can be read. Writing fills one shard at a time and flushes it when full. Every output
directory is assembled under a temporary name next to its destination and renamed only when complete.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer*",
    "*.model",
    "*.tiktoken",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "chat_template.*",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)
"""Files that travel with a model but hold no weights (tokenizer, chat template, image processor)."""


class SafetensorsSource:
    """The tensors of a Hugging Face model directory (``model.safetensors`` or shards + index JSON)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            self.files = json.loads(index.read_text())["weight_map"]
        elif (self.directory / SINGLE_FILE).is_file():
            with safe_open(self.directory / SINGLE_FILE, "pt") as f:
                self.files = dict.fromkeys(f.keys(), SINGLE_FILE)
        else:
            raise FileNotFoundError(f"{self.directory} holds neither {INDEX_FILE} nor {SINGLE_FILE}")
        self._open: dict[str, object] = {}

    def _handle(self, file: str):
        if file not in self._open:
            path = self.directory / file
            if not path.is_file():
                raise FileNotFoundError(f"{path} is named in {INDEX_FILE} but missing")
            self._open[file] = safe_open(path, "pt")
        return self._open[file]

    def shapes(self) -> dict[str, torch.Size]:
        """Every tensor's shape, from the file headers (no tensor is read)."""
        return {
            name: torch.Size(self._handle(file).get_slice(name).get_shape())
            for name, file in self.files.items()
        }

    def read(self, name: str) -> torch.Tensor:
        return self._handle(self.files[name]).get_tensor(name)


class ShardedWriter:
    """Writes tensors into ``model-0000k-of-0000n.safetensors`` shards of at most ``max_shard_bytes``
    (a single ``model.safetensors`` when one is enough) and the index JSON; one shard in memory at a time."""

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._shard: dict[str, torch.Tensor] = {}
        self._shard_bytes = 0
        self._written: list[tuple[str, list[str]]] = []  # (temporary file, names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._shard and self._shard_bytes + size > self.max_shard_bytes:
            self._flush()
        self._shard[name] = tensor.contiguous()
        self._shard_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        file = f"shard-{len(self._written):05d}.tmp"
        save_file(self._shard, str(self.directory / file), metadata={"format": "pt"})
        self._written.append((file, list(self._shard)))
        self._shard, self._shard_bytes = {}, 0

    def close(self) -> None:
        if self._shard:
            self._flush()
        if len(self._written) == 1:
            (self.directory / self._written[0][0]).rename(self.directory / SINGLE_FILE)
            return
        weight_map = {}
        for k, (file, names) in enumerate(self._written, start=1):
            final = f"model-{k:05d}-of-{len(self._written):05d}.safetensors"
            (self.directory / file).rename(self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


@contextlib.contextmanager
def atomic_directory(destination: str | Path) -> Iterator[Path]:
    """A fresh directory that becomes ``destination`` only if the block completes; on any error it is
    removed and ``destination`` is never created."""
    destination = Path(destination)
    if destination.exists():
        raise FileExistsError(f"{destination} already exists; choose a new output directory")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent))
    try:
        yield staging
        staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def copy_tokenizer_files(source: str | Path, destination: Path) -> list[str]:
    """Copy the tokenizer / processor files of ``source`` into ``destination``; returns their names."""
    copied = []
    for pattern in TOKENIZER_FILES:
        for path in sorted(Path(source).glob(pattern)):
            if path.is_file() and path.name not in copied:
                shutil.copy2(path, destination / path.name)
                copied.append(path.name)
    return copied
