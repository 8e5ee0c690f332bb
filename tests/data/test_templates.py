"""Chat templates token for token, against sequences written out by hand from InternVL2's format:
``<s><|im_start|>system\\n{system}<|im_end|><|im_start|>user\\n{user}<|im_end|>`` then
``<|im_start|>assistant\\n{answer}<|im_end|>`` with nothing between turns, every turn's text stripped,
only the answers and their ``<|im_end|>`` supervised."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from megatron_v2pe.batch import IGNORE_INDEX
from megatron_v2pe.data.conversation import TEMPLATES, ConversationRenderer, Turn, chat_template
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
    with pytest.raises(ValueError, match="chat template 'vicuna' .*not implemented.*internlm2-chat"):
        chat_template("vicuna")
    with pytest.raises(ValueError, match="chat template 'vicuna'"):
        SampleConfig(tokens_per_tile=4, template="vicuna")
    # a model config carries its release's template (conversion needs none); the data pipeline refuses it
    assert dataclasses.replace(tiny(), template="internvl2_5").template == "internvl2_5"
