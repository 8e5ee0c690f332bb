"""A conversation record and its images -> one tokenized sample, ready to be packed.

Every way a record can be wrong raises BadSample before anything is produced, so a sample either comes
out whole and self-consistent (each image's ``<IMG_CONTEXT>`` run is exactly tokens_per_tile x its tiles)
or not at all.

Tiles per image follow the tile budget (``images.tiling_for_images``): ``per_sample`` (InternVL's rule:
each of n images gets at most max(1, max_tiles // n) grid tiles, plus its thumbnail) or ``per_image``
(the V2PE recipe: each image up to max_tiles).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from megatron_v2pe.batch import IGNORE_INDEX
from megatron_v2pe.data.conversation import (
    ConversationRenderer,
    SystemMessage,
    chat_template,
    count_placeholders,
    parse_conversations,
)
from megatron_v2pe.data.images import TilingConfig, decode_image, tile_image, tiling_for_images
from megatron_v2pe.data.skips import BadSample, SkipReason
from megatron_v2pe.data.tokenizer import Tokenizer
from megatron_v2pe.model.presets import TILE_BUDGETS, TileBudget


@dataclass(frozen=True)
class SampleConfig:
    """tokens_per_tile and tiling.tile_size come from the model (VLMConfig.tokens_per_tile and
    VLMConfig.vision.image_size), the template from the model (VLMConfig.template); tiling.max_tiles
    is shared by a sample's images or given to each (tile_budget, one of TILE_BUDGETS)."""

    tokens_per_tile: int
    tiling: TilingConfig = field(default_factory=TilingConfig)
    system_message: str | None | SystemMessage = SystemMessage.TEMPLATE  # None: no system turn
    template: str = "internlm2-chat"
    tile_budget: TileBudget = "per_sample"

    def __post_init__(self) -> None:
        if self.tokens_per_tile < 1:
            raise ValueError(f"tokens_per_tile must be positive, got {self.tokens_per_tile}")
        if self.tile_budget not in TILE_BUDGETS:
            raise ValueError(f"tile_budget must be one of {TILE_BUDGETS}, got {self.tile_budget!r}")
        chat_template(self.template)  # raises, naming the known templates


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
        self._renderer = ConversationRenderer(tokenizer, config.template, config.system_message)

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
            tiling = tiling_for_images(self.config.tiling, len(images), self.config.tile_budget)
            for k, data in enumerate(images):
                try:
                    image = decode_image(data)
                except ValueError as err:
                    raise BadSample(SkipReason.BAD_IMAGE, f"image {k}: {err}") from None
                tiles.append(tile_image(image, tiling))
        tiles_per_image = np.array([t.shape[0] for t in tiles[1:]], dtype=np.int64)
        context_counts = self.config.tokens_per_tile * tiles_per_image
        rendered = self._renderer.render(turns, context_counts.tolist())
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
