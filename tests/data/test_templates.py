"""Chat templates token for token, against sequences written out by hand from InternVL's formats.
InternVL2's ``internlm2-chat``: ``<s><|im_start|>system\\n{system}<|im_end|>``,
``<|im_start|>user\\n{user}<|im_end|>``, ``<|im_start|>assistant\\n{answer}<|im_end|>`` with nothing between turns, every turn's text stripped,
only the answers and their ``<|im_end|>`` supervised; ``Hermes-2`` the same without ``<s>`` or stripping;
``internvl2_5`` a ``\\n`` after every ``<|im_end|>`` (never supervised), ``<s>`` only where the tokenizer
has one, texts as written; ``phi3-chat`` ``<|system|>\\n``, ``<|user|>\\n``, ``<|assistant|>\\n`` headers
and ``<|end|>``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from megatron_v2pe.batch import IGNORE_INDEX
from megatron_v2pe.data.conversation import (
    TEMPLATES,
    ConversationRenderer,
    SystemMessage,
    Turn,
    chat_template,
)
from megatron_v2pe.data.sample import SampleConfig
from megatron_v2pe.data.tokenizer import Tokenizer
from megatron_v2pe.model.presets import tiny


class ByteBackend:
    """Text -> its UTF-8 bytes + 3 (0 unk, 1 bos, 2 eos): every id of a sequence can be written by hand."""

    size, bos_id, eos_id, pad_id = 259, 1, 2, None

    def known_id(self, token: str) -> None:
        return None

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode()]

    def decode(self, ids) -> str:
        return bytes(i - 3 for i in ids).decode()


# Specials are appended after the 259 base ids in the tokenizer's fixed order: <img>, </img>,
# <IMG_CONTEXT>, 6 grounding tokens, then <|im_start|>, <|im_end|>.
BOS, IMG, END_IMG, CTX, IM_START, IM_END = 1, 259, 260, 261, 268, 269


def b(text: str) -> list[int]:
    return [c + 3 for c in text.encode()]


@pytest.fixture
def renderer():
    return lambda system="Be brief.": ConversationRenderer(Tokenizer(ByteBackend()), "internlm2-chat", system)


SYSTEM_DEFAULT = SystemMessage.TEMPLATE
INTERNVL2_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"  # noqa: RUF001


def _supervised(rendered) -> list[int]:
    keep = rendered.labels != IGNORE_INDEX
    assert np.array_equal(rendered.labels[keep], rendered.tokens[keep])
    return rendered.labels[keep].tolist()


def test_system_and_two_turns_with_whitespace(renderer):
    turns = [Turn("user", "  What is it?\n"), Turn("assistant", " A dog. ")]
    rendered = renderer().render(turns, [])
    expected = (
        [BOS, IM_START, *b("system\nBe brief."), IM_END]
        + [IM_START, *b("user\nWhat is it?"), IM_END]
        + [IM_START, *b("assistant\nA dog."), IM_END]
    )
    assert rendered.tokens.tolist() == expected
    assert _supervised(rendered) == [*b("A dog."), IM_END]


def test_multi_turn_with_several_images(renderer):
    turns = [
        Turn("system", " Look closely. "),
        Turn("user", "<image>\nWhat is this?"),
        Turn("assistant", "A cat."),
        Turn("user", "\tAnd <image> with <image>? "),
        Turn("assistant", "\nTwo dogs.\n\n"),
    ]
    rendered = renderer(system=None).render(turns, [3, 2, 1])
    first = [IM_START, *b("user\n"), IMG, CTX, CTX, CTX, END_IMG, *b("\nWhat is this?"), IM_END]
    second = [IM_START, *b("user\nAnd "), IMG, CTX, CTX, END_IMG, *b(" with "), IMG, CTX, END_IMG]
    second += [*b("?"), IM_END]
    expected = (
        [BOS, IM_START, *b("system\nLook closely."), IM_END]
        + first
        + [IM_START, *b("assistant\nA cat."), IM_END]
        + second
        + [IM_START, *b("assistant\nTwo dogs."), IM_END]
    )
    assert rendered.tokens.tolist() == expected
    assert _supervised(rendered) == [*b("A cat."), IM_END, *b("Two dogs."), IM_END]
    assert rendered.image_starts.tolist() == [i for i, t in enumerate(expected) if t == IMG]


def test_default_system_message_and_none(renderer):
    turns = [Turn("user", "q"), Turn("assistant", "a")]
    default = ConversationRenderer(Tokenizer(ByteBackend())).render(turns, [])
    system = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"  # noqa: RUF001
    tail = [IM_START, *b("user\nq"), IM_END, IM_START, *b("assistant\na"), IM_END]
    assert default.tokens.tolist() == [BOS, IM_START, *b("system\n" + system), IM_END, *tail]
    assert renderer(system=None).render(turns, []).tokens.tolist() == [BOS, *tail]


def test_templates_are_named_and_unknown_names_are_refused():
    assert chat_template("internlm2-chat") is TEMPLATES["internlm2-chat"]
    assert set(TEMPLATES) == {"internlm2-chat", "Hermes-2", "internvl2_5", "phi3-chat"}
    with pytest.raises(ValueError, match="chat template 'vicuna' .*not implemented.*internlm2-chat"):
        chat_template("vicuna")
    with pytest.raises(ValueError, match="chat template 'vicuna'"):
        SampleConfig(tokens_per_tile=4, template="vicuna")
    # a model config carries its release's template
    assert dataclasses.replace(tiny(), template="internvl2_5").template == "internvl2_5"


INTERNVL2_5_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"  # noqa: RUF001
NL = b("\n")[0]


class NoBosBackend(ByteBackend):
    """Qwen's tokenizers have no BOS."""

    bos_id = None


class MergingBackend(NoBosBackend):
    """Encodes "\\n\\n" as one id (258: byte 0xFF, never in UTF-8), as Qwen's BPE does."""

    def encode(self, text: str) -> list[int]:
        ids = []
        for k, part in enumerate(text.split("\n\n")):
            ids += [258] * bool(k) + super().encode(part)
        return ids


class Phi3Backend(ByteBackend):
    """Defines Phi-3's chat markers, as Phi-3's tokenizer does (ids 300-303)."""

    MARKERS = {"<|system|>": 300, "<|user|>": 301, "<|assistant|>": 302, "<|end|>": 303}

    def known_id(self, token: str) -> int | None:
        return self.MARKERS.get(token)


SYSTEM, USER, ASSISTANT, END = 300, 301, 302, 303


def render(backend, template, turns, images=(), system="Be brief."):
    return ConversationRenderer(Tokenizer(backend), template, system).render(turns, list(images))


def test_internvl2_5_multi_turn_keeps_whitespace_and_newlines_after_each_turn():
    turns = [Turn("user", " What is it?\n"), Turn("assistant", " A dog. "), Turn("user", "Sure?"),
             Turn("assistant", "Yes.\n")]  # fmt: skip
    expected = (
        [IM_START, *b("system\nBe brief."), IM_END, NL]
        + [IM_START, *b("user\n What is it?\n"), IM_END, NL]
        + [IM_START, *b("assistant\n A dog. "), IM_END, NL]
        + [IM_START, *b("user\nSure?"), IM_END, NL]
        + [IM_START, *b("assistant\nYes.\n"), IM_END, NL]
    )
    rendered = render(NoBosBackend(), "internvl2_5", turns)
    assert rendered.tokens.tolist() == expected
    assert _supervised(rendered) == [*b(" A dog. "), IM_END, *b("Yes.\n"), IM_END]
    # an InternLM tokenizer (it adds BOS) gets BOS once, first
    assert render(ByteBackend(), "internvl2_5", turns).tokens.tolist() == [BOS, *expected]


def test_internvl2_5_default_system_message_and_images_over_two_turns():
    turns = [Turn("user", "<image>\nWhat?"), Turn("assistant", "A cat."), Turn("user", "And <image>"),
             Turn("assistant", "A dog.")]  # fmt: skip
    rendered = render(NoBosBackend(), "internvl2_5", turns, [2, 1], SYSTEM_DEFAULT)
    expected = (
        [IM_START, *b("system\n" + INTERNVL2_5_SYSTEM), IM_END, NL]
        + [IM_START, *b("user\n"), IMG, CTX, CTX, END_IMG, *b("\nWhat?"), IM_END, NL]
        + [IM_START, *b("assistant\nA cat."), IM_END, NL]
        + [IM_START, *b("user\nAnd "), IMG, CTX, END_IMG, IM_END, NL]
        + [IM_START, *b("assistant\nA dog."), IM_END, NL]
    )
    assert rendered.tokens.tolist() == expected
    assert _supervised(rendered) == [*b("A cat."), IM_END, *b("A dog."), IM_END]
    assert rendered.image_starts.tolist() == [i for i, t in enumerate(expected) if t == IMG]


def test_a_header_is_tokenized_with_the_text_after_it_and_its_own_length_unsupervised():
    # "assistant\n" + "\nTwo" is one piece of text, so its two newlines merge, as InternVL's tokenizer
    # sees them; the header alone is IM_START + 10 ids, so the merged id is not supervised (InternVL's rule)
    rendered = render(MergingBackend(), "internvl2_5", [Turn("user", "q"), Turn("assistant", "\nTwo")])
    answer = [IM_START, *b("assistant"), 258, *b("Two"), IM_END, NL]
    assert rendered.tokens.tolist()[-len(answer):] == answer
    assert _supervised(rendered) == [*b("Two"), IM_END]


def test_hermes_2_has_no_bos_and_keeps_whitespace():
    turns = [Turn("user", " <image> hi "), Turn("assistant", " Hello.\n")]
    expected = (
        [IM_START, *b("system\n" + INTERNVL2_SYSTEM), IM_END]
        + [IM_START, *b("user\n "), IMG, CTX, END_IMG, *b(" hi "), IM_END]
        + [IM_START, *b("assistant\n Hello.\n"), IM_END]
    )
    rendered = render(ByteBackend(), "Hermes-2", turns, [1], SYSTEM_DEFAULT)
    assert rendered.tokens.tolist() == expected
    assert _supervised(rendered) == [*b(" Hello.\n"), IM_END]


def test_phi3_chat_multi_turn_with_images():
    turns = [Turn("user", "<image>\nWhat? "), Turn("assistant", "A cat."), Turn("user", " And <image>?"),
             Turn("assistant", " Two.")]  # fmt: skip
    expected = (
        [BOS, SYSTEM, *b("\n" + INTERNVL2_SYSTEM), END]
        + [USER, NL, IMG, CTX, CTX, END_IMG, *b("\nWhat? "), END]
        + [ASSISTANT, *b("\nA cat."), END]
        + [USER, *b("\n And "), IMG, CTX, END_IMG, *b("?"), END]
        + [ASSISTANT, *b("\n Two."), END]
    )
    rendered = render(Phi3Backend(), "phi3-chat", turns, [2, 1], SYSTEM_DEFAULT)
    assert rendered.tokens.tolist() == expected
    assert _supervised(rendered) == [*b("A cat."), END, *b(" Two."), END]
    assert rendered.image_starts.tolist() == [i for i, t in enumerate(expected) if t == IMG]


def test_a_template_whose_markers_the_tokenizer_lacks_is_refused():
    markers = r"<\|assistant\|>, <\|end\|>, <\|system\|>, <\|user\|> as special tokens"
    with pytest.raises(ValueError, match="'phi3-chat' needs " + markers):
        ConversationRenderer(Tokenizer(ByteBackend()), "phi3-chat")
    assert Tokenizer(ByteBackend()).encode("<|end|>") == b("<|end|>")  # never appended: plain text
