"""A tiny sentencepiece tokenizer trained on the fly and the tiny model preset that matches it."""

from __future__ import annotations

import pytest

from megatron_v2pe.data.tokenizer import load_tokenizer, train_sentencepiece
from megatron_v2pe.model.presets import tiny
from tests.data.helpers import WORDS


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    texts = [f"{WORDS} {i} item {i} Item {i} is fine. Describe item {i}." for i in range(200)]
    return train_sentencepiece(texts, tmp_path_factory.mktemp("tokenizer") / "tiny.model", vocab_size=400)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    return load_tokenizer(tokenizer_path)


@pytest.fixture(scope="session")
def model(tokenizer):
    """56-px tiles, 4 <IMG_CONTEXT> tokens per tile."""
    return tiny(vocab_size=tokenizer.vocab_size, img_context_token_id=tokenizer.img_context_id)
