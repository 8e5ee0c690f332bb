r"""Conversation records and the chat templates they are rendered with.

A record (InternVL's format) holds ``conversations``: a list of ``{"from": role, "value": text}`` with
role ``system`` (first turn only), ``human`` or ``gpt`` (``user``/``assistant`` are accepted too). Each
``<image>`` in a text stands for the next image of the sample.

A template (``TEMPLATES``, chosen by name: InternVL's config.json ``template`` field) says how turns become
text, as InternVL's fine-tuning renders them (each one string, wrapped here; ``\n`` is a newline)::

    internlm2-chat  <s><|im_start|>system\n{system}<|im_end|><|im_start|>user\n{q}<|im_end|>
                    <|im_start|>assistant\n{a}<|im_end|>...           (every text stripped)
    Hermes-2        the same without <s>, texts as written
    internvl2_5     [<s>]<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n
                    <|im_start|>assistant\n{a}<|im_end|>\n...        (<s> where the tokenizer has one)
    phi3-chat       <s><|system|>\n{system}<|end|><|user|>\n{q}<|end|><|assistant|>\n{a}<|end|>...

Only assistant text and the end marker closing it are supervised (the model must learn to stop; the
``\n`` after it is not); everything else, image tokens included, gets IGNORE_INDEX. Labels here are not
shifted: label i is about token i. Each ``<image>`` becomes ``<img>``, that image's ``<IMG_CONTEXT>``
slots, ``</img>``. A turn's header and the text after it up to its first image are one piece of text for
the tokenizer, as in InternVL's (a BPE may merge ``\n`` with a text's leading newlines); the header's own
tokens are not supervised, which is InternVL's rule too.

Beyond InternVL's preprocessing: a record's system turn replaces the default with every template
(InternVL's reads one only with ``internvl2_5``), and ``<image>`` is an image in any turn (``internvl2_5``
places images in user turns only, so an answer's placeholder fails its image count there).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from megatron_v2pe.batch import IGNORE_INDEX
from megatron_v2pe.data.skips import BadSample, SkipReason
from megatron_v2pe.data.tokenizer import IM_END, IM_START, IMG_CONTEXT, IMG_END, IMG_START, Tokenizer

IMAGE_PLACEHOLDER = "<image>"

INTERNVL2_SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，"  # noqa: RUF001 (InternVL2's exact text)
    "英文名叫InternVL, 是一个有用无害的人工智能助手。"
)
"""The default system message of InternVL2's templates (and Mini-InternVL's)."""

INTERNVL2_5_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，"  # noqa: RUF001 (InternVL2.5's exact text)
    "是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"  # noqa: RUF001
)
"""The default system message of ``internvl2_5``, InternVL2.5's, InternVL3's and InternVL3.5's template."""


class SystemMessage(enum.Enum):
    """``TEMPLATE``: the template's default system message, the one its releases were trained with."""

    TEMPLATE = "template"

_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_RESERVED = (IMG_START, IMG_END, IMG_CONTEXT)


@dataclass(frozen=True)
class Turn:
    role: str  # "system", "user" or "assistant"
    text: str


def parse_conversations(record: object) -> list[Turn]:
    """The turns of a record; BadSample(BAD_RECORD) saying what is wrong otherwise."""
    if not isinstance(record, dict):
        raise BadSample(SkipReason.BAD_RECORD, f"the record is a {type(record).__name__}, not a JSON object")
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise BadSample(SkipReason.BAD_RECORD, "'conversations' must be a non-empty list")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise BadSample(SkipReason.BAD_RECORD, f"turn {i} is not {{'from': role, 'value': text}}")
        role = _ROLES.get(turn.get("from"))
        if role is None:
            raise BadSample(
                SkipReason.BAD_RECORD, f"turn {i} has role {turn.get('from')!r}; use one of {sorted(_ROLES)}"
            )
        if role == "system" and i:
            raise BadSample(SkipReason.BAD_RECORD, f"turn {i} is a system turn; only the first turn may be")
        reserved = [t for t in _RESERVED if t in turn["value"]]
        if reserved:
            raise BadSample(
                SkipReason.BAD_RECORD,
                f"turn {i} contains {reserved[0]}, which only the pipeline places; write {IMAGE_PLACEHOLDER}",
            )
        turns.append(Turn(role, turn["value"]))
    return turns


def count_placeholders(turns: Sequence[Turn]) -> int:
    return sum(turn.text.count(IMAGE_PLACEHOLDER) for turn in turns)


@dataclass(frozen=True)
class RenderedConversation:
    tokens: np.ndarray  # int64 [n]
    labels: np.ndarray  # int64 [n], tokens[i] where supervised, else IGNORE_INDEX (not shifted)
    image_starts: np.ndarray  # int64 [images], index of each image's <img>


@dataclass(frozen=True)
class ChatTemplate:
    """One conversation format: each turn is ``headers[role] + text + turn_end + separator``, after the
    tokenizer's BOS when ``bos`` (and the tokenizer has one). InternVL's templates differ only in these."""

    name: str
    headers: Mapping[str, str]  # role ("system", "user", "assistant") -> the text that opens its turn
    turn_end: str  # closes every turn; supervised after an answer
    system_message: str  # used when a record has no system turn
    separator: str = ""  # after turn_end; never supervised
    bos: bool = True
    strip_turns: bool = False  # each turn's text is .strip()ped before it is placed

    @property
    def markers(self) -> set[str]:
        """The special tokens the template is written with; each must be one token of the tokenizer."""
        return set(re.findall(r"<\|\w+\|>", "".join(self.headers.values()) + self.turn_end))


CHATML_HEADERS = MappingProxyType({role: f"{IM_START}{role}\n" for role in ("system", "user", "assistant")})
PHI3_HEADERS = MappingProxyType({role: f"<|{role}|>\n" for role in ("system", "user", "assistant")})

TEMPLATES: Mapping[str, ChatTemplate] = MappingProxyType(
    {
        t.name: t
        for t in (
            ChatTemplate(
                "internlm2-chat", CHATML_HEADERS, IM_END, INTERNVL2_SYSTEM_MESSAGE, strip_turns=True
            ),
            ChatTemplate("Hermes-2", CHATML_HEADERS, IM_END, INTERNVL2_SYSTEM_MESSAGE, bos=False),
            ChatTemplate("internvl2_5", CHATML_HEADERS, IM_END, INTERNVL2_5_SYSTEM_MESSAGE, separator="\n"),
            ChatTemplate("phi3-chat", PHI3_HEADERS, "<|end|>", INTERNVL2_SYSTEM_MESSAGE),
        )
    }
)
"""The templates by InternVL's names (config.json ``template``): ``internlm2-chat`` (InternVL2-2B/8B/26B,
InternVL2-Llama3-76B), ``Hermes-2`` (InternVL2-1B/40B), ``phi3-chat`` (InternVL2-4B, Mini-InternVL-4B),
``internvl2_5`` (InternVL2.5, InternVL3, InternVL3.5 on Qwen/InternLM backbones)."""


def chat_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(
            f"chat template {name!r} (config.json's template) is not implemented; implemented: "
            f"{sorted(TEMPLATES)}"
        ) from None


def check_markers(template: ChatTemplate, tokenizer: Tokenizer) -> None:
    """Raises unless each of the template's special tokens is one token of the tokenizer (Phi-3's
    markers exist only in Phi-3's tokenizer)."""
    missing = [m for m in sorted(template.markers) if not tokenizer.is_special(m)]
    if missing:
        raise ValueError(
            f"chat template {template.name!r} needs {', '.join(missing)} as special tokens, which the "
            "tokenizer does not define; use the tokenizer of the model the template belongs to"
        )


class ConversationRenderer:
    """Renders turns to token ids and labels with one template; its fixed pieces are encoded once."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: ChatTemplate | str = "internlm2-chat",
        system_message: str | None | SystemMessage = SystemMessage.TEMPLATE,
    ) -> None:
        """system_message: SystemMessage.TEMPLATE for the template's default, None for no system turn."""
        self.template = chat_template(template) if isinstance(template, str) else template
        check_markers(self.template, tokenizer)
        self._tokenizer = tokenizer
        if system_message is SystemMessage.TEMPLATE:
            system_message = self.template.system_message
        self._system_message = system_message
        self._headers = {role: tokenizer.encode(text) for role, text in self.template.headers.items()}
        self._turn_end = tokenizer.encode(self.template.turn_end)
        self._separator = tokenizer.encode(self.template.separator)
        self._bos = [tokenizer.bos_id] if self.template.bos and tokenizer.bos_id is not None else []

    def render(self, turns: Sequence[Turn], image_token_counts: Sequence[int]) -> RenderedConversation:
        """image_token_counts[k]: <IMG_CONTEXT> slots of the k-th image (tokens per tile x its tiles)."""
        if count_placeholders(turns) != len(image_token_counts):
            raise ValueError(f"{count_placeholders(turns)} placeholders for {len(image_token_counts)} images")
        if turns[0].role != "system" and self._system_message is not None:
            turns = [Turn("system", self._system_message), *turns]
        tok = self._tokenizer
        pieces: list[np.ndarray] = []
        supervised: list[bool] = []
        image_starts: list[int] = []
        length = 0

        def add(ids: Sequence[int] | np.ndarray, is_target: bool = False) -> None:
            nonlocal length
            pieces.append(np.asarray(ids, dtype=np.int64))
            supervised.append(is_target)
            length += len(ids)

        add(self._bos)
        images = iter(image_token_counts)
        for turn in turns:
            answer = turn.role == "assistant"
            text = turn.text.strip() if self.template.strip_turns else turn.text
            first, *after_images = text.split(IMAGE_PLACEHOLDER)
            opened = tok.encode(self.template.headers[turn.role] + first)
            header_length = len(self._headers[turn.role])
            add(opened[:header_length])
            add(opened[header_length:], answer)
            for part in after_images:
                image_starts.append(length)
                add([tok.img_start_id])
                add(np.full(next(images), tok.img_context_id))
                add([tok.img_end_id])
                add(tok.encode(part), answer)
            add(self._turn_end, answer)
            add(self._separator)
        tokens = np.concatenate(pieces)
        is_target = np.repeat(np.array(supervised), [len(p) for p in pieces])
        return RenderedConversation(
            tokens=tokens,
            labels=np.where(is_target, tokens, IGNORE_INDEX),
            image_starts=np.array(image_starts, dtype=np.int64),
        )
