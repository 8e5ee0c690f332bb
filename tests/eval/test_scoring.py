"""MM-NIAH scoring rules on hand-worked responses, and the length × depth aggregation."""

from __future__ import annotations

import pytest

from megatron_v2pe.eval.scoring import (
    Scored,
    aggregate,
    depth_bin,
    parse_choice,
    parse_list,
    score_response,
)


@pytest.mark.parametrize(
    "response, letter",
    [
        ("B", "B"),
        ("The answer is C.", "C"),
        ("**A**", "A"),
        ("the answer is: (d). Because the cat is red.", "D"),
        ("B. The second image shows a dog", "B"),
        ("AB", None),
        ("The answer is B or C", None),
        ("E", None),
        ("", None),
    ],
)
def test_choice_letter_parsing(response, letter):
    assert parse_choice(response) == letter


@pytest.mark.parametrize("task", ["retrieval-image-needle", "reasoning-image-needle"])
def test_multiple_choice_tasks(task):
    assert score_response(task, "The answer is **C**. It shows", "C") == 1.0
    assert score_response(task, "C D", "C") == 0.0
    assert score_response(task, "A", "C") == 0.0


@pytest.mark.parametrize("task", ["counting-text-needle", "counting-image-needle"])
def test_counting_tasks(task):
    assert parse_list("There are [1, 0, 3] needles") == [1, 0, 3]
    assert score_response(task, "[1, 0, 3]", [1, 0, 3]) == 1.0
    assert score_response(task, "[1, 2, 3]", [1, 0, 3]) == pytest.approx(2 / 3)  # positions 0 and 2 match
    assert score_response(task, "[1, 0]", [1, 0, 3, 4]) == pytest.approx(2 / 4)  # missing counts miss
    assert score_response(task, "[0, 0, 3, 4, 5]", [1, 0, 3]) == pytest.approx(2 / 3)  # extras ignored
    assert score_response(task, "no idea", [1]) == 0.0


@pytest.mark.parametrize("task", ["retrieval-text-needle", "reasoning-text-needle"])
def test_free_text_tasks(task):
    assert score_response(task, "Paris!", "paris") == 1.0  # normalised exact match
    assert score_response(task, "I think it is the red apple, surely.", "Red apple") == 1.0  # whole words
    assert score_response(task, "pineapple", "apple") == 0.0  # not a whole word
    assert score_response(task, "the red", "red apple") == 0.0


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="unknown MM-NIAH task"):
        score_response("translation", "x", "x")


def test_depth_bins_are_fifths():
    assert [depth_bin(d) for d in (0.0, 0.19, 0.2, 0.4, 0.6, 0.8, 0.99, 1.0)] == [0, 0, 1, 2, 3, 4, 4, 4]


def test_aggregation_means_over_depth_bins_then_lengths_then_tasks():
    samples = [
        # retrieval-text-needle, length bin 0: depth bin 0 holds 1, 0 (mean 0.5), depth bin 4 holds 1
        Scored("retrieval-text-needle", 100, 0.0, 1.0),
        Scored("retrieval-text-needle", 150, 0.1, 0.0),
        Scored("retrieval-text-needle", 120, 0.9, 1.0),
        # length bin 1: one sample in depth bin 2
        Scored("retrieval-text-needle", 500, 0.5, 0.0),
        # counting-image-needle, length bin 1: depth bins 1 and 3
        Scored("counting-image-needle", 400, 0.3, 0.5),
        Scored("counting-image-needle", 900, 0.7, 1.0),
    ]
    report = aggregate(samples, length_edges=[0, 256])
    assert report.cells["retrieval-text-needle"] == {0: {0: 0.5, 4: 1.0}, 1: {2: 0.0}}
    assert report.per_length["retrieval-text-needle"] == {0: 0.75, 1: 0.0}  # not the sample mean 2/3
    assert report.per_task["retrieval-text-needle"] == 0.375
    assert report.per_length["counting-image-needle"] == {1: 0.75}
    assert report.overall == pytest.approx((0.375 + 0.75) / 2)
