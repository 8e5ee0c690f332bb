"""A conversation record and its images -> one tokenized sample, ready to be packed.

Every way a record can be wrong raises BadSample before anything is produced, so a sample either comes
out whole and self-consistent (each image's ``<IMG_CONTEXT>`` run is exactly tokens_per_tile x its tiles)
or not at all.

Tiles per image follow InternVL's multi-image rule: a sample with n images lets each image have at most
max(1, max_tiles // n) grid tiles (plus its thumbnail), so many-image samples use one tile per image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from megatron_v2pe.data.batch import IGNORE_INDEX
from megatron_v2pe.data.conversation import (
    INTERNVL2_SYSTEM_MESSAGE,
    ChatTemplate,
    count_placeholders,
    parse_conversations,
)
from megatron_v2pe.data.images import TilingConfig, decode_image, tile_image
from megatron_v2pe.data.skips import BadSample, SkipReason
from megatron_v2pe.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class SampleConfig:
    """tokens_per_tile and tiling.tile_size come from the model (VLMConfig.tokens_per_tile and
    VLMConfig.vision.image_size); tiling.max_tiles is the tile budget of one sample's images."""

    tokens_per_tile: int
    tiling: TilingConfig = field(default_factory=TilingConfig)
    system_message: str | None = INTERNVL2_SYSTEM_MESSAGE

    def __post_init__(self) -> None:
        if self.tokens_per_tile < 1:
            raise ValueError(f"tokens_per_tile must be positive, got {self.tokens_per_tile}")


@dataclass(frozen=True)
class TokenizedSample:
    key: str
    tokens: np.ndarray  # int64 [n]
    labels: np.ndarray  # int64 [n], tokens[i] where supervised, else IGNORE_INDEX (not shifted)
    tiles: np.ndarray  # uint8 [tiles, S, S, 3], all images' tiles in order
    tiles_per_image: np.ndarray  # int64 [images]
    image_starts: np.ndarray  # int64 [images], index of each <img>
    image_ends: np.ndarray  # int64 [images], index of each </img>
    ref: Any = None  # where the sample came from (source.SampleRef), to re-read it on resume

    def __len__(self) -> int:
        return self.tokens.size

    @property
    def num_tiles(self) -> int:
        return self.tiles.shape[0]

    @property
    def num_targets(self) -> int:
        """Supervised tokens that a preceding token predicts (the first token is never predicted)."""
        return int(np.count_nonzero(self.labels[1:] != IGNORE_INDEX))

    def prefix(self, end: int) -> TokenizedSample:
        """The first `end` tokens and the images inside them; `end` must not fall inside an image."""
        inside = (self.image_starts < end) & (end <= self.image_ends)
        if inside.any():
            raise ValueError(f"cannot cut sample {self.key} at {end}: inside image {int(np.argmax(inside))}")
        kept = int(np.count_nonzero(self.image_starts < end))
        return dataclasses.replace(
            self,
            tokens=self.tokens[:end],
            labels=self.labels[:end],
            tiles=self.tiles[: int(self.tiles_per_image[:kept].sum())],
            tiles_per_image=self.tiles_per_image[:kept],
            image_starts=self.image_starts[:kept],
            image_ends=self.image_ends[:kept],
        )


class SampleBuilder:
    def __init__(self, tokenizer: Tokenizer, config: SampleConfig) -> None:
        self.config = config
        self._template = ChatTemplate(tokenizer, config.system_message)

    def _tiling_for(self, num_images: int) -> TilingConfig:
        budget = max(1, self.config.tiling.max_tiles // num_images)
        return dataclasses.replace(
            self.config.tiling, max_tiles=budget, min_tiles=min(self.config.tiling.min_tiles, budget)
        )

    def build(self, key: str, record: object, images: Sequence[bytes], ref: Any = None) -> TokenizedSample:
        """The sample of a record whose k-th <image> is images[k] (encoded bytes); raises BadSample."""
        turns = parse_conversations(record)
        placeholders = count_placeholders(turns)
        if placeholders != len(images):
            raise BadSample(
                SkipReason.IMAGE_COUNT_MISMATCH,
                f"{placeholders} <image> placeholders but {len(images)} images",
            )
        size = self.config.tiling.tile_size
        tiles = [np.zeros((0, size, size, 3), dtype=np.uint8)]
        if images:
            tiling = self._tiling_for(len(images))
            for k, data in enumerate(images):
                try:
                    image = decode_image(data)
                except ValueError as err:
                    raise BadSample(SkipReason.BAD_IMAGE, f"image {k}: {err}") from None
                tiles.append(tile_image(image, tiling))
        tiles_per_image = np.array([t.shape[0] for t in tiles[1:]], dtype=np.int64)
        context_counts = self.config.tokens_per_tile * tiles_per_image
        rendered = self._template.render(turns, context_counts.tolist())
        sample = TokenizedSample(
            key=key,
            tokens=rendered.tokens,
            labels=rendered.labels,
            tiles=np.concatenate(tiles),
            tiles_per_image=tiles_per_image,
            image_starts=rendered.image_starts,
            image_ends=rendered.image_starts + context_counts + 1,
            ref=ref,
        )
        if sample.num_targets == 0:
            raise BadSample(SkipReason.NO_TARGETS, "no assistant text to supervise")
        return sample
