"""Hugging Face checkpoint files, read and written one tensor at a time.

Reading parses each file's header once and reads one tensor's bytes per call (``os.pread``, no memory map:
mapped pages would stay resident, so a converter that visits every tensor would end up mapping the whole
model). Writing holds one shard's tensors, writes them straight from their memory when the shard is full
(no serialised copy of the shard) and drops them. Peak memory: one shard plus the tensors being converted.
Every output directory is assembled under a temporary name next to its destination and renamed only when
complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from megatron_v2pe.convert.checks import ConversionError
from megatron_v2pe.errors import OutputExists

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


DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets) and where its data begins;
    a file cut short or with a damaged header is a ConversionError naming it, before any tensor is read."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        (length,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (None,)
        if length is None or 8 + length > size:
            raise _damaged(path, f"it ends inside its header ({size} bytes)")
        try:
            header = json.loads(f.read(length))
            header.pop("__metadata__", None)
            end = max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            raise _damaged(path, f"its header is not a safetensors header ({type(err).__name__}: {err})")
    if 8 + length + end > size:
        raise _damaged(path, f"it is cut short: its tensors need {8 + length + end} bytes, it has {size}")
    return header, 8 + length


def _damaged(path: Path, problem: str) -> ConversionError:
    return ConversionError(str(path), [f"{problem}; copy or download the file again"])


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A safetensors file, each tensor written from its own memory (no serialised copy of the whole)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for tensor in tensors.values():
            data = tensor.detach().contiguous().cpu()
            if data.numel():
                f.write(memoryview(data.view(-1).view(torch.uint8).numpy()))


def return_freed_memory() -> None:
    """Make glibc give every freed buffer of 1 MiB or more straight back to the system.

    By default glibc raises its mmap threshold each time a large buffer is freed, after which tensors
    come from the heap and freed ones stay in it: a process that streams a model tensor by tensor would
    see its memory creep up towards the sum of all it ever held. Elsewhere than glibc this does nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 2**20)


class SafetensorsSource:
    """The tensors of a Hugging Face model directory (``model.safetensors`` or shards + index JSON)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if not self.directory.is_dir():
            raise ConversionError(str(directory), ["the directory does not exist; check the path"])
        if index.is_file():
            self.files = json.loads(index.read_text())["weight_map"]
        elif (self.directory / SINGLE_FILE).is_file():
            self.files = dict.fromkeys(read_header(self.directory / SINGLE_FILE)[0], SINGLE_FILE)
        else:
            raise ConversionError(str(directory), [f"it holds neither {INDEX_FILE} nor {SINGLE_FILE}"])
        self._headers: dict[str, tuple[dict, int]] = {}

    def _header(self, file: str) -> tuple[dict, int]:
        if file not in self._headers:
            path = self.directory / file
            if not path.is_file():
                raise ConversionError(str(self.directory), [f"{file} is named in {INDEX_FILE} but missing"])
            self._headers[file] = read_header(path)
        return self._headers[file]

    def _entry(self, name: str) -> dict:
        header, _ = self._header(self.files[name])
        if name not in header:
            raise KeyError(f"{name} is named in {INDEX_FILE} but not in {self.files[name]}")
        return header[name]

    def shapes(self) -> dict[str, torch.Size]:
        """Every tensor's shape, from the file headers (no tensor is read)."""
        return {name: torch.Size(self._entry(name)["shape"]) for name in self.files}

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._entry(name)["dtype"]]

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read from disk into memory it owns (``untyped_storage().resize_(0)`` frees it)."""
        entry, (_, data_start) = self._entry(name), self._header(self.files[name])
        start, end = entry["data_offsets"]
        tensor = torch.empty(entry["shape"], dtype=DTYPES[entry["dtype"]])
        if tensor.numel():
            # a view of the tensor's own memory (not through numpy, which would pin its storage)
            raw = (ctypes.c_char * (end - start)).from_address(tensor.data_ptr())
            view, done = memoryview(raw).cast("B"), 0
            with open(self.directory / self.files[name], "rb") as f:
                while done < end - start:
                    read = os.preadv(f.fileno(), [view[done:]], data_start + start + done)
                    if read == 0:
                        raise EOFError(f"{self.files[name]} ends inside {name}")
                    done += read
        return tensor


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

    def make_room(self, size: int) -> None:
        """``size`` bytes of tensors are about to be produced: write the shard out now if they would not
        fit in it, so that it is not held while they are."""
        if self._shard and self._shard_bytes + size > self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        file = f"shard-{len(self._written):05d}.tmp"
        save_safetensors(self._shard, self.directory / file, metadata={"format": "pt"})
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
        raise OutputExists(f"{destination} already exists; choose a new output directory")
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
