"""Text <-> token ids for InternVL-style models, with the special tokens that place images
(``<img>``, ``<IMG_CONTEXT>``, ``</img>``).

Two backends: a sentencepiece ``.model`` file (InternLM2's ``tokenizer.model``, or a directory holding one)
and a Hugging Face tokenizer directory. The image and grounding tokens are appended after the base
vocabulary in a fixed order unless the tokenizer already defines them, so InternLM2's 92,544 pieces give
``<img>`` = 92544, ``</img>`` = 92545, ``<IMG_CONTEXT>`` = 92546 … ``</box>`` = 92552: InternVL2's ids.

Special tokens are split out of the text before the backend sees it, so a backend never has to know
them, and text between them is encoded piece by piece (as HF slow tokenizers do).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from megatron_v2pe.errors import UsageError

IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

IMAGE_AND_GROUNDING_TOKENS: tuple[str, ...] = (
    IMG_START,
    IMG_END,
    IMG_CONTEXT,
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
)
"""Added after the base vocabulary, in this order (InternVL2's order)."""

CHAT_TOKENS: tuple[str, ...] = (IM_START, IM_END)
"""InternLM2's tokenizer has these in its base vocabulary; other tokenizers get them appended."""

PHI3_CHAT_TOKENS: tuple[str, ...] = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
"""Split out where the tokenizer defines them (Phi-3's does), never appended: only a Phi-3 model has
embeddings for them."""


class _Backend(Protocol):
    """What a tokenizer library must provide: plain-text encoding and the ids it already knows."""

    size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    def known_id(self, token: str) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def _non_negative(value: int | None) -> int | None:
    return value if value is not None and value >= 0 else None


class _SentencePieceBackend:
    def __init__(self, model_file: Path, declared: dict[str, int]) -> None:
        import sentencepiece

        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as err:  # sentencepiece reports a bad file as RuntimeError
            raise UsageError(
                f"{model_file} is not a sentencepiece tokenizer model (it does not parse); give a "
                "tokenizer.model file such as InternLM2's, or a Hugging Face tokenizer directory"
            ) from err
        self._declared = declared
        self.size = self._sp.get_piece_size()
        self.bos_id = _non_negative(self._sp.bos_id())
        self.eos_id = _non_negative(self._sp.eos_id())
        self.pad_id = _non_negative(self._sp.pad_id())

    def known_id(self, token: str) -> int | None:
        if token in self._declared:
            return self._declared[token]
        piece_id = self._sp.piece_to_id(token)  # unknown pieces map to <unk>
        return piece_id if self._sp.id_to_piece(piece_id) == token else None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))


class _HuggingFaceBackend:
    def __init__(self, directory: Path) -> None:
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(str(directory))
        except Exception as err:  # transformers raises many types for unloadable directories
            raise UsageError(
                f"could not load a Hugging Face tokenizer from {directory}: {err}. Tokenizers that need "
                "remote code are not loaded; point at their sentencepiece tokenizer.model instead"
            ) from err
        self._vocab = self._tok.get_vocab()
        self.size = len(self._tok)
        self.bos_id = self._tok.bos_token_id
        self.eos_id = self._tok.eos_token_id
        self.pad_id = self._tok.pad_token_id

    def known_id(self, token: str) -> int | None:
        return self._vocab.get(token)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))


class Tokenizer:
    """Encodes text with the special tokens split out first; ids of specials come from the backend when
    it knows them, else they are appended after its vocabulary."""

    def __init__(self, backend: _Backend) -> None:
        self._backend = backend
        self._special_ids: dict[str, int] = {}
        next_id = backend.size
        for token in IMAGE_AND_GROUNDING_TOKENS + CHAT_TOKENS:
            known = backend.known_id(token)
            if known is None:
                known, next_id = next_id, next_id + 1
            self._special_ids[token] = known
        for token in PHI3_CHAT_TOKENS:
            known = backend.known_id(token)
            if known is not None:
                self._special_ids[token] = known
        self._special_tokens = {i: t for t, i in self._special_ids.items()}
        self.vocab_size = max(next_id, max(self._special_ids.values()) + 1)
        alternatives = sorted(self._special_ids, key=len, reverse=True)
        self._splitter = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    def token_id(self, token: str) -> int:
        """Id of a special token (one of IMAGE_AND_GROUNDING_TOKENS or CHAT_TOKENS, or of PHI3_CHAT_TOKENS
        where the tokenizer defines it)."""
        try:
            return self._special_ids[token]
        except KeyError:
            raise ValueError(
                f"{token!r} is not a special token; known: {sorted(self._special_ids)}"
            ) from None

    def is_special(self, token: str) -> bool:
        return token in self._special_ids

    @property
    def img_start_id(self) -> int:
        return self._special_ids[IMG_START]

    @property
    def img_end_id(self) -> int:
        return self._special_ids[IMG_END]

    @property
    def img_context_id(self) -> int:
        return self._special_ids[IMG_CONTEXT]

    @property
    def bos_id(self) -> int | None:
        return self._backend.bos_id

    @property
    def pad_id(self) -> int:
        """Id of padding tokens; padding is never attended or supervised, so any valid id would do."""
        for candidate in (self._backend.pad_id, self._backend.eos_id):
            if candidate is not None:
                return candidate
        return 0

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._splitter.split(text):
            if piece in self._special_ids:
                ids.append(self._special_ids[piece])
            elif piece:
                ids.extend(self._backend.encode(piece))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        out, plain = [], []
        for i in ids:
            token = self._special_tokens.get(int(i))
            if token is None:
                plain.append(int(i))
                continue
            if plain:
                out.append(self._backend.decode(plain))
                plain = []
            out.append(token)
        if plain:
            out.append(self._backend.decode(plain))
        return "".join(out)


def _declared_added_tokens(directory: Path) -> dict[str, int]:
    """Ids that an HF tokenizer directory assigns to added tokens (InternVL2 lists its 9 specials there)."""
    declared: dict[str, int] = {}
    added = directory / "added_tokens.json"
    if added.is_file():
        declared.update({t: int(i) for t, i in json.loads(added.read_text()).items()})
    config = directory / "tokenizer_config.json"
    if config.is_file():
        decoder = json.loads(config.read_text()).get("added_tokens_decoder", {})
        declared.update({entry["content"]: int(i) for i, entry in decoder.items()})
    return declared


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A sentencepiece ``.model`` file, a directory with ``tokenizer.model`` (read directly, with the ids
    its HF config declares for added tokens), or any other Hugging Face tokenizer directory."""
    path = Path(path)
    if path.is_file():
        return Tokenizer(_SentencePieceBackend(path, {}))
    if path.is_dir():
        if (path / "tokenizer.model").is_file():
            return Tokenizer(_SentencePieceBackend(path / "tokenizer.model", _declared_added_tokens(path)))
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            return Tokenizer(_HuggingFaceBackend(path))
        raise UsageError(f"{path} holds neither a sentencepiece tokenizer.model nor a Hugging Face tokenizer")
    raise UsageError(f"tokenizer not found: {path} (give a sentencepiece .model file or a directory)")


def train_sentencepiece(texts: Iterable[str], model_path: str | Path, vocab_size: int = 512) -> Path:
    """Train a small byte-fallback BPE model (any text encodes) with the chat markers in its base
    vocabulary, laid out like InternLM2's: unk 0, bos 1, eos 2. For tests and demos, not for quality."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        user_defined_symbols=list(CHAT_TOKENS),
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    path = Path(model_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path
