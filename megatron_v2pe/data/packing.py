"""Online packing of tokenized samples into PackedBatch micro-batches of up to 256K tokens.

Samples wait in a buffer of ``buffer_size``; when it is full, a pack is formed from the oldest sample
(so none waits forever) plus, repeatedly, the longest buffered sample that still fits both limits
(``max_seq_len`` tokens after padding, ``max_tiles`` tiles).

Each sub-sample j of a pack is laid out as its tokens, then padding up to a multiple of ``pad_multiple``
(see ``padding_multiple``). Labels are shifted by one inside the sub-sample before padding (label i is
token i + 1); the last real token and all padding get IGNORE_INDEX and weight 0. Loss weights are 1 per
supervised token ('token') or 1/sqrt(n_j) with n_j the supervised tokens of j ('square', the paper's
choice, so long answers do not drown short ones). Positions restart at 0 per sub-sample, with one δ per
image drawn by the δ policy.

A sample longer than a pack is dropped or, with ``over_long='truncate'``, cut at the last text boundary
that fits (never inside an image: a cut inside ``<img> … </img>`` moves before ``<img>``); both counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

import numpy as np
import torch

from megatron_v2pe.batch import IGNORE_INDEX, PackedBatch, SubSample
from megatron_v2pe.data.images import normalize_tiles
from megatron_v2pe.data.sample import TokenizedSample
from megatron_v2pe.data.skips import DataEvent, SkipReason
from megatron_v2pe.v2pe.positions import DeltaPolicy, parse_delta_policy

MAX_PACK_TOKENS = 262_144
"""256K: the longest context V2PE trains at."""

FP8_SHARD_MULTIPLE = 16

LossWeighting = Literal["square", "token"]
LOSS_WEIGHTINGS = get_args(LossWeighting)
OverLong = Literal["drop", "truncate"]
OVER_LONG = get_args(OverLong)


def padding_multiple(cp: int = 1, tp: int = 1, sequence_parallel: bool = False, fp8: bool = False) -> int:
    """What every sub-sample's length is padded to a multiple of, for the parallel layout.

    Context parallelism splits each sub-sample into 2·cp zigzag chunks; sequence parallelism splits each
    rank's tokens further across tp ranks. FP8 GEMMs need the tokens a rank holds of a sub-sample
    (padded length / (cp·tp under SP)) to be a multiple of 16.
    """
    if cp < 1 or tp < 1:
        raise ValueError(f"cp and tp must be positive, got cp={cp}, tp={tp}")
    shards = cp * (tp if sequence_parallel else 1)
    return FP8_SHARD_MULTIPLE * shards if fp8 else 2 * shards


@dataclass(frozen=True)
class PackConfig:
    max_seq_len: int = 32768
    max_tiles: int = 128
    pad_multiple: int = 2
    buffer_size: int = 32
    loss_weighting: LossWeighting = "square"
    over_long: OverLong = "drop"
    delta_policy: str = "random"

    def __post_init__(self) -> None:
        if not 1 <= self.max_seq_len <= MAX_PACK_TOKENS:
            raise ValueError(f"max_seq_len must be in [1, {MAX_PACK_TOKENS}], got {self.max_seq_len}")
        if self.pad_multiple < 1 or self.max_seq_len % self.pad_multiple:
            raise ValueError(
                f"max_seq_len {self.max_seq_len} must be a multiple of pad_multiple {self.pad_multiple} "
                "(see padding_multiple); round it down to one"
            )
        if self.max_tiles < 0 or self.buffer_size < 1:
            raise ValueError(
                f"need max_tiles >= 0 and buffer_size >= 1, got {self.max_tiles}, {self.buffer_size}"
            )
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}")
        if self.over_long not in OVER_LONG:
            raise ValueError(f"over_long must be one of {OVER_LONG}, got {self.over_long!r}")
        parse_delta_policy(self.delta_policy)

    def padded_length(self, length: int) -> int:
        return -(-length // self.pad_multiple) * self.pad_multiple


class Fit(NamedTuple):
    """A sample made to fit a pack (None if it cannot) and what happened to it (None: nothing)."""

    sample: TokenizedSample | None
    outcome: SkipReason | DataEvent | None


def _cut_point(sample: TokenizedSample, config: PackConfig) -> int:
    """The longest prefix within both limits that does not end inside an image."""
    end = min(len(sample), config.max_seq_len)
    over_budget = np.flatnonzero(np.cumsum(sample.tiles_per_image) > config.max_tiles)
    if over_budget.size:
        end = min(end, int(sample.image_starts[over_budget[0]]))
    inside = np.flatnonzero((sample.image_starts < end) & (end <= sample.image_ends))
    return int(sample.image_starts[inside[0]]) if inside.size else end


def fit_sample(sample: TokenizedSample, config: PackConfig) -> Fit:
    """The sample as it can go into a pack: unchanged, truncated, or dropped (with the reason)."""
    too_long = len(sample) > config.max_seq_len
    if not too_long and sample.num_tiles <= config.max_tiles:
        return Fit(sample, None)
    reason = SkipReason.TOO_LONG if too_long else SkipReason.TOO_MANY_TILES
    if config.over_long == "drop":
        return Fit(None, reason)
    cut = sample.prefix(_cut_point(sample, config))
    if cut.num_targets == 0:
        return Fit(None, reason)
    return Fit(cut, DataEvent.TRUNCATED)


def assemble_pack(
    samples: Sequence[TokenizedSample],
    config: PackConfig,
    policy: DeltaPolicy,
    rng: np.random.Generator,
    *,
    img_context_id: int,
    pad_token_id: int,
) -> PackedBatch:
    """The PackedBatch of these sub-samples, in this order."""
    if not samples:
        raise ValueError("cannot assemble an empty pack")
    return PackedBatch.from_sequences(
        [_sub_sample(s, config.loss_weighting) for s in samples],
        pixel_values=_pixel_values(samples),
        tiles_per_image=torch.from_numpy(np.concatenate([s.tiles_per_image for s in samples])),
        pad_multiple=config.pad_multiple,
        pad_token_id=pad_token_id,
        img_context_id=img_context_id,
        delta_policy=policy,
        rng=rng,
    )


def _sub_sample(sample: TokenizedSample, loss_weighting: str) -> SubSample:
    """The sample with labels shifted by one (label i is token i + 1) and its loss weights."""
    labels = np.append(sample.labels[1:], IGNORE_INDEX)
    supervised = labels != IGNORE_INDEX
    per_token = 1.0 if loss_weighting == "token" else 1.0 / np.sqrt(np.count_nonzero(supervised))
    return SubSample(sample.tokens, labels, np.where(supervised, per_token, 0.0))


def _pixel_values(samples: Sequence[TokenizedSample]) -> torch.Tensor:
    """All tiles of the pack, normalised straight into one tensor (no uint8 or float copies on the side:
    at 256K tokens the float32 tiles alone take about 2.4 GB)."""
    counts = [s.num_tiles for s in samples]
    size = samples[0].tiles.shape[1]
    pixel_values = torch.empty(sum(counts), 3, size, size)
    for sample, start, count in zip(samples, np.cumsum([0, *counts]), counts, strict=False):
        normalize_tiles(sample.tiles, out=pixel_values[start : start + count])
    return pixel_values


class Packer:
    """The packing buffer and the δ random stream; `state_dict` holds only the stream, the caller saves
    where the buffered samples came from."""

    def __init__(
        self, config: PackConfig, rng: np.random.Generator, *, img_context_id: int, pad_token_id: int
    ) -> None:
        self.config = config
        self.policy = parse_delta_policy(config.delta_policy)
        self.rng = rng
        self.buffer: list[TokenizedSample] = []
        self._token_ids = {"img_context_id": img_context_id, "pad_token_id": pad_token_id}

    def add(self, sample: TokenizedSample) -> None:
        """Buffer a sample that fits a pack (see fit_sample)."""
        if len(sample) > self.config.max_seq_len or sample.num_tiles > self.config.max_tiles:
            raise ValueError(f"sample {sample.key} exceeds the pack limits; pass it through fit_sample first")
        self.buffer.append(sample)

    @property
    def full(self) -> bool:
        return len(self.buffer) >= self.config.buffer_size

    def select(self) -> list[TokenizedSample]:
        """Take the oldest sample, then the longest that still fits, until none does."""
        chosen = [self.buffer.pop(0)]
        room = self.config.max_seq_len - self.config.padded_length(len(chosen[0]))
        tile_room = self.config.max_tiles - chosen[0].num_tiles
        while True:
            best, best_length = -1, -1
            for i, sample in enumerate(self.buffer):
                length = self.config.padded_length(len(sample))
                if best_length < length <= room and sample.num_tiles <= tile_room:
                    best, best_length = i, length
            if best < 0:
                return chosen
            sample = self.buffer.pop(best)
            chosen.append(sample)
            room -= best_length
            tile_room -= sample.num_tiles

    def pop_pack(self) -> PackedBatch:
        return assemble_pack(self.select(), self.config, self.policy, self.rng, **self._token_ids)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any], buffer: list[TokenizedSample]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.buffer = list(buffer)
