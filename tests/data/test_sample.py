"""Records and images -> tokenized samples."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from megatron_v2pe.data.images import TilingConfig
from megatron_v2pe.data.config import DataConfig, DatasetSpec
from megatron_v2pe.data.loader import sample_config
from megatron_v2pe.data.sample import SampleBuilder, SampleConfig
from megatron_v2pe.data.skips import BadSample, SkipReason
from megatron_v2pe.model.presets import internvl2_2b
from tests.data.helpers import context_runs, png_bytes


@pytest.fixture
def builder(tokenizer):
    return SampleBuilder(
        tokenizer, SampleConfig(tokens_per_tile=4, tiling=TilingConfig(56, 6), system_message=None)
    )


def _record(question, answer="ok"):
    return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


@pytest.mark.parametrize(
    ("sizes", "tiles"),
    [
        ([(56, 56)], [1]),
        ([(112, 56)], [3]),  # (2,1) grid + thumbnail
        ([(112, 56), (56, 112), (112, 56)], [3, 3, 3]),  # budget 6 // 3 = 2 tiles per image (+ thumbnail)
        ([(112, 56)] * 4, [1] * 4),  # budget 6 // 4 = 1: no thumbnail
        ([(336, 56), (56, 56)], [4, 1]),  # budget 3: (3,1) + thumbnail; square: one tile
    ],
)
def test_each_image_gets_tokens_per_tile_times_its_tiles(builder, tokenizer, sizes, tiles):
    sample = builder.build(
        "k", _record("<image>" * len(sizes) + "what?"), [png_bytes(w, h) for w, h in sizes]
    )
    assert sample.tiles_per_image.tolist() == tiles
    assert sample.tiles.shape == (sum(tiles), 56, 56, 3)
    assert context_runs(sample.tokens, tokenizer.img_context_id) == [4 * t for t in tiles]
    assert sample.tokens[sample.image_starts].tolist() == [tokenizer.img_start_id] * len(sizes)
    assert sample.tokens[sample.image_ends].tolist() == [tokenizer.img_end_id] * len(sizes)


def test_text_only_sample(builder):
    sample = builder.build("k", _record("hello"), [])
    assert sample.num_tiles == 0 and sample.tiles.shape == (0, 56, 56, 3) and sample.num_targets > 0


@pytest.mark.parametrize(
    ("record", "images", "reason"),
    [
        (_record("<image><image>"), [png_bytes(9, 9)], SkipReason.IMAGE_COUNT_MISMATCH),
        (_record("no placeholder"), [png_bytes(9, 9)], SkipReason.IMAGE_COUNT_MISMATCH),
        (_record("<image>"), [b"not an image"], SkipReason.BAD_IMAGE),
        ({"conversations": [{"from": "human", "value": "only a question"}]}, [], SkipReason.NO_TARGETS),
        ({"conv": []}, [], SkipReason.BAD_RECORD),
    ],
)
def test_bad_samples_raise_with_their_reason(builder, record, images, reason):
    with pytest.raises(BadSample) as caught:
        builder.build("k", record, images)
    assert caught.value.reason is reason


def test_prefix_keeps_whole_images_only(builder):
    sample = builder.build("k", _record("<image>a<image>b"), [png_bytes(56, 56), png_bytes(56, 56)])
    first_end, second_start = int(sample.image_ends[0]), int(sample.image_starts[1])
    cut = sample.prefix(second_start)
    assert cut.tiles_per_image.tolist() == [1] and cut.num_tiles == 1 and len(cut) == second_start
    assert np.array_equal(cut.tokens, sample.tokens[:second_start])
    with pytest.raises(ValueError, match="inside image 0"):
        sample.prefix(first_end)  # would keep <img> and the slots but not </img>


def test_per_image_budget_keeps_every_images_tiles(tokenizer):
    """The V2PE recipe: 4 images of 2:1 each keep their (2,1) grid + thumbnail (per_sample: 6 // 4 = 1)."""
    config = SampleConfig(
        tokens_per_tile=4, tiling=TilingConfig(56, 6), system_message=None, tile_budget="per_image"
    )
    images = [png_bytes(112, 56)] * 4
    sample = SampleBuilder(tokenizer, config).build("k", _record("<image>" * 4 + "what?"), images)
    assert sample.tiles_per_image.tolist() == [3, 3, 3, 3]
    assert context_runs(sample.tokens, tokenizer.img_context_id) == [12, 12, 12, 12]


def test_the_models_tiling_and_template_unless_the_data_config_sets_them():
    model = internvl2_2b()
    data = DataConfig(datasets=(DatasetSpec("unused"),), tokenizer="unused")
    built = sample_config(data, model)
    assert (built.tiling.max_tiles, built.tiling.use_thumbnail, built.tile_budget) == (12, True, "per_sample")
    assert (built.template, built.tokens_per_tile, built.tiling.tile_size) == ("internlm2-chat", 256, 448)
    chosen = sample_config(dataclasses.replace(data, max_image_tiles=5, tile_budget="per_image"), model)
    assert (chosen.tiling.max_tiles, chosen.tile_budget) == (5, "per_image")
    one_tile = dataclasses.replace(model.image_format, dynamic_image_size=False)
    fixed = dataclasses.replace(model, image_format=one_tile)
    assert sample_config(data, fixed).tiling.max_tiles == 1
