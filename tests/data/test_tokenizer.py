"""Tokenizer ids and the InternLM2 chat template."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import sentencepiece

from megatron_v2pe.batch import IGNORE_INDEX
from megatron_v2pe.data.conversation import ConversationRenderer, Turn, parse_conversations
from megatron_v2pe.data.skips import BadSample, SkipReason
from megatron_v2pe.data.tokenizer import Tokenizer, load_tokenizer
from megatron_v2pe.errors import UsageError

INTERNVL2_IDS = {
    "<img>": 92544,
    "</img>": 92545,
    "<IMG_CONTEXT>": 92546,
    "<quad>": 92547,
    "</quad>": 92548,
    "<ref>": 92549,
    "</ref>": 92550,
    "<box>": 92551,
    "</box>": 92552,
}


class _InternLM2LikeBackend:
    """The shape of InternLM2's tokenizer.model: 92,544 pieces, chat markers among them."""

    size, bos_id, eos_id, pad_id = 92544, 1, 2, None

    def known_id(self, token):
        return {"<|im_end|>": 92542, "<|im_start|>": 92543}.get(token)

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_internlm2_vocabulary_gets_internvl2_ids():
    tok = Tokenizer(_InternLM2LikeBackend())
    assert {t: tok.token_id(t) for t in INTERNVL2_IDS} == INTERNVL2_IDS
    assert tok.vocab_size == 92553
    assert tok.encode("<|im_start|>ab<IMG_CONTEXT>") == [92543, ord("a"), ord("b"), 92546]


def test_sentencepiece_specials_follow_the_base_vocabulary(tokenizer_path, tokenizer):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_path))
    base = sp.get_piece_size()
    order = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
    assert [tokenizer.token_id(t) for t in order] == list(range(base, base + 9))
    assert tokenizer.vocab_size == base + 9
    assert tokenizer.token_id("<|im_start|>") == sp.piece_to_id("<|im_start|>") < base
    assert tokenizer.bos_id == sp.bos_id()


def test_encode_splits_special_tokens_and_decodes_back(tokenizer):
    text = "<ref>red circle</ref><box>[[1, 2]]</box> ünïcödé 你好\n<img><IMG_CONTEXT></img>"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert ids.count(tokenizer.img_context_id) == 1
    assert tokenizer.encode("<IMG_CONTEXT><IMG_CONTEXT>") == [tokenizer.img_context_id] * 2


def test_ids_declared_by_a_tokenizer_directory_win(tmp_path, tokenizer_path):
    shutil.copy(tokenizer_path, tmp_path / "tokenizer.model")
    declared = {"700": {"content": "<IMG_CONTEXT>"}, "701": {"content": "<img>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": declared}))
    tok = load_tokenizer(tmp_path)
    assert tok.img_context_id == 700 and tok.img_start_id == 701
    assert tok.vocab_size == 702


def test_hugging_face_tokenizer_directory(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "user": 5}
    raw = RawTokenizer(WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    fast.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.img_start_id == 6 and tok.img_context_id == 8 and tok.token_id("<|im_start|>") == 15
    assert tok.encode("hello<img>world") == [3, 6, 4]
    assert tok.bos_id == 1 and tok.pad_id == 2


def test_missing_or_bad_tokenizer_says_what_to_give(tmp_path):
    with pytest.raises(UsageError, match=r"sentencepiece \.model file or a directory"):
        load_tokenizer(tmp_path / "nope.model")
    with pytest.raises(UsageError, match="neither a sentencepiece"):
        load_tokenizer(tmp_path)
    (tmp_path / "text.model").write_text("not a tokenizer\n")
    with pytest.raises(UsageError, match=r"text\.model is not a sentencepiece tokenizer model"):
        load_tokenizer(tmp_path / "text.model")


def _render(tokenizer, turns, images=(), system="You are helpful."):
    return ConversationRenderer(tokenizer, "internlm2-chat", system).render(turns, list(images))


def test_chat_template_text(tokenizer):
    turns = [
        Turn("user", "<image>What is it?"),
        Turn("assistant", "A circle."),
        Turn("user", "Sure?"),
        Turn("assistant", "Yes."),
    ]
    rendered = _render(tokenizer, turns, images=[8])
    expected = (
        "<|im_start|>system\nYou are helpful.<|im_end|>"
        "<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 8 + "</img>What is it?<|im_end|>"
        "<|im_start|>assistant\nA circle.<|im_end|>"
        "<|im_start|>user\nSure?<|im_end|>"
        "<|im_start|>assistant\nYes.<|im_end|>"
    )
    assert rendered.tokens[0] == tokenizer.bos_id
    assert tokenizer.decode(rendered.tokens[1:].tolist()) == expected
    image_start = int(rendered.image_starts[0])
    assert rendered.tokens[image_start] == tokenizer.img_start_id
    assert rendered.tokens[image_start + 9] == tokenizer.img_end_id


def test_only_assistant_text_and_its_end_marker_are_supervised(tokenizer):
    turns = [
        Turn("system", "Be brief."),
        Turn("user", "Hi <image>"),
        Turn("assistant", "Hello."),
        Turn("user", "Again"),
        Turn("assistant", "Hello again."),
    ]
    rendered = _render(tokenizer, turns, images=[4], system=None)
    supervised = rendered.labels != IGNORE_INDEX
    assert np.array_equal(rendered.labels[supervised], rendered.tokens[supervised])
    assert tokenizer.decode(rendered.labels[supervised].tolist()) == "Hello.<|im_end|>Hello again.<|im_end|>"
    # the supervised tokens are exactly the two answers: each contiguous run decodes to one answer
    runs = np.split(np.flatnonzero(supervised), np.flatnonzero(np.diff(np.flatnonzero(supervised)) > 1) + 1)
    assert [tokenizer.decode(rendered.tokens[r].tolist()) for r in runs] == [
        "Hello.<|im_end|>",
        "Hello again.<|im_end|>",
    ]


def test_default_system_message_is_internvl2s(tokenizer):
    rendered = ConversationRenderer(tokenizer).render([Turn("user", "q"), Turn("assistant", "a")], [])
    text = tokenizer.decode(rendered.tokens[1:].tolist())
    assert text.startswith(
        "<|im_start|>system\n你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "  # noqa: RUF001
        "是一个有用无害的人工智能助手。<|im_end|><|im_start|>user\nq<|im_end|>"
    )


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"conversations": []}, "non-empty list"),
        ([1, 2], "not a JSON object"),
        ({"conversations": [{"from": "bot", "value": "x"}]}, "role 'bot'"),
        (
            {"conversations": [{"from": "human", "value": "x"}, {"from": "system", "value": "y"}]},
            "only the first",
        ),
        (
            {"conversations": [{"from": "human", "value": "look <IMG_CONTEXT>"}]},
            "only the pipeline places",
        ),
        ({"conversations": [{"from": "human"}]}, "turn 0 is not"),
    ],
)
def test_bad_records_are_rejected_with_the_reason(record, message):
    with pytest.raises(BadSample, match=message) as caught:
        parse_conversations(record)
    assert caught.value.reason is SkipReason.BAD_RECORD
