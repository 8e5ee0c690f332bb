"""MM-NIAH's length x depth aggregation against tables worked out by hand, in both binnings."""

from __future__ import annotations

import pytest

from megatron_v2pe.eval.mmniah.aggregation import (
    OFFICIAL_LENGTH_EDGES,
    Scored,
    aggregate,
    default_length_edges,
    depth_bin,
    length_bin,
    sample_depth,
)

SAMPLES = [
    # counting-text, 1,000-2,000 tokens: needles at 0.1 and 0.5 (mean 0.3 -> bin 1, first 0.1 -> bin 0)
    Scored("counting-text", 1500, (0.1, 0.5), 1.0),
    # needles at 0.9 and 0.7: mean 0.8 -> bin 4, first 0.7 -> bin 3
    Scored("counting-text", 1500, (0.9, 0.7), 0.5),
    Scored("counting-text", 3000, (0.2,), 0.0),  # 2,000-4,000, bin 1
    Scored("retrieval-text", 1200, (0.6,), 1.0),  # official bin 2 (0.6 / 0.2 = 2.9999999999999996)
    Scored("retrieval-text", 70000, (1.0,), 1.0),  # the open last length bin, depth 1.0 -> bin 4
]
UNDER = Scored("counting-text", 900, (0.5,), 1.0)  # below the first official edge


def test_depth_and_length_bins():
    depths = (0.0, 0.19, 0.2, 0.4, 0.6, 0.8, 0.99, 1.0)
    assert [depth_bin(d, "official") for d in depths] == [0, 0, 1, 2, 2, 4, 4, 4]
    assert [depth_bin(d, "strict") for d in depths] == [0, 0, 1, 2, 3, 4, 4, 4]
    assert sample_depth((0.1, 0.5), "official") == pytest.approx(0.3)
    assert sample_depth((0.9, 0.7), "adaptive") == 0.7
    lengths = (999, 1000, 1999, 2000, 63999, 64000, 10**6)
    assert [length_bin(n, OFFICIAL_LENGTH_EDGES) for n in lengths] == [None, 0, 0, 1, 9, 10, 10]
    assert default_length_edges([100, 250, 300], "adaptive") == [64, 128, 256]
    assert default_length_edges([100], "official") == list(OFFICIAL_LENGTH_EDGES)


def test_official_binning():
    report = aggregate([*SAMPLES, UNDER], OFFICIAL_LENGTH_EDGES, "official", "official")
    assert report.dropped == 1
    assert report.tasks == ["retrieval-text", "counting-text"]
    empty = [None] * 5
    assert report.cells["counting-text"] == [[None, 1.0, None, None, 0.5], [None, 0.0, None, None, None]] + [
        empty
    ] * 9
    assert report.counts["counting-text"][:2] == [[0, 1, 0, 0, 1], [0, 1, 0, 0, 0]]
    # a length bin: the mean over all five depth cells, empty ones counting 0
    counting = [(1.0 + 0.5) / 5, 0.0] + [0.0] * 9
    retrieval = [1.0 / 5] + [0.0] * 9 + [1.0 / 5]
    assert report.per_length["counting-text"] == pytest.approx(counting)
    assert report.per_length["retrieval-text"] == pytest.approx(retrieval)
    # a task: the mean over all 11 length bins, empty ones counting 0
    assert report.per_task == pytest.approx({"counting-text": 0.3 / 11, "retrieval-text": 0.4 / 11})
    assert report.mean_per_length == pytest.approx([(0.3 + 0.2) / 2, 0.0] + [0.0] * 8 + [0.1])
    assert report.overall == pytest.approx((0.3 / 11 + 0.4 / 11) / 2)
    assert report.by_needle == pytest.approx({"text": (0.3 / 11 + 0.4 / 11) / 2})


def test_strict_mode_bins_0_6_in_bin_3():
    official = aggregate(SAMPLES, OFFICIAL_LENGTH_EDGES, "official", "official")
    strict = aggregate(SAMPLES, OFFICIAL_LENGTH_EDGES, "official", "strict")
    assert official.cells["retrieval-text"][0] == [None, None, 1.0, None, None]
    assert strict.cells["retrieval-text"][0] == [None, None, None, 1.0, None]


def test_adaptive_binning():
    report = aggregate(SAMPLES, [1000, 2000, 4000], "adaptive", "official")
    # first needle depth: 0.1 -> bin 0, 0.7 -> bin 3; empty cells and length bins are left out
    assert report.cells["counting-text"] == [
        [1.0, None, None, 0.5, None],
        [None, 0.0, None, None, None],
        [None] * 5,
    ]
    assert report.per_length["counting-text"] == [0.75, 0.0, None]
    assert report.per_length["retrieval-text"] == [1.0, None, 1.0]
    assert report.per_task == {"counting-text": 0.375, "retrieval-text": 1.0}
    assert report.mean_per_length == [0.875, 0.0, 1.0]
    assert report.overall == 0.6875 and report.dropped == 0
    with pytest.raises(ValueError, match="below the first length bin"):
        aggregate([UNDER], [1000], "adaptive")


def test_image_and_text_needle_means():
    samples = [
        Scored("retrieval-image", 1000, (0.0,), 1.0),
        Scored("counting-image", 1000, (0.0,), 0.5),
        Scored("reasoning-text", 1000, (0.0,), 1.0),
    ]
    report = aggregate(samples, [1000], "adaptive")
    assert report.by_needle == {"image": 0.75, "text": 1.0}
    assert report.overall == pytest.approx(2.5 / 3)


def test_nothing_left_is_a_clear_error():
    with pytest.raises(ValueError, match="no sample reaches the first length bin .*--binning adaptive"):
        aggregate([UNDER], OFFICIAL_LENGTH_EDGES)
