"""MM-NIAH's rules for scoring one response, in three modes.

Six tasks = {retrieval, counting, reasoning} x {text needle, image needle}. The kind of the gold answer
picks the rule, as in MM-NIAH's ``calculate_scores.py``: an option number (retrieval-image,
reasoning-image) is multiple choice, a list of counts (counting-text, counting-image) is counting, a text
(retrieval-text, reasoning-text) is free text. Every rule first strips leading and trailing ``.``.

``official`` (the default) reproduces MM-NIAH's code, faults included, so that published numbers can be
matched; ``strict`` is the same rules without the faults; ``v2pe`` is the copy V2PE's repository scores
with (the official rules and faults, and a few additions). Each rule's docstring says where they differ.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Literal

from megatron_v2pe.eval.answer_normaliser import ARTICLES, Mode, contains_words, normalise

AnswerKind = Literal["choice", "counting", "free"]
MODES: tuple[Mode, ...] = ("official", "strict", "v2pe")

TASK_KINDS: dict[str, AnswerKind] = {
    "retrieval-text": "free",
    "retrieval-image": "choice",
    "counting-text": "counting",
    "counting-image": "counting",
    "reasoning-text": "free",
    "reasoning-image": "choice",
}


def choice_index(response: str, mode: Mode = "official") -> int | None:
    """The 0-based option a response names, or None.

    A response of decimal digits only is the option's number counted from 0 (``1``, ``1.``, ``01`` -> B;
    ``0`` -> A). Otherwise, lower-cased, with "the answer is" and ``*`` removed and, when it holds a
    ``.``, cut at the first one (commas removed), it must be a single letter (``B``, ``.B``, ``**B**``,
    ``B. a dog`` -> B; ``(B)``, ``B)``, ``[B]``, ``The answer is: B`` -> None). A response containing
    "the camera is moving left" / "right" names A / B (a rule the official code carries for another
    benchmark; v2pe: also a bare ``left`` / ``right``). The official code tests ``str.isdigit``, true for
    ``²``, and then crashes in ``int``; here such a response names no option.
    """
    text = response.strip(".")
    if text.isdecimal():
        return int(text)
    text = text.lower().replace("the answer is", "").replace("*", "")
    if "." in text:
        text = text.split(".")[0].replace(",", "")
    text = text.strip()
    bare = mode == "v2pe"
    if "the camera is moving left" in text or (bare and text == "left"):
        text = "a"
    elif "the camera is moving right" in text or (bare and text == "right"):
        text = "b"
    return ord(text) - ord("a") if len(text) == 1 and "a" <= text <= "z" else None


def score_choice(response: str, answer: int, mode: Mode = "official") -> float:
    return float(choice_index(response, mode) == answer)


def parse_counts(response: str) -> list | None:
    """The list a counting response holds, or None.

    The response (``json`` and code fences removed) must parse as JSON: a list (``[1, 2.0, 3]``), or an
    object whose values are lists, concatenated in order (``{"a": [1, 2], "b": [3]}``). Anything else is
    None: ``1, 2, 3``, ``(1, 2, 3)``, ``There are [1, 2, 3]``, ``[1, 2, 3] apples``, a bare ``3``.
    """
    text = response.strip(".").replace("json", "").replace("```", "").strip()
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if isinstance(value, dict):
        if not all(isinstance(v, list) for v in value.values()):
            return None
        value = [item for v in value.values() for item in v]
    return value if isinstance(value, list) else None


def score_counting(response: str, answer: Sequence[int], mode: Mode = "official") -> float:
    """Soft accuracy: the fraction of the answer's positions where the parsed list holds the same count
    (``1.0`` equals 1; missing positions miss, extra ones are ignored). Official: Python's ``==``, so
    ``true`` counts as 1 and ``false`` as 0; strict: a boolean is no count."""
    if not answer:
        raise ValueError("a counting answer needs at least one count")
    predicted = parse_counts(response) or []
    if mode == "strict":
        predicted = [None if isinstance(p, bool) else p for p in predicted]
    return sum(p == a for p, a in zip(predicted, answer)) / len(answer)


def _v2pe_cut(text: str) -> str:
    text = text.lower().replace("the answer is", "").replace("*", "")
    return text.split(".")[0].replace(",", "").strip() if "." in text else text


def score_free(response: str, answer: str, mode: Mode = "official") -> float:
    """1 when the normalised answer occurs in the normalised response as whole words (see
    ``answer_normaliser``): ``the Eiffel Tower`` = ``Eiffel Tower``, ``3`` = ``three``, ``1,000`` =
    ``1000``, ``U.S.A.`` = ``USA``; ``10:30`` != ``10 30``, ``3.5`` != ``3 5``, ``$5`` != ``5``.
    Official: a gold of articles only (``A``) normalises to nothing, which matches any response with a
    word character in it (and not itself); strict keeps the articles on both sides for such a gold.
    V2PE's copy first scores 1 when both, lower-cased, without "the answer is" and ``*`` and cut at the
    first ``.``, are equal (a cut response is stripped, an uncut gold is not)."""
    if mode == "v2pe" and _v2pe_cut(response.strip(".")).strip() == _v2pe_cut(answer):
        return 1.0
    with_articles = normalise(answer, mode, drop_articles=False)
    keep = mode == "strict" and bool(with_articles) and set(with_articles.split()) <= ARTICLES
    gold = with_articles if keep else normalise(answer, mode)
    if mode == "strict" and not gold:
        return 0.0
    said = normalise(response.strip("."), mode, drop_articles=not keep)
    return float(contains_words(said, gold, mode))


def score_response(
    task: str, response: str, answer: str | int | Sequence[int], mode: Mode = "official"
) -> float:
    """The score in [0, 1] of one response under its task's rule."""
    kind = TASK_KINDS.get(task)
    if kind is None:
        raise ValueError(f"unknown MM-NIAH task {task!r}; expected one of {sorted(TASK_KINDS)}")
    if mode not in MODES:
        raise ValueError(f"unknown scoring mode {mode!r}; expected one of {list(MODES)}")
    if kind == "counting":
        if isinstance(answer, str | int):
            raise TypeError(f"task {task!r} needs a list of counts, got {answer!r}")
        return score_counting(response, answer, mode)
    if kind == "choice":
        if not isinstance(answer, int) or isinstance(answer, bool):
            raise TypeError(f"task {task!r} needs a 0-based option number, got {answer!r}")
        return score_choice(response, answer, mode)
    if not isinstance(answer, str):
        raise TypeError(f"task {task!r} needs a text answer, got {answer!r}")
    return score_free(response, answer, mode)
