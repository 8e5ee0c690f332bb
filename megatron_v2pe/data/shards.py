"""The shard format: webdataset-style tar files, one sample per key.

A sample with key ``K`` is a run of consecutive tar members::

    K.json     the record: {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...],
               "images": ["0.jpg", "1.png"], "metadata": {...}}
    K.0.jpg    the image of the first <image> placeholder (original encoded bytes, any format Pillow reads)
    K.1.png    the second, and so on

``images`` lists the image members in placeholder order; without it, the members ``K.<n>.<ext>`` with
n = 0, 1, … are used. ``metadata`` is optional and free-form. Keys contain no '.' (everything after the
first '.' of a member name is its extension, as in webdataset). Shards may be gzip/bz2/xz-compressed;
plain tar resumes by seeking, compressed shards and ``pipe:`` streams by reading up to the position.

Two samples under one key next to each other (a member repeats) are both marked ``duplicate_key``: their
members cannot be told apart, so neither is used. Reading never fails on bad data inside a shard: unreadable tar blocks are skipped up to the next valid
member header, and the samples next to them are marked ``damaged`` so that, if they turn out
incomplete, they are counted as corrupt rather than as some other problem.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import tarfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Self

from megatron_v2pe.data.skips import BadSample, DataEvent, SkipReason, SkipStats

RECORD_MEMBER = "json"
IMAGE_MEMBER = re.compile(r"^(\d+)\.(jpg|jpeg|png|webp|bmp|gif|tif|tiff)$")
MANIFEST_FORMAT = "megatron_v2pe-shards-v1"
_BLOCK = tarfile.BLOCKSIZE
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bz2, xz


def split_member_name(name: str) -> tuple[str, str]:
    """(key, extension): the key is the path up to the first '.' of the file name."""
    directory, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def unpack_sample(members: Mapping[str, bytes]) -> tuple[object, list[bytes]]:
    """The record and its images in placeholder order; BadSample if the members do not add up."""
    if RECORD_MEMBER not in members:
        raise BadSample(SkipReason.MISSING_RECORD, f"no .json member among {sorted(members)}")
    try:
        record = json.loads(members[RECORD_MEMBER].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadSample(SkipReason.INVALID_JSON, str(err)) from None
    names = record.get("images") if isinstance(record, dict) else None
    if names is None:
        numbered = sorted((int(m.group(1)), name) for name in members if (m := IMAGE_MEMBER.match(name)))
        gaps = [n for n, (k, _) in enumerate(numbered) if k != n]
        if gaps:
            raise BadSample(SkipReason.MISSING_IMAGE, f"image member {gaps[0]} is absent (have {numbered})")
        names = [name for _, name in numbered]
    elif not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise BadSample(SkipReason.BAD_RECORD, "'images' must be a list of member extensions like '0.jpg'")
    missing = [n for n in names if n not in members]
    if missing:
        raise BadSample(SkipReason.MISSING_IMAGE, f"member {missing[0]!r} is absent (have {sorted(members)})")
    return record, [members[n] for n in names]


# --------------------------------------------------------------------------------------------------
# Writing


@dataclass
class _ShardInfo:
    path: str
    samples: int = 0
    bytes: int = 0


def _member_bytes(size: int) -> int:
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


class ShardWriter:
    """Writes samples into tar shards of at most ``max_bytes`` each (a larger single sample gets a shard
    of its own) and, on close, ``manifest.json`` with each shard's sample count."""

    def __init__(self, directory: str | Path, prefix: str = "shard", max_bytes: int = 1 << 30) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.shards: list[_ShardInfo] = []
        self._tar: tarfile.TarFile | None = None

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, record: Mapping, images: Sequence[tuple[str, bytes]] = ()) -> None:
        """One sample; images are (extension, encoded bytes) in placeholder order."""
        if not key or "." in key:
            raise ValueError(f"sample key {key!r} must be non-empty and contain no '.'")
        names = [f"{k}.{extension.lower().lstrip('.')}" for k, (extension, _) in enumerate(images)]
        for name in names:
            if not IMAGE_MEMBER.match(name):
                raise ValueError(
                    f"image member {name!r} of {key}: extension not one of {IMAGE_MEMBER.pattern}"
                )
        payload = json.dumps({**record, "images": names}, ensure_ascii=False).encode("utf-8")
        size = _member_bytes(len(payload)) + sum(_member_bytes(len(data)) for _, data in images)
        current = self.shards[-1] if self.shards else None
        if current is None or (current.samples and current.bytes + size > self.max_bytes):
            self._open_next()
            current = self.shards[-1]
        self._add(f"{key}.{RECORD_MEMBER}", payload)
        for name, (_, data) in zip(names, images, strict=True):
            self._add(f"{key}.{name}", data)
        current.samples += 1
        current.bytes += size

    def _open_next(self) -> None:
        if self._tar is not None:
            self._tar.close()
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tar = tarfile.open(self.directory / name, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 (closed by close())
        self.shards.append(_ShardInfo(name))

    def close(self, skipped: Mapping[str, int] | None = None) -> Path:
        """Finish the last shard and write the manifest (paths relative to it); returns its path."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        manifest = {
            "format": MANIFEST_FORMAT,
            "samples": sum(s.samples for s in self.shards),
            "shards": [vars(s) for s in self.shards],
            "skipped": dict(skipped or {}),
        }
        path = self.directory / "manifest.json"
        path.write_text(json.dumps(manifest, indent=1) + "\n")
        return path

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_manifest(path: str | Path) -> list[str]:
    """Shard paths listed by a manifest, resolved next to it."""
    path = Path(path)
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a shard manifest (format {manifest.get('format')!r})")
    return [str(path.parent / shard["path"]) for shard in manifest["shards"]]


# --------------------------------------------------------------------------------------------------
# Reading


class ShardUnreadable(OSError):
    """A shard that cannot be opened or holds no tar data at all."""


@dataclass
class TarGroup:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    offset: int = 0  # byte offset of its first member header (in the uncompressed stream)
    end: int = 0  # byte offset just after its last member: where reading resumes
    damaged: bool = False  # unreadable tar data next to it: it may be incomplete
    duplicate_key: bool = False  # next to another sample with the same key: neither can be told apart


def _watching_tarinfo(bad_headers: list[int]) -> type[tarfile.TarInfo]:
    """A TarInfo class that records the offset of every header that tarfile skips as unreadable (with
    ignore_zeros it skips them silently, block by block, up to the next valid header)."""

    class WatchedTarInfo(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
            try:
                return super().fromtarfile(tar)
            except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError):
                bad_headers.append(tar.offset)
                raise

    return WatchedTarInfo


@contextmanager
def _open_at(url: str, start: int) -> Iterator[tuple[BinaryIO, int]]:
    """The shard's byte stream and the offset it starts at: `start` when a plain local tar can seek
    there, else 0 (the caller skips members before `start`)."""
    if url.startswith("pipe:"):
        process = subprocess.Popen(url[len("pipe:") :], shell=True, stdout=subprocess.PIPE)
        try:
            yield process.stdout, 0
        finally:
            if process.poll() is None:
                process.kill()
            process.stdout.close()
            process.wait()
        return
    try:
        stream = open(url, "rb")  # noqa: SIM115 (closed below, after the caller is done)
    except OSError as err:
        raise ShardUnreadable(f"cannot open shard {url}: {err}") from err
    with stream:
        if start and not stream.read(6).startswith(_COMPRESSED_MAGIC):
            stream.seek(start)
            yield stream, start
        else:
            stream.seek(0)
            yield stream, 0


@contextmanager
def _tar_stream(url: str, start: int) -> Iterator[tuple[tarfile.TarFile, int, list[int]]]:
    """The shard as a streaming TarFile that skips unreadable headers, the byte offset it starts at, and
    the list where the offsets of skipped headers are collected."""
    with _open_at(url, start) as (stream, base):
        bad_headers: list[int] = []
        try:
            tar = tarfile.open(  # noqa: SIM115 (closed by the `with tar` below)
                fileobj=stream, mode="r|*", ignore_zeros=True, tarinfo=_watching_tarinfo(bad_headers)
            )
        except _READ_ERRORS as err:
            raise ShardUnreadable(f"{url} holds no readable tar data: {err}") from err
        with tar:
            yield tar, base, bad_headers


def iter_groups(url: str, start: int = 0, stats: SkipStats | None = None) -> Iterator[TarGroup]:
    """The samples of a shard from byte offset `start` (a group boundary), as key -> member groups.

    ShardUnreadable if it cannot be opened or no member at all can be read; other damage is skipped,
    counted in `stats` and marked on the groups next to it.
    """

    def report(detail: str) -> None:
        if stats is not None:
            stats.event(DataEvent.CORRUPT_TAR_DATA, url, detail)

    with _tar_stream(url, start) as (tar, base, bad_headers):
        group: TarGroup | None = None
        damaged_next = False  # unreadable data was skipped: the next group may have lost members
        members_read = 0
        while True:
            try:
                info = tar.next()
            except _READ_ERRORS as err:
                if not members_read and start == 0:
                    raise ShardUnreadable(f"{url} holds no readable tar data: {err}") from err
                report(f"stopped reading: {err}")
                if group is not None:
                    group.damaged = True
                break
            if info is None and not members_read and bad_headers and start == 0:
                raise ShardUnreadable(f"{url} holds no readable tar member ({len(bad_headers)} bad blocks)")
            if bad_headers:
                where = ", ".join(str(base + offset) for offset in bad_headers[:3])
                report(f"{len(bad_headers)} unreadable blocks at byte {where}")
                bad_headers.clear()
                damaged_next = True
                if group is not None:
                    group.damaged = True
            if info is None:
                break
            tar.members.clear()  # stream mode keeps every TarInfo otherwise
            members_read += 1
            if not info.isfile() or base + info.offset < start:
                continue
            key, extension = split_member_name(info.name)
            repeated = group is not None and key == group.key and extension in group.members
            if group is None or key != group.key or repeated:
                if group is not None:
                    group.duplicate_key |= repeated
                    yield group
                group = TarGroup(key, offset=base + info.offset, damaged=damaged_next, duplicate_key=repeated)
                damaged_next = False
            try:
                data = tar.extractfile(info).read()
            except _READ_ERRORS as err:
                report(f"member {info.name} is cut short: {err}")
                group.damaged = True
                break
            group.members[extension] = data
            group.end = base + info.offset_data + -(-info.size // _BLOCK) * _BLOCK
        if group is not None:
            yield group


def read_group(url: str, offset: int) -> TarGroup:
    """The sample starting at byte `offset` of a shard (as recorded in TarGroup.offset)."""
    for group in iter_groups(url, offset):
        if group.offset == offset:
            return group
        break
    raise ShardUnreadable(f"no sample starts at byte {offset} of {url}: the shard changed since it was read")
