"""Records and images -> tokenized samples."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_v2pe.data.images import TilingConfig
from megatron_v2pe.data.sample import SampleBuilder, SampleConfig
from megatron_v2pe.data.skips import BadSample, SkipReason
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
