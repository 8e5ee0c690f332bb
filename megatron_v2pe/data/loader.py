"""What the trainer iterates: PackedBatch micro-batches for one data-parallel rank, with exact resume.

Per consumer (one dataloader worker of one rank) a PackStream runs shards -> samples -> packs. The
PackedBatchLoader runs one PackStream per worker in a torch DataLoader; every batch comes back with its
stream's state right after producing it, so the loader's state_dict describes exactly the batches the
trainer has consumed. The DataLoader takes batches from its workers in turn; on resume the worker roles
are rotated so that the worker that owed the next batch produces first.
"""

from __future__ import annotations

import atexit
import logging
import weakref
from collections.abc import Iterator
from typing import Any

import torch.utils.data

from megatron_v2pe.batch import PackedBatch
from megatron_v2pe.data.config import DataConfig
from megatron_v2pe.data.images import TilingConfig
from megatron_v2pe.data.packing import Fit, Packer, fit_sample
from megatron_v2pe.data.sample import SampleBuilder, SampleConfig, TokenizedSample
from megatron_v2pe.data.shards import unpack_sample
from megatron_v2pe.data.skips import BadSample, DataEvent, SkipReason, SkipStats
from megatron_v2pe.data.source import (
    BLEND_STREAM,
    DELTA_STREAM,
    BlendedSource,
    Consumer,
    DatasetUnreadable,
    RawSample,
    SampleRef,
    ShardSource,
    expand_urls,
    seeded_rng,
    source_fingerprint,
)
from megatron_v2pe.data.tokenizer import Tokenizer, load_tokenizer
from megatron_v2pe.model.presets import VLMConfig
from megatron_v2pe.parallel.runtime import ignore_exit_signals

logger = logging.getLogger("megatron_v2pe.data")

STATE_VERSION = 1


def sample_config(config: DataConfig, model: VLMConfig) -> SampleConfig:
    """How samples are built for this model: its template and tokens per tile, its tiling unless the
    data config sets one (a model without dynamic tiling cuts each image into one tile)."""
    image = model.image_format
    max_tiles = config.max_image_tiles or (image.max_tiles if image.dynamic_image_size else 1)
    tiling = TilingConfig(
        model.vision.image_size,
        max_tiles,
        min_tiles=min(image.min_tiles, max_tiles),
        use_thumbnail=image.use_thumbnail if config.use_thumbnail is None else config.use_thumbnail,
    )
    return SampleConfig(
        model.tokens_per_tile,
        tiling,
        config.system_message,
        template=model.template,
        tile_budget=config.tile_budget or image.tile_budget,
    )


def check_tokenizer_matches(tokenizer: Tokenizer, model: VLMConfig) -> None:
    if tokenizer.img_context_id != model.img_context_token_id:
        raise ValueError(
            f"the tokenizer's <IMG_CONTEXT> id is {tokenizer.img_context_id} but the model config's "
            f"img_context_token_id is {model.img_context_token_id}; use the model's own tokenizer or set "
            "img_context_token_id to the tokenizer's id"
        )
    if tokenizer.vocab_size > model.language.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary only "
            f"{model.language.vocab_size}"
        )


class PackStream:
    """One consumer's pipeline. Iterating yields packs; state_dict() taken right after a pack was
    yielded, and loaded into a fresh PackStream before iterating, continues with the next pack."""

    def __init__(
        self, config: DataConfig, model: VLMConfig, consumer: Consumer, tokenizer: Tokenizer | None = None
    ) -> None:
        config.check()
        self.config, self.pack = config, config.pack_config()
        self.stats = SkipStats()
        sources = [
            ShardSource(
                expand_urls(spec.shards),
                consumer,
                dataset=d,
                seed=config.seed,
                shuffle_buffer=config.shuffle_buffer,
                num_epochs=config.num_epochs,
                stats=self.stats,
            )
            for d, spec in enumerate(config.datasets)
        ]
        weights = [spec.weight for spec in config.datasets]
        self.source = BlendedSource(sources, weights, seeded_rng(config.seed, BLEND_STREAM, consumer.index))
        tokenizer = tokenizer or load_tokenizer(config.tokenizer)
        check_tokenizer_matches(tokenizer, model)
        self.builder = SampleBuilder(tokenizer, sample_config(config, model))
        self.packer = Packer(
            self.pack,
            seeded_rng(config.seed, DELTA_STREAM, consumer.index),
            img_context_id=tokenizer.img_context_id,
            pad_token_id=tokenizer.pad_id,
        )
        self._usable_epoch = [-1] * len(sources)  # last epoch of each dataset that gave a usable sample

    def _fit(self, raw: RawSample) -> Fit:
        """The sample, made to fit a pack (or not); raises BadSample."""
        record, images = unpack_sample(raw.members)
        return fit_sample(self.builder.build(raw.key, record, images, ref=raw.ref), self.pack)

    def _usable(self, raw: RawSample) -> TokenizedSample | None:
        """The sample to pack, or None after counting why there is none."""
        try:
            fit = self._fit(raw)
        except BadSample as bad:  # incomplete next to unreadable tar data: that is the likely cause
            self._skip(SkipReason.CORRUPT_MEMBER if raw.ref.damaged else bad.reason, raw, bad.detail)
            return None
        if isinstance(fit.outcome, SkipReason):
            pack = self.pack
            self._skip(fit.outcome, raw, f"a pack holds {pack.max_seq_len} tokens and {pack.max_tiles} tiles")
            return None
        if fit.outcome is DataEvent.TRUNCATED:
            self.stats.event(fit.outcome, raw.key, f"cut to {len(fit.sample)} tokens")
        self._usable_epoch[raw.ref.dataset] = raw.ref.epoch
        return fit.sample

    def _skip(self, reason: SkipReason, raw: RawSample, detail: str) -> None:
        self.stats.skip(reason, raw.key, detail)
        self._check_progress(raw.ref)

    def _check_progress(self, ref: SampleRef) -> None:
        """A dataset that went a whole epoch without one usable sample would stall training forever."""
        if ref.epoch >= self._usable_epoch[ref.dataset] + 2:
            raise DatasetUnreadable(
                f"dataset {ref.dataset} ({self.config.datasets[ref.dataset].shards}) gave no usable sample "
                f"in epoch {ref.epoch - 1}: {self.stats.summary()}"
            )

    def __iter__(self) -> Iterator[PackedBatch]:
        for raw in self.source:
            sample = self._usable(raw)
            if sample is None:
                continue
            self.packer.add(sample)
            if self.packer.full:
                yield self.packer.pop_pack()
        while self.packer.buffer:
            yield self.packer.pop_pack()

    def state_dict(self) -> dict[str, Any]:
        return {
            "source": self.source.state_dict(),
            "packer": self.packer.state_dict(),
            "pending": [sample.ref.to_state() for sample in self.packer.buffer],
            "usable_epoch": list(self._usable_epoch),
            "stats": self.stats.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state["source"])
        self.stats.load_state_dict(state["stats"])
        self._usable_epoch = list(state["usable_epoch"])
        pending = []
        for ref_state in state["pending"]:
            raw = self.source.fetch(SampleRef.from_state(ref_state))
            try:
                pending.append(self._fit(raw).sample)
            except BadSample as bad:
                raise ValueError(
                    f"cannot restore buffered sample {raw.key}: it no longer builds ({bad})"
                ) from bad
        self.packer.load_state_dict(state["packer"], pending)


class _WorkerStreams(torch.utils.data.IterableDataset):
    """Runs in each DataLoader worker: one PackStream per worker, yielding (worker role, batch, state),
    and when a finite stream ends, (role, None, final state) so that its last counters arrive too."""

    def __init__(
        self,
        config: DataConfig,
        model: VLMConfig,
        rank: int,
        world_size: int,
        rotation: int,
        states: dict[int, Any],
    ) -> None:
        self.config, self.model = config, model
        self.rank, self.world_size = rank, world_size
        self.rotation, self.states = rotation, states

    def __iter__(self) -> Iterator[tuple[int, PackedBatch | None, dict[str, Any]]]:
        workers = max(1, self.config.num_workers)
        info = torch.utils.data.get_worker_info()
        role = ((info.id if info is not None else 0) + self.rotation) % workers
        stream = PackStream(
            self.config, self.model, Consumer(self.rank * workers + role, self.world_size * workers)
        )
        if role in self.states:
            stream.load_state_dict(self.states[role])
        for batch in stream:
            yield role, batch, stream.state_dict()
            del batch  # a 256K pack holds GBs of pixels: let it go before the next one is built
        yield role, None, stream.state_dict()


def _as_is(item: Any) -> Any:
    return item


def _worker_init(_worker_id: int) -> None:
    ignore_exit_signals()  # after torch's own handlers: a worker's SIGTERM is not the trainer's


# Worker iterators not yet shut down. Workers ignore SIGTERM, so multiprocessing's clean-up at exit
# (terminate, then join) would wait forever for those of an iterator left open (say, referenced by the
# traceback of an error): they are killed first (atexit runs this before multiprocessing's own hook).
_open_worker_iterators: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _kill_workers_left_open() -> None:
    for iterator in list(_open_worker_iterators):
        for worker in getattr(iterator, "_workers", ()):
            if worker.is_alive():
                worker.kill()


def _close(iterator: Any) -> None:
    """Stop an iterator's worker processes now (torch would only do it when the iterator is collected)."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


class DataStateMismatch(ValueError):
    """A saved data-loader state that does not belong to this loader's data or layout."""


class PackedBatchLoader:
    """The PackedBatch iterable of one data-parallel rank. Iterating again continues where the batches
    consumed so far stopped; state_dict/load_state_dict carry that across a restart."""

    def __init__(self, config: DataConfig, model: VLMConfig, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        config.check()
        self.config, self.model = config, model
        self.rank, self.world_size = rank, world_size
        self._workers = max(1, config.num_workers)
        self._consumed = 0
        self._states: dict[int, dict[str, Any]] = {}

    def __iter__(self) -> Iterator[PackedBatch]:
        streams = _WorkerStreams(
            self.config,
            self.model,
            self.rank,
            self.world_size,
            self._consumed % self._workers,
            dict(self._states),
        )
        if self.config.num_workers == 0:
            items: Any = iter(streams)
        else:
            items = iter(torch.utils.data.DataLoader(
                streams,
                batch_size=None,
                num_workers=self.config.num_workers,
                collate_fn=_as_is,
                prefetch_factor=self.config.prefetch_factor,
                worker_init_fn=_worker_init,
            ))  # fmt: skip
            _open_worker_iterators.add(items)
        try:
            for role, batch, state in items:
                self._states[role] = state
                if batch is not None:
                    self._consumed += 1
                    yield batch
        finally:
            _close(items)
        logger.info(
            "data of rank %d exhausted after %d packs; %s", self.rank, self._consumed, self.stats().summary()
        )

    def stats(self) -> SkipStats:
        """Skips and events of the batches consumed so far, summed over workers."""
        return SkipStats.merged(state["stats"] for state in self._states.values())

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "layout": [self.rank, self.world_size, self._workers],
            "consumed": self._consumed,
            "streams": {str(role): state for role, state in self._states.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state; DataStateMismatch if it belongs to other data or another layout."""
        if state.get("version") != STATE_VERSION:
            raise DataStateMismatch(
                f"data-loader state version {state.get('version')}, expected {STATE_VERSION}"
            )
        rank, world_size, workers = state["layout"]
        if (rank, world_size) != (self.rank, self.world_size):
            raise DataStateMismatch(
                f"the data-loader state is of data-parallel rank {rank} of {world_size}, this loader is "
                f"rank {self.rank} of {self.world_size}"
            )
        if workers != self._workers:
            raise DataStateMismatch(
                f"the data-loader state was saved with data.num_workers={workers}, this run has "
                f"{self.config.num_workers}; set data.num_workers={workers} to continue the data stream "
                "exactly"
            )
        streams = {int(role): s for role, s in state["streams"].items()}
        for role, stream in streams.items():
            self._check_sources(role, stream["source"]["sources"])
        self._consumed = state["consumed"]
        self._states = streams

    def _check_sources(self, role: int, saved: list[dict[str, Any]]) -> None:
        if len(saved) != len(self.config.datasets):
            raise DataStateMismatch(
                f"the data-loader state has {len(saved)} datasets, data.datasets lists "
                f"{len(self.config.datasets)}"
            )
        consumer = Consumer(self.rank * self._workers + role, self.world_size * self._workers)
        for d, (spec, source) in enumerate(zip(self.config.datasets, saved, strict=True)):
            urls = expand_urls(spec.shards)
            if source["fingerprint"] != source_fingerprint(urls, consumer, self.config.seed):
                raise DataStateMismatch(
                    f"the data-loader state of dataset {d} ({spec.shards}, now {len(urls)} shards) was saved "
                    "for another shard list or seed: a shard was added, removed or renamed, or "
                    "training.seed changed"
                )
