"""Streaming shard sources: which samples each data-loading consumer reads, in which order, and where
it stands, so that a restored job continues exactly where it stopped.

A consumer is one dataloader worker of one data-parallel rank (index = rank · workers + worker). Each
epoch, the dataset's work units are shuffled with a seed every consumer shares and dealt round-robin:
a unit is a whole shard when there are at least as many shards as consumers, else one of s interleaved
slices of a shard (sample i of the shard belongs to slice i mod s). Every sample therefore goes to
exactly one consumer per epoch. Within a consumer, samples pass through a shuffle buffer that drains at
the end of each epoch.

State is small and plain (JSON-able): the read position (epoch, unit, byte offset) and, for every
sample waiting in a buffer, where it lives in its shard (SampleRef) rather than its bytes. Restoring
re-reads those samples.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from braceexpand import braceexpand

from megatron_v2pe.data.shards import ShardUnreadable, iter_groups, read_group, read_manifest
from megatron_v2pe.data.skips import DataEvent, SkipReason, SkipStats

UNITS_STREAM, SHUFFLE_STREAM, BLEND_STREAM, DELTA_STREAM = range(4)
"""Tags that keep the random streams of one seed apart."""


def seeded_rng(seed: int, *keys: int) -> np.random.Generator:
    """An independent random stream for (seed, purpose, …): the same everywhere for the same keys."""
    return np.random.default_rng([seed, *keys])


class DatasetUnreadable(RuntimeError):
    """Nothing usable could be read from a dataset: the only data problem that stops a job."""


@dataclass(frozen=True)
class Consumer:
    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"consumer index {self.index} is outside [0, {self.count})")


@dataclass(frozen=True)
class SampleRef:
    """Where a sample lives: enough to read it again."""

    dataset: int
    shard: int
    offset: int
    epoch: int
    damaged: bool

    def to_state(self) -> list[int]:
        return [self.dataset, self.shard, self.offset, self.epoch, int(self.damaged)]

    @classmethod
    def from_state(cls, state: Sequence[int]) -> SampleRef:
        dataset, shard, offset, epoch, damaged = state
        return cls(dataset, shard, offset, epoch, bool(damaged))


@dataclass(frozen=True)
class RawSample:
    key: str  # "<shard>:<key>", for messages
    members: dict[str, bytes]
    ref: SampleRef


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Shard URLs from patterns: brace ranges/lists (``a-{000..009}.tar``), globs, directories (their
    ``*.tar*``), shard manifests (``.json``) and ``pipe:<command>`` (a command printing the shard)."""
    urls: list[str] = []
    for pattern in [spec] if isinstance(spec, str) else spec:
        for url in braceexpand(pattern):
            if url.startswith("pipe:"):
                urls.append(url)
            elif url.endswith(".json"):
                urls.extend(read_manifest(url))
            elif os.path.isdir(url):
                urls.extend(sorted(glob.glob(os.path.join(url, "*.tar*"))))
            elif glob.has_magic(url):
                urls.extend(sorted(glob.glob(url)))
            else:
                urls.append(url)
    return urls


def source_fingerprint(urls: Sequence[str], consumer: Consumer, seed: int) -> str:
    """What a saved read position belongs to: the shard list, the consumer and the seed."""
    text = "\n".join([*urls, f"{consumer}", f"{seed}"])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ShardSource:
    """One dataset, as one consumer reads it: an iterator of RawSample over epochs (forever when
    num_epochs is None). Call load_state_dict before iterating to resume."""

    def __init__(
        self,
        urls: Sequence[str],
        consumer: Consumer,
        *,
        dataset: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 0,
        num_epochs: int | None = None,
        stats: SkipStats | None = None,
    ) -> None:
        self.urls = list(urls)
        self._check_some_exist(self.urls)
        self.consumer = consumer
        self.dataset = dataset
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.num_epochs = num_epochs
        self.stats = stats if stats is not None else SkipStats()
        self._slices = -(-consumer.count // len(self.urls))
        self._rng = seeded_rng(seed, SHUFFLE_STREAM, dataset, consumer.index)
        self._buffer: list[RawSample] = []
        self.epoch = 0
        self._unit = 0  # index into this epoch's units
        self._offset = 0  # byte offset in the unit's shard where the next sample starts
        self._group_index = 0  # index of that sample within the shard (for slices)
        self._read_this_epoch = 0
        self._failures: dict[str, str] = {}

    @staticmethod
    def _check_some_exist(urls: list[str]) -> None:
        """Fail early when no shard can exist; single missing shards are counted when they are read."""
        if not urls:
            raise DatasetUnreadable("the shard pattern matched no file; check the dataset path")
        if not any(u.startswith("pipe:") or os.path.exists(u) for u in urls):
            raise DatasetUnreadable(
                f"none of the {len(urls)} shards exists: {urls[0]}" + (" ..." if urls[1:] else "")
            )

    @property
    def exhausted(self) -> bool:
        return self.num_epochs is not None and self.epoch >= self.num_epochs

    def units(self, epoch: int) -> list[tuple[int, int]]:
        """(shard, slice) pairs this consumer reads in `epoch`, in reading order."""
        units = [(shard, k) for shard in range(len(self.urls)) for k in range(self._slices)]
        order = seeded_rng(self.seed, UNITS_STREAM, self.dataset, epoch).permutation(len(units))
        return [units[i] for i in order[self.consumer.index :: self.consumer.count]]

    def __iter__(self) -> Iterator[RawSample]:
        while not self.exhausted:
            units = self.units(self.epoch)
            while self._unit < len(units):
                for sample in self._read_unit(*units[self._unit]):
                    self._buffer.append(sample)
                    if len(self._buffer) >= max(1, self.shuffle_buffer):
                        yield self._take()
                self._unit, self._offset, self._group_index = self._unit + 1, 0, 0
            while self._buffer:
                yield self._take()
            self._finish_epoch(units)

    def _take(self) -> RawSample:
        """A random buffered sample (swap-remove: O(1), deterministic in the rng)."""
        i = int(self._rng.integers(len(self._buffer))) if len(self._buffer) > 1 else 0
        self._buffer[i], self._buffer[-1] = self._buffer[-1], self._buffer[i]
        return self._buffer.pop()

    def _read_unit(self, shard: int, slice_index: int) -> Iterator[RawSample]:
        """The samples of one slice of a shard; only the reader of slice 0 counts the shard's damage, so
        that each problem is counted once however many consumers share the shard."""
        url = self.urls[shard]
        stats = self.stats if slice_index == 0 else None
        try:
            for group in iter_groups(url, self._offset, stats):
                index, self._group_index, self._offset = self._group_index, self._group_index + 1, group.end
                if index % self._slices != slice_index:
                    continue
                if group.duplicate_key:
                    key = f"{url}:{group.key}"
                    self.stats.skip(SkipReason.DUPLICATE_KEY, key, "another sample next to it has this key")
                    continue
                self._read_this_epoch += 1
                ref = SampleRef(self.dataset, shard, group.offset, self.epoch, group.damaged)
                yield RawSample(f"{url}:{group.key}", group.members, ref)
        except ShardUnreadable as err:
            self._failures[url] = str(err)
            if stats is not None:
                stats.event(DataEvent.UNREADABLE_SHARD, url, str(err))

    def _finish_epoch(self, units: list[tuple[int, int]]) -> None:
        if not self._read_this_epoch:
            shards = sorted({self.urls[shard] for shard, _ in units})
            problems = "; ".join(self._failures.values()) or "they hold no sample for this consumer"
            raise DatasetUnreadable(
                f"consumer {self.consumer.index} of {self.consumer.count} read no sample of dataset "
                f"{self.dataset} in epoch {self.epoch} from {shards}: {problems}. Fix or remove these shards "
                "(or use fewer data-loading workers than the dataset has samples)"
            )
        self.epoch += 1
        self._unit = self._offset = self._group_index = self._read_this_epoch = 0
        self._failures.clear()

    def fetch(self, ref: SampleRef) -> RawSample:
        """Read a sample again (to refill buffers on resume)."""
        url = self.urls[ref.shard]
        group = read_group(url, ref.offset)
        return RawSample(f"{url}:{group.key}", group.members, ref)

    def _fingerprint(self) -> str:
        return source_fingerprint(self.urls, self.consumer, self.seed)

    def state_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self._fingerprint(),
            "position": [self.epoch, self._unit, self._offset, self._group_index, self._read_this_epoch],
            "rng": self._rng.bit_generator.state,
            "buffer": [sample.ref.to_state() for sample in self._buffer],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["fingerprint"] != self._fingerprint():
            raise ValueError(
                f"the saved data-loader state of dataset {self.dataset} is for other shards, seed or "
                "consumer layout; resume with the same shard list, seed, world size and worker count"
            )
        self.epoch, self._unit, self._offset, self._group_index, self._read_this_epoch = state["position"]
        self._rng.bit_generator.state = state["rng"]
        self._buffer = [self.fetch(SampleRef.from_state(ref)) for ref in state["buffer"]]


class BlendedSource:
    """Several datasets mixed at random with the given weights; a finite dataset that runs out leaves
    the mix and the others continue."""

    def __init__(
        self, sources: Sequence[ShardSource], weights: Sequence[float], rng: np.random.Generator
    ) -> None:
        if len(sources) != len(weights) or not sources:
            raise ValueError(
                f"need one weight per dataset, got {len(weights)} weights for {len(sources)} datasets"
            )
        if any(w <= 0 for w in weights):
            raise ValueError(f"dataset weights must be positive, got {list(weights)}")
        self.sources = list(sources)
        self.weights = np.asarray(weights, dtype=np.float64)
        self._rng = rng
        self._done: set[int] = set()

    def __iter__(self) -> Iterator[RawSample]:
        iterators = [iter(source) for source in self.sources]
        while True:
            active = [d for d in range(len(self.sources)) if d not in self._done]
            if not active:
                return
            d = active[0]
            if len(active) > 1:
                p = self.weights[active] / self.weights[active].sum()
                d = active[int(self._rng.choice(len(active), p=p))]
            try:
                sample = next(iterators[d])
            except StopIteration:
                self._done.add(d)
                continue
            yield sample

    def fetch(self, ref: SampleRef) -> RawSample:
        return self.sources[ref.dataset].fetch(ref)

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self._rng.bit_generator.state,
            "done": sorted(self._done),
            "sources": [source.state_dict() for source in self.sources],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["sources"]) != len(self.sources):
            raise ValueError(
                f"the saved state has {len(state['sources'])} datasets, the config {len(self.sources)}"
            )
        self._rng.bit_generator.state = state["rng"]
        self._done = set(state["done"])
        for source, source_state in zip(self.sources, state["sources"], strict=True):
            source.load_state_dict(source_state)
