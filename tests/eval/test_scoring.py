"""MM-NIAH's scoring rules on hand-worked responses, in both modes.

Every expected score is worked out by hand from the rule as MM-NIAH's ``calculate_scores.py`` and
``utils/tools.py`` state it (and, for ``strict``, from the fault it fixes), not from our code.
"""

from __future__ import annotations

import pytest

from megatron_v2pe.eval.answer_normaliser import normalise, strip_punctuation
from megatron_v2pe.eval.scoring import TASK_KINDS, choice_index, parse_counts, score_response

CHOICE_TASKS = ["retrieval-image", "reasoning-image"]
COUNTING_TASKS = ["counting-text", "counting-image"]
FREE_TASKS = ["retrieval-text", "reasoning-text"]
MODES = ["official", "strict"]


def test_every_task_has_a_rule():
    assert sorted(CHOICE_TASKS + COUNTING_TASKS + FREE_TASKS) == sorted(TASK_KINDS)


# (response, option it names); the rule: digits only -> 0-based number; else lower, drop "the answer is"
# and "*", cut at the first "." (dropping ","), strip: one letter or nothing.
CHOICES = [
    ("B", 1),
    ("b", 1),
    ("1", 1),  # a digit is a 0-based option number
    ("1.", 1),  # "." stripped first
    ("01", 1),
    ("0", 0),
    (".B", 1),
    ("..B..", 1),
    ("**C**", 2),
    ("The answer is C.", 2),  # " c" after the phrase goes
    ("B. The second image shows a dog", 1),  # cut at the first "."
    ("  D  ", 3),
    ("(B)", None),  # three characters
    ("B)", None),
    ("[B]", None),
    ("(B). text", None),  # "(b)" before the "."
    ("The answer is (B).", None),
    ("The answer is: B", None),  # ": b"
    ("AB", None),
    (" 1", None),  # not digits only: "1" is then no letter
    ("", None),
    ("none", None),
    ("²", None),  # the official code crashes here (isdigit, then int)
    ("I think the camera is moving left", 0),
]


@pytest.mark.parametrize("response, option", CHOICES)
def test_choice_parsing(response, option):
    assert choice_index(response) == option


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("task", CHOICE_TASKS)
def test_multiple_choice_scores(task, mode):
    for response, option in CHOICES:
        for answer in range(4):
            assert score_response(task, response, answer, mode) == float(option == answer), (response, answer)


# (response, answer, official, strict): JSON lists (or objects of lists) compared position by position.
COUNTING = [
    ("[1, 0, 3]", [1, 0, 3], 1.0, 1.0),
    ("[1, 2, 3]", [1, 0, 3], 2 / 3, 2 / 3),
    ("[1.0, 2.0, 3.0]", [1, 2, 3], 1.0, 1.0),  # 1.0 == 1
    ('{"a": [1, 2], "b": [3]}', [1, 2, 3], 1.0, 1.0),  # values concatenated
    ('{"a": 1, "b": [2]}', [1, 2], 0.0, 0.0),  # a value that is no list
    ("```json\n[2, 2]\n```", [2, 2], 1.0, 1.0),  # fences and "json" removed
    ("[1, 2, 3].", [1, 2, 3], 1.0, 1.0),
    ("[1, 0]", [1, 0, 3, 4], 2 / 4, 2 / 4),  # missing positions miss
    ("[1, 0, 3, 4, 5]", [1, 0, 3], 1.0, 1.0),  # extra ones are ignored
    ("[true, false]", [1, 0], 1.0, 0.0),  # official: True == 1, False == 0
    ('["1", 2]', [1, 2], 1 / 2, 1 / 2),  # a string is no count
    ("1, 2, 3", [1, 2, 3], 0.0, 0.0),  # no JSON
    ("There are [1, 2, 3]", [1, 2, 3], 0.0, 0.0),
    ("[1, 2, 3] apples", [1, 2, 3], 0.0, 0.0),
    ("(1, 2, 3)", [1, 2, 3], 0.0, 0.0),
    ("3", [3], 0.0, 0.0),  # a bare number is no list
    ("None", [1], 0.0, 0.0),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("task", COUNTING_TASKS)
def test_counting_scores(task, mode):
    for response, answer, official, strict in COUNTING:
        expected = official if mode == "official" else strict
        assert score_response(task, response, answer, mode) == pytest.approx(expected), response


def test_counting_lists():
    assert parse_counts('{"x": [1], "y": [], "z": [2, 3]}') == [1, 2, 3]
    assert parse_counts("[[1], 2]") == [[1], 2]
    assert parse_counts("[1, 2") is None


# (response, answer, official, strict): normalised answer found in the normalised response as whole words.
FREE = [
    ("Paris.", "paris", 1.0, 1.0),
    ("Eiffel Tower", "the Eiffel Tower", 1.0, 1.0),  # articles dropped
    ("It is the red apple, surely!", "Red apple", 1.0, 1.0),  # whole words inside the response
    ("pineapple", "apple", 0.0, 0.0),  # not a whole word
    ("three", "3", 1.0, 1.0),  # number words -> digits
    ("twenty", "20", 1.0, 1.0),
    ("dont", "don't", 1.0, 1.0),  # the apostrophe given back
    ("1000", "1,000", 1.0, 1.0),  # a digit-comma-digit text deletes every mark
    ("USA", "U.S.A.", 1.0, 1.0),  # periods not followed by a digit deleted
    ("10 30", "10:30", 0.0, 0.0),  # ":" is kept
    ("3 5", "3.5", 0.0, 0.0),  # a period followed by a digit is kept
    ("New-York - yes", "New York", 0.0, 0.0),  # " - " in the text: every "-" deleted -> "newyork"
    ("New-York", "New York", 1.0, 1.0),  # no "-" next to a space: "-" -> " "
    ("5", "$5", 0.0, 0.0),  # "$" is kept
    ("$5", "$5", 0.0, 1.0),  # official: \b cannot stand before "$" at the start
    ("It costs $5.", "$5", 0.0, 1.0),  # nor after a space
    ("50%", "50%", 0.0, 1.0),  # nor after "%" at the end
    ("#1", "#1", 0.0, 1.0),
    ("The winner was #1 again", "#1", 0.0, 1.0),
    ("A", "A", 0.0, 1.0),  # official: the gold "a" is emptied and "" has no word boundary
    ("B", "A", 1.0, 0.0),  # official: the emptied gold matches any word
    ("an", "A", 0.0, 0.0),  # official: "an" is emptied too; strict keeps articles: "an" != "a"
    ("", "cat", 0.0, 0.0),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("task", FREE_TASKS)
def test_free_text_scores(task, mode):
    for response, answer, official, strict in FREE:
        expected = official if mode == "official" else strict
        assert score_response(task, response, answer, mode) == expected, (response, answer)


def test_official_deletes_at_most_32_periods():
    # 33 periods: official keeps the last ("x x ... x a.b"), strict deletes it ("... ab")
    response = "x. " * 32 + "a.b"
    assert score_response("retrieval-text", response, "ab", "official") == 0.0
    assert score_response("retrieval-text", response, "ab", "strict") == 1.0


# (task, response, answer, official, v2pe): where V2PE's copy of the rules scores otherwise
V2PE_COPY = [
    ("retrieval-image", "left", 0, 0.0, 1.0),  # a bare left / right names A / B
    ("reasoning-image", "Right.", 1, 0.0, 1.0),
    ("retrieval-text", "$5", "$5", 0.0, 1.0),  # the exact match it tries first
    ("reasoning-text", "A", "A", 0.0, 1.0),
    ("retrieval-text", "The answer is **Paris**. Surely", "paris", 1.0, 1.0),
    ("reasoning-text", "Paris,France", "Paris France", 1.0, 0.0),  # "," deleted, not a space
    ("retrieval-text", "Is it Rome?Yes", "Rome Yes", 1.0, 0.0),  # "?" deleted
    ("counting-text", "[true, 0]", [1, 0], 1.0, 1.0),  # counting unchanged
]


@pytest.mark.parametrize("task, response, answer, official, v2pe", V2PE_COPY)
def test_v2pe_copy_of_the_rules(task, response, answer, official, v2pe):
    assert score_response(task, response, answer, "official") == official
    assert score_response(task, response, answer, "v2pe") == v2pe


def test_normaliser_steps():
    assert strip_punctuation("a(b)c") == "a b c"  # no mark next to a space: marks become spaces
    assert strip_punctuation("a (b) c") == "a b c"  # "(" and ")" next to spaces: deleted
    assert strip_punctuation("1,000 (b)") == "1000 b"  # a digit-comma-digit group: all deleted
    assert normalise("  The\tman's dog\n") == "man's dog"
    assert normalise("An apple; a pear") == "apple pear"  # ";" next to a space: deleted


def test_bad_answers_are_refused():
    with pytest.raises(ValueError, match="unknown MM-NIAH task"):
        score_response("translation", "x", "x")
    with pytest.raises(ValueError, match="unknown scoring mode"):
        score_response("retrieval-text", "x", "x", "lenient")
    with pytest.raises(TypeError, match="0-based option number"):
        score_response("retrieval-image", "B", "B")
    with pytest.raises(TypeError, match="list of counts"):
        score_response("counting-text", "[1]", "[1]")
