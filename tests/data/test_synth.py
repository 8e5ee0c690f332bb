"""Synthetic long-context data: answers that can be checked against the sample, and shards the
pipeline reads without a single skip."""

from __future__ import annotations

import ast
import re

import numpy as np
import pytest

from megatron_v2pe.data.config import DataConfig, DatasetSpec
from megatron_v2pe.data.loader import PackStream
from megatron_v2pe.data.long_context_synth import COLORS, SynthConfig, generate, long_mr, mm_niah
from megatron_v2pe.data.source import Consumer
from megatron_v2pe.data.tokenizer import load_tokenizer
from megatron_v2pe.model.presets import tiny
from tests.data.helpers import load_tool

CONFIG = SynthConfig(image_size=56, tokens_per_image=4)


def _text(sample):
    return sample.conversations[0]["value"]


@pytest.mark.parametrize("family", ["mmniah", "longvqa", "longmr"])
def test_samples_are_well_formed_and_deterministic(family):
    first = list(generate(family, 6, 3, CONFIG, context_tokens=(200, 400), depths=(0.0, 1.0)))
    again = list(generate(family, 6, 3, CONFIG, context_tokens=(200, 400), depths=(0.0, 1.0)))
    for a, b in zip(first, again, strict=True):
        assert a.conversations == b.conversations and a.metadata == b.metadata
        assert all(
            np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images, strict=True)
        )
        placeholders = sum(turn["value"].count("<image>") for turn in a.conversations)
        assert placeholders == len(a.images) > 0 and "." not in a.key
        assert a.conversations[-1]["from"] == "gpt"


def test_longer_context_means_more_haystack():
    short = mm_niah("k", "retrieval", "text", 300, 0.5, np.random.default_rng(0), CONFIG)
    long = mm_niah("k", "retrieval", "text", 3000, 0.5, np.random.default_rng(0), CONFIG)
    assert len(long.images) > 5 * len(short.images)


def test_text_needles_hold_the_answer():
    rng = np.random.default_rng(0)
    retrieval = mm_niah("r", "retrieval", "text", 400, 0.5, rng, CONFIG)
    animal = re.search(r"secret code of the (\w+)\?", retrieval.conversations[0]["value"]).group(1)
    assert re.findall(rf"The secret code of the {animal} is (\d+)", _text(retrieval)) == [
        retrieval.metadata["answer"]
    ]
    counting = mm_niah("c", "counting", "text", 400, 0.2, rng, CONFIG)
    counted = [int(n) for n in re.findall(r"The little penguin counted (\d) needles", _text(counting))]
    assert counted == ast.literal_eval(counting.conversations[1]["value"])
    reasoning = mm_niah("t", "reasoning", "text", 400, 0.0, rng, CONFIG)
    taller = dict(re.findall(r"(\w+) is taller than (\w+)", _text(reasoning)))
    tallest = next(name for name in taller if name not in taller.values())
    assert reasoning.conversations[1]["value"] == tallest


def _has_color(image, color, top):
    """Whether the exact fill color occurs in the top strip (icons) or below it (scenes)."""
    pixels = np.asarray(image)
    strip = pixels[: image.height // 4] if top else pixels[image.height // 4 :]
    return bool((strip == COLORS[color]).all(axis=-1).any())


def test_image_needles_are_where_the_answer_says():
    counting = mm_niah(
        "c", "counting", "image", 600, 0.3, np.random.default_rng(1), SynthConfig(image_size=112)
    )
    counts = ast.literal_eval(counting.metadata["answer"])
    color = re.search(r"How many (\w+) ", counting.conversations[0]["value"]).group(1)
    assert [_has_color(image, color, top=True) for image in counting.images] == [c > 0 for c in counts]
    retrieval = long_mr("r", "retrieval", 600, 0.5, np.random.default_rng(2), SynthConfig(image_size=112))
    color = re.search(r"shows an? (\w+) ", retrieval.conversations[0]["value"]).group(1)
    index = int(retrieval.metadata["answer"]) - 1
    assert _has_color(retrieval.images[index], color, top=False)


def test_synth_tool_writes_shards_the_pipeline_packs(tmp_path):
    tool = load_tool("synth_data")
    tokenizer_path = tmp_path / "tok.model"
    assert (
        tool.main(
            [
                "--out",
                str(tmp_path),
                "--samples",
                "6",
                "--context-tokens",
                "150",
                "--image-size",
                "56",
                "--tokens-per-image",
                "4",
                "--tokenizer",
                str(tokenizer_path),
                "--vocab-size",
                "400",
            ]
        )
        == 0
    )
    tokenizer = load_tokenizer(tokenizer_path)
    model = tiny(vocab_size=tokenizer.vocab_size, img_context_token_id=tokenizer.img_context_id)
    datasets = tuple(
        DatasetSpec(str(tmp_path / family / "manifest.json")) for family in ("mmniah", "longvqa", "longmr")
    )
    config = DataConfig(
        datasets=datasets,
        tokenizer=str(tokenizer_path),
        num_epochs=1,
        shuffle_buffer=4,
        max_seq_len=1024,
        max_tiles=96,
        pack_buffer_size=4,
        over_long="truncate",
    )
    stream = PackStream(config, model, Consumer(0, 1))
    subsamples = sum(len(batch.cu_seqlens) - 1 for batch in stream)
    assert subsamples == 18 and stream.stats.total_skipped == 0
