"""MM-NIAH prompts: the official user text, and its tokens as the training pipeline lays them out.

The ``mmniah`` protocol is MM-NIAH's (``utils/tools.py:get_input`` and ``eval_internvl.py``): the
context, a newline, the question, then either one line ``"\\n<L>. <option>"`` per option
(``"<L>. <image>"`` for an image option, whose image follows the context's) and ``"\\nAnswer with the
option's letter from the given choices directly."``, or, with no options, ``"\\nAnswer the question
using a single word or phrase."``; every image is resized to one tile (``dynamic_image_size=False``).
The ``v2pe`` protocol is V2PE's copy (``eval/mm_niah/``): no newline between context and question, no
"single word" line when the record's answer is a list (counting), images tiled up to 5 tiles plus a
thumbnail each.

Tokens come from the training pipeline's own ``SampleBuilder`` (chat template, ``<image>`` ->
``<img>`` + tokens_per_tile x tiles ``<IMG_CONTEXT>`` + ``</img>``) with the gold answer as the assistant
turn, cut just before the answer: the model sees the layout it was trained on, and the cut-off tail is
the gold answer for teacher-forced scoring. Our shards are tiled within the sample's budget, as in
training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from megatron_v2pe.batch import IGNORE_INDEX
from megatron_v2pe.data.images import TilingConfig, normalize_tiles
from megatron_v2pe.data.sample import SampleBuilder, SampleConfig
from megatron_v2pe.data.skips import BadSample
from megatron_v2pe.data.tokenizer import Tokenizer

if TYPE_CHECKING:
    from megatron_v2pe.eval.generation import Prompt
    from megatron_v2pe.eval.mmniah.records import NiahRecord

Protocol = Literal["mmniah", "v2pe"]
PROTOCOLS: tuple[Protocol, ...] = ("mmniah", "v2pe")
TILES_PER_IMAGE: dict[Protocol, int] = {"mmniah": 1, "v2pe": 5}
OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."


def official_prompt(
    context: str,
    question: str,
    choices: Sequence[str] = (),
    image_choices: int = 0,
    protocol: Protocol = "mmniah",
    list_answer: bool = False,
) -> str:
    """The user text of a record with text options ``choices`` or ``image_choices`` image options (at
    most one of the two); ``list_answer``: the record's answer is a JSON list (not its text)."""
    if choices and image_choices:
        raise ValueError("a question has text options or image options, not both")
    options = list(choices) or ["<image>"] * image_choices
    lines = [question, *(f"{OPTION_LETTERS[k]}. {option}" for k, option in enumerate(options))]
    if options:
        lines.append(CHOICE_INSTRUCTION)
    elif protocol == "mmniah" or not list_answer:
        lines.append(SHORT_ANSWER_INSTRUCTION)
    return context + ("\n" if protocol == "mmniah" else "") + "\n".join(lines)


@dataclass(frozen=True)
class BuiltPrompt:
    """A record's prompt tokens (ending with the assistant header), its tiles and the gold answer's
    tokens (the answer and the ``<|im_end|>`` closing it), as training would have laid them out."""

    tokens: np.ndarray
    tiles: np.ndarray  # uint8 [tiles, S, S, 3]
    answer_tokens: np.ndarray

    def to_prompt(self) -> Prompt:
        """The generation input: token ids and normalised tiles."""
        from megatron_v2pe.eval.generation import Prompt

        pixels = normalize_tiles(self.tiles) if self.tiles.shape[0] else None
        return Prompt(self.tokens.tolist(), pixels)


def prompt_builder(
    tokenizer: Tokenizer, tokens_per_tile: int, tile_size: int, max_tiles: int = 6, *, template: str
) -> SampleBuilder:
    """A builder tiling a sample's images within ``max_tiles`` (k x images: up to k tiles each), in the
    chat template the model was trained with (``VLMConfig.template``)."""
    tiling = TilingConfig(tile_size=tile_size, max_tiles=max_tiles)
    config = SampleConfig(tokens_per_tile=tokens_per_tile, tiling=tiling, template=template)
    return SampleBuilder(tokenizer, config)


def tile_budget(record: NiahRecord, max_tiles: int) -> int:
    """The tiles a record's images may take: its per-image limit times its images, else ``max_tiles``."""
    if record.tiles_per_image is None:
        return max_tiles
    return record.tiles_per_image * max(1, len(record.images))


def build_prompt(builder: SampleBuilder, record: NiahRecord) -> BuiltPrompt:
    conversation = {
        "conversations": [
            {"from": "human", "value": record.prompt},
            {"from": "gpt", "value": record.answer_text},
        ]
    }
    try:
        sample = builder.build(record.id, conversation, record.images)
    except BadSample as err:
        raise ValueError(f"{record.source}: cannot build the prompt ({err})") from err
    supervised = np.flatnonzero(sample.labels != IGNORE_INDEX)
    start, end = int(supervised[0]), int(supervised[-1]) + 1
    cut = sample.prefix(start)
    return BuiltPrompt(tokens=cut.tokens, tiles=cut.tiles, answer_tokens=sample.tokens[start:end])
