"""The VQA-style answer normaliser MM-NIAH scores free-text answers with, and its whole-word match.

A text is normalised in three steps, applied to the response and to the gold answer alike:

1. newlines and tabs become spaces, the ends are stripped;
2. punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it stands next
   to a space anywhere in the text (or when the text holds a digit-comma-digit group such as ``1,000``),
   else it becomes a space; then every ``.`` not followed by a digit is deleted (``U.S.A.`` -> ``USA``,
   ``3.5`` stays). ``:``, ``'``, ``$``, ``%``, ``#``, ``&``, ``*`` are left alone;
3. words: lower case, number words ``zero`` ... ``twenty``, ``thirty`` ... ``ninety`` become digits, the
   articles ``a``, ``an``, ``the`` are dropped, and contractions written without their apostrophe get it
   back (``dont`` -> ``don't``).

The response then scores 1 when the normalised gold occurs in it as a whole word sequence.

``official`` reproduces MM-NIAH's code (``utils/tools.py``) including two faults: at most 32 periods
are deleted (the flag ``re.UNICODE`` lands in ``sub``'s count argument) and the match is bounded by
``\\b``, which needs a word character on the far side of a gold answer's leading or trailing symbol
(``$5``, ``50%``, ``#1`` never match, not even themselves). ``strict`` deletes every period and bounds
the match by "no word character next to it". ``v2pe`` is V2PE's copy of the official code (faults
included), which first lower-cases, deletes ``,`` and ``?`` and writes ``'s`` as `` 's``. The article fault (a gold of only articles, ``A``,
normalises to nothing and then matches any response with a word in it) is handled by the caller.
"""

from __future__ import annotations

import re
from typing import Literal

Mode = Literal["official", "strict", "v2pe"]

ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = ";/[]\"{}()=+\\_->@<`,?!"
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")
_OFFICIAL_PERIOD_LIMIT = 32

_UNITS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"
_TEENS = "sixteen seventeen eighteen nineteen"
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety"
_NUMBER_WORDS = {word: str(value) for value, word in enumerate(f"{_UNITS} {_TEENS}".split())} | {
    word: str(10 * tens) for tens, word in enumerate(_TENS.split(), 2)
}

# Each contraction with the apostrophe-less spellings the normaliser repairs (the VQA evaluation's list).
_CONTRACTIONS: dict[str, tuple[str, ...]] = {
    "ain't": ("aint",), "aren't": ("arent",), "can't": ("cant",), "could've": ("couldve",),
    "couldn't": ("couldnt",), "couldn't've": ("couldn'tve", "couldnt've"), "didn't": ("didnt",),
    "doesn't": ("doesnt",), "don't": ("dont",), "hadn't": ("hadnt",),
    "hadn't've": ("hadnt've", "hadn'tve"), "hasn't": ("hasnt",), "haven't": ("havent",), "he'd": ("hed",),
    "he'd've": ("hed've", "he'dve"), "he's": ("hes",), "how'd": ("howd",), "how'll": ("howll",),
    "how's": ("hows",), "isn't": ("isnt",), "it'd": ("itd",), "it'd've": ("itd've", "it'dve"),
    "it'll": ("itll",), "ma'am": ("maam",), "mightn't": ("mightnt",),
    "mightn't've": ("mightnt've", "mightn'tve"), "might've": ("mightve",), "mustn't": ("mustnt",),
    "must've": ("mustve",), "needn't": ("neednt",), "not've": ("notve",), "o'clock": ("oclock",),
    "oughtn't": ("oughtnt",), "'ow's'at": ("ow's'at", "'ows'at", "'ow'sat"), "shan't": ("shant",),
    "she'd've": ("shed've", "she'dve"), "should've": ("shouldve",), "shouldn't": ("shouldnt",),
    "shouldn't've": ("shouldnt've", "shouldn'tve"), "somebody'd": ("somebodyd",),
    "somebody'd've": ("somebodyd've", "somebody'dve"), "somebody'll": ("somebodyll",),
    "somebody's": ("somebodys",), "someone'd": ("someoned",),
    "someone'd've": ("someoned've", "someone'dve"), "someone'll": ("someonell",),
    "someone's": ("someones",), "something'd": ("somethingd",),
    "something'd've": ("somethingd've", "something'dve"), "something'll": ("somethingll",),
    "that's": ("thats",), "there'd": ("thered",), "there'd've": ("thered've", "there'dve"),
    "there're": ("therere",), "there's": ("theres",), "they'd": ("theyd",),
    "they'd've": ("theyd've", "they'dve"), "they'll": ("theyll",), "they're": ("theyre",),
    "they've": ("theyve",), "'twas": ("twas",), "wasn't": ("wasnt",), "we'd've": ("wed've", "we'dve"),
    "we've": ("weve",), "weren't": ("werent",), "what'll": ("whatll",), "what're": ("whatre",),
    "what's": ("whats",), "what've": ("whatve",), "when's": ("whens",), "where'd": ("whered",),
    "where's": ("wheres",), "where've": ("whereve",), "who'd": ("whod",),
    "who'd've": ("whod've", "who'dve"), "who'll": ("wholl",), "who's": ("whos",), "who've": ("whove",),
    "why'll": ("whyll",), "why're": ("whyre",), "why's": ("whys",), "won't": ("wont",),
    "would've": ("wouldve",), "wouldn't": ("wouldnt",), "wouldn't've": ("wouldnt've", "wouldn'tve"),
    "y'all": ("yall",), "y'all'll": ("yall'll", "y'allll"),
    "y'all'd've": ("yall'd've", "y'alld've", "y'all'dve"), "you'd": ("youd",),
    "you'd've": ("youd've", "you'dve"), "you'll": ("youll",), "you're": ("youre",), "you've": ("youve",),
}  # fmt: skip
_REPAIRS = {spelling: word for word, spellings in _CONTRACTIONS.items() for spelling in spellings}


def strip_punctuation(text: str, mode: Mode = "official") -> str:
    """Step 2: punctuation deleted or turned into spaces, then periods not followed by a digit deleted."""
    join_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        glued = join_all or f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if glued else " ")
    return _PERIOD.sub("", out, count=0 if mode == "strict" else _OFFICIAL_PERIOD_LIMIT)


def normalise_words(text: str, drop_articles: bool = True) -> str:
    """Step 3: lower-cased words, number words as digits, articles dropped, contractions repaired."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_REPAIRS.get(w, w) for w in words if not (drop_articles and w in ARTICLES))


def normalise(text: str, mode: Mode = "official", drop_articles: bool = True) -> str:
    """The three steps: whitespace, punctuation, words (after V2PE's extra step in ``v2pe`` mode)."""
    if mode == "v2pe":
        text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return normalise_words(strip_punctuation(text, mode), drop_articles)


def contains_words(text: str, words: str, mode: Mode = "official") -> bool:
    """Whether ``words`` occurs in ``text`` as a whole (official, v2pe: between ``\\b`` boundaries)."""
    escaped = re.escape(words)
    pattern = rf"(?<!\w){escaped}(?!\w)" if mode == "strict" else rf"\b{escaped}\b"
    return re.search(pattern, text) is not None
