"""Packing: limits, layout, labels, loss weights, positions and δ per image."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch

from megatron_v2pe.batch import IGNORE_INDEX
from megatron_v2pe.data.images import TilingConfig
from megatron_v2pe.data.packing import PackConfig, Packer, assemble_pack, fit_sample, padding_multiple
from megatron_v2pe.data.sample import SampleBuilder, SampleConfig
from megatron_v2pe.data.skips import DataEvent, SkipReason
from megatron_v2pe.v2pe.positions import RandomDelta, UnitDelta
from tests.data.helpers import context_runs, item_images, item_record, png_bytes

DELTAS = [2.0**-k for k in range(9)]


@pytest.fixture(scope="module")
def builder(tokenizer):
    return SampleBuilder(
        tokenizer, SampleConfig(tokens_per_tile=4, tiling=TilingConfig(56, 6), system_message=None)
    )


def _item(builder, i):
    return builder.build(f"item{i}", item_record(i), [png_bytes(w, h) for w, h in item_images(i)])


def _many_images(builder, key, count):
    record = {
        "conversations": [
            {"from": "human", "value": "<image>" * count + "what?"},
            {"from": "gpt", "value": "ok"},
        ]
    }
    return builder.build(key, record, [png_bytes(56, 56)] * count)


def expected_positions(tokens, cu, deltas, context_id):
    """Direct definition: 0 at each sub-sample start, +1 per text token, +δ of its image per visual token."""
    out, image = np.empty(len(tokens)), -1
    for start, end in pairwise(cu):
        p, previous_visual = None, False
        for i in range(start, end):
            visual = tokens[i] == context_id
            image += visual and not previous_visual
            p = 0.0 if p is None else p + (deltas[image] if visual else 1.0)
            out[i], previous_visual = p, visual
    return out


@pytest.mark.parametrize(
    ("cp", "tp", "sp", "fp8", "multiple"),
    [
        (1, 1, False, False, 2),
        (2, 1, False, False, 4),
        (4, 2, False, False, 8),
        (4, 2, True, False, 16),
        (1, 1, False, True, 16),
        (2, 4, False, True, 32),
        (2, 4, True, True, 128),
        (1, 8, True, False, 16),
    ],
)
def test_padding_multiple(cp, tp, sp, fp8, multiple):
    assert padding_multiple(cp, tp, sequence_parallel=sp, fp8=fp8) == multiple


@pytest.mark.parametrize("weighting", ["square", "token"])
def test_pack_layout_labels_weights_positions(builder, tokenizer, weighting):
    samples = [_item(builder, i) for i in (1, 2, 3)]
    config = PackConfig(max_seq_len=1024, max_tiles=64, pad_multiple=8, loss_weighting=weighting)
    batch = assemble_pack(
        samples,
        config,
        RandomDelta(),
        np.random.default_rng(0),
        img_context_id=tokenizer.img_context_id,
        pad_token_id=tokenizer.pad_id,
    )
    lengths = [len(s) for s in samples]
    padded = [-(-n // 8) * 8 for n in lengths]
    assert batch.cu_seqlens.tolist() == np.cumsum([0, *lengths]).tolist()
    assert batch.cu_seqlens_padded.tolist() == np.cumsum([0, *padded]).tolist()
    tokens, labels, weights = batch.tokens.numpy(), batch.labels.numpy(), batch.loss_weights.numpy()
    for sample, start, n, p in zip(samples, batch.cu_seqlens_padded.tolist(), lengths, padded, strict=False):
        assert np.array_equal(tokens[start : start + n], sample.tokens)
        assert (tokens[start + n : start + p] == tokenizer.pad_id).all()
        for i in range(n):  # label i predicts token i + 1 if that token is supervised
            target = sample.labels[i + 1] if i + 1 < n else IGNORE_INDEX
            assert labels[start + i] == target
        assert (labels[start + n - 1 : start + p] == IGNORE_INDEX).all()
        supervised = labels[start : start + p] != IGNORE_INDEX
        expected = 1.0 if weighting == "token" else 1.0 / np.sqrt(supervised.sum())
        assert np.allclose(weights[start : start + p][supervised], expected)
        assert (weights[start : start + p][~supervised] == 0).all()
    cu = batch.cu_seqlens_padded.tolist()
    positions = batch.positions.numpy()
    assert batch.positions.dtype.is_floating_point and positions.dtype == np.float64
    assert positions[cu[:-1]].tolist() == [0.0] * 3
    assert np.array_equal(
        positions, expected_positions(tokens, cu, batch.deltas.tolist(), tokenizer.img_context_id)
    )
    assert context_runs(tokens, tokenizer.img_context_id) == (4 * batch.tiles_per_image).tolist()
    assert batch.tiles_per_image.tolist() == [t for s in samples for t in s.tiles_per_image.tolist()]
    assert batch.pixel_values.shape == (int(batch.tiles_per_image.sum()), 3, 56, 56)
    tiles = torch.from_numpy(np.concatenate([s.tiles for s in samples])).permute(0, 3, 1, 2).double() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (tiles - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert torch.allclose(batch.pixel_values.double(), expected, atol=1e-5)


def test_unit_delta_gives_integer_positions(builder, tokenizer):
    samples = [_item(builder, i) for i in (2, 5)]
    batch = assemble_pack(
        samples,
        PackConfig(pad_multiple=1),
        UnitDelta(),
        np.random.default_rng(0),
        img_context_id=tokenizer.img_context_id,
        pad_token_id=tokenizer.pad_id,
    )
    assert batch.positions.tolist() == [float(i) for n in map(len, samples) for i in range(n)]


def test_delta_is_drawn_per_image_uniformly(builder, tokenizer):
    """900 images in packs of 3 sub-samples x 10 images: every candidate about 100 times (chi-square, 8
    degrees of freedom, below its 1% critical value 20.09), and images of one sample differ."""
    samples = [_many_images(builder, f"s{k}", 10) for k in range(3)]
    config = PackConfig(max_seq_len=4096, max_tiles=64, pad_multiple=2)
    rng = np.random.default_rng(1234)
    drawn = []
    for _ in range(30):
        batch = assemble_pack(
            samples,
            config,
            RandomDelta(),
            rng,
            img_context_id=tokenizer.img_context_id,
            pad_token_id=tokenizer.pad_id,
        )
        deltas = batch.deltas.numpy()
        assert all(len(set(deltas[10 * j : 10 * j + 10])) > 1 for j in range(3))
        cu = batch.cu_seqlens_padded.tolist()
        assert np.array_equal(
            batch.positions.numpy(),
            expected_positions(batch.tokens.numpy(), cu, deltas, tokenizer.img_context_id),
        )
        drawn.extend(deltas.tolist())
    counts = np.array([drawn.count(d) for d in DELTAS])
    assert counts.sum() == 900
    chi2 = ((counts - 100) ** 2 / 100).sum()
    assert chi2 < 20.09, counts


def test_online_packer_respects_both_limits_and_packs_every_sample_once(builder, tokenizer):
    config = PackConfig(max_seq_len=256, max_tiles=8, pad_multiple=4, buffer_size=6)
    packer = Packer(config, np.random.default_rng(0), img_context_id=tokenizer.img_context_id, pad_token_id=0)
    packs = []
    for i in range(60):
        fit = fit_sample(_item(builder, i), config)
        assert fit.outcome is None
        packer.add(fit.sample)
        if packer.full:
            packs.append(packer.select())
    while packer.buffer:
        packs.append(packer.select())
    keys = [s.key for pack in packs for s in pack]
    assert sorted(keys) == sorted(f"item{i}" for i in range(60))
    for pack in packs:
        assert sum(-(-len(s) // 4) * 4 for s in pack) <= 256
        assert sum(s.num_tiles for s in pack) <= 8
    firsts = [int(pack[0].key[4:]) for pack in packs]
    assert firsts == sorted(firsts)  # the oldest waiting sample always opens the next pack
    assert len(packs) < 60 / 2  # and packs do hold several samples


def _two_turns(builder):
    record = {
        "conversations": [
            {"from": "human", "value": "first"},
            {"from": "gpt", "value": "one"},
            {"from": "human", "value": "<image>x<image>y"},
            {"from": "gpt", "value": "two"},
        ]
    }
    return builder.build("two-turns", record, [png_bytes(112, 56), png_bytes(112, 56)])


def test_over_long_samples_are_dropped_with_the_reason(builder):
    sample = _two_turns(builder)
    assert (
        fit_sample(sample, PackConfig(max_seq_len=len(sample) - 1, pad_multiple=1)).outcome
        is SkipReason.TOO_LONG
    )
    fit = fit_sample(sample, PackConfig(max_seq_len=1024, max_tiles=5, pad_multiple=1))
    assert fit == (None, SkipReason.TOO_MANY_TILES)


def test_truncation_never_cuts_inside_an_image(builder):
    sample = _two_turns(builder)
    second_start, second_end = (int(x) for x in (sample.image_starts[1], sample.image_ends[1]))
    for limit in (second_start + 1, second_start + 5, second_end):
        fit = fit_sample(sample, PackConfig(max_seq_len=limit, over_long="truncate", pad_multiple=1))
        assert fit.outcome is DataEvent.TRUNCATED
        assert len(fit.sample) == second_start and fit.sample.tiles_per_image.tolist() == [3]
        assert np.array_equal(fit.sample.tokens, sample.tokens[:second_start])
    by_tiles = fit_sample(
        sample, PackConfig(max_seq_len=1024, max_tiles=4, over_long="truncate", pad_multiple=1)
    )
    assert len(by_tiles.sample) == second_start and by_tiles.sample.num_tiles == 3


def test_truncation_that_leaves_nothing_supervised_drops(builder, tokenizer):
    sample = _item(builder, 1)  # one image, then the only answer
    fit = fit_sample(
        sample, PackConfig(max_seq_len=int(sample.image_ends[0]), over_long="truncate", pad_multiple=1)
    )
    assert fit == (None, SkipReason.TOO_LONG)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_seq_len": 262_145}, "max_seq_len must be in"),
        ({"max_seq_len": 1000, "pad_multiple": 16}, "multiple of pad_multiple"),
        ({"loss_weighting": "mean"}, "loss_weighting"),
        ({"over_long": "split"}, "over_long"),
        ({"delta_policy": "sometimes"}, "unknown δ policy"),
    ],
)
def test_pack_config_errors_say_what_to_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PackConfig(**kwargs)
