"""Running a model over MM-NIAH records: greedy generation (or one teacher-forced forward), then the
response scored by its task's rule (``eval/scoring.py``).

New tokens default to the protocol's: MM-NIAH's ``eval_internvl.py`` allows 32 for the counting tasks,
16 for the others; V2PE's ``eval_mm_niah.py`` 320 and 16. Generation stops at ``<|im_end|>``, which the
chat template closes every answer with.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from megatron_v2pe.data.tokenizer import IM_END, Tokenizer
from megatron_v2pe.eval.answer_normaliser import Mode
from megatron_v2pe.eval.mmniah.aggregation import Binning, default_length_edges
from megatron_v2pe.eval.mmniah.prompts import BuiltPrompt, Protocol, build_prompt, prompt_builder, tile_budget
from megatron_v2pe.eval.mmniah.records import Answer, NiahRecord
from megatron_v2pe.eval.scoring import TASK_KINDS, score_response

LengthSource = Literal["tokens", "meta"]
NEW_TOKENS: dict[Protocol, dict[str, int]] = {
    "mmniah": {"counting": 32, "choice": 16, "free": 16},
    "v2pe": {"counting": 320, "choice": 16, "free": 16},
}


@dataclass(frozen=True)
class SampleResult:
    id: str
    task: str
    context_length: int
    prompt_tokens: int
    depths: tuple[float, ...]
    answer: Answer
    response: str
    score: float


def check_lengths(
    records: Sequence[NiahRecord],
    length_source: LengthSource,
    binning: Binning = "official",
    length_edges: Sequence[int] | None = None,
) -> None:
    """Refuse, before any work, recorded lengths that cannot be binned: one missing, none reaching the
    first bin, or (adaptive binning) one below it."""
    if length_source != "meta":
        return
    missing = [r.source for r in records if r.meta_length is None]
    if missing:
        raise ValueError(
            f"{missing[0]} (and {len(missing) - 1} more) records no context length; "
            "bin by the prompt's token count instead (--length-from tokens)"
        )
    lengths = [int(r.meta_length) for r in records]
    first = min(length_edges or default_length_edges(lengths, binning))
    short = [r.source for r, n in zip(records, lengths) if n < first]
    if short and (binning == "adaptive" or len(short) == len(records)):
        fix = "lower --length-bins" + (" or use --binning adaptive" if binning == "official" else "")
        raise ValueError(
            f"{len(short)} of {len(records)} records (first {short[0]}) are shorter than the first length "
            f"bin, {first} tokens: {fix}"
        )


def _batches(records: Sequence[NiahRecord], batch_size: int, limit: Callable[[NiahRecord], int]):
    """Consecutive records of one new-token limit, at most ``batch_size`` at a time."""
    for new_tokens, group in itertools.groupby(records, key=limit):
        group = list(group)
        for first in range(0, len(group), batch_size):
            yield new_tokens, group[first : first + batch_size]


def _responses(
    model, tokenizer: Tokenizer, built: Sequence[BuiltPrompt], new_tokens: int, policy, chunk: int | None
) -> list:
    from megatron_v2pe.eval.generation import generate

    stop = [tokenizer.token_id(IM_END)]
    prompts = [b.to_prompt() for b in built]
    out = generate(model, prompts, new_tokens, delta_policy=policy, stop_tokens=stop, prefill_chunk=chunk)
    # ids past the tokenizer's vocabulary are the embedding's padding rows: they decode to nothing
    known = [[t for t in tokens if t not in stop and t < tokenizer.vocab_size] for tokens in out.tokens]
    return [tokenizer.decode(tokens).strip() for tokens in known]


def evaluate_records(
    model,
    tokenizer: Tokenizer,
    records: Sequence[NiahRecord],
    *,
    delta_policy: str | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 4,
    teacher_forced: bool = False,
    length_source: LengthSource = "meta",
    max_tiles: int = 6,
    mode: Mode = "official",
    protocol: Protocol = "mmniah",
    progress: Any = None,
    prefill_chunk: int | None = None,
) -> list[SampleResult]:
    """Run the model on every record and score it. ``max_new_tokens`` None: the protocol's per-task
    limits; ``max_tiles``: the tiling budget of records without a per-image limit; ``prefill_chunk``:
    prompt tokens per forward (None: generation's default)."""
    from megatron_v2pe.eval.teacher_forced import teacher_forced_correct

    check_lengths(records, length_source)
    config = model.vlm_config
    builders: dict[int, Any] = {}

    def builder(record: NiahRecord):
        budget = tile_budget(record, max_tiles)
        if budget not in builders:
            size = config.vision.image_size
            builders[budget] = prompt_builder(
                tokenizer, config.tokens_per_tile, size, budget, template=config.template
            )
        return builders[budget]

    def limit(record: NiahRecord) -> int:
        return max_new_tokens or NEW_TOKENS[protocol][TASK_KINDS[record.task]]

    results: list[SampleResult] = []
    for new_tokens, batch in _batches(records, batch_size, limit):
        built = [build_prompt(builder(r), r) for r in batch]
        if teacher_forced:
            answers = [b.answer_tokens.tolist() for b in built]
            correct = teacher_forced_correct(
                model, [b.to_prompt() for b in built], answers, delta_policy=delta_policy,
                prefill_chunk=prefill_chunk,
            )
            responses = [r.answer_text if ok else "" for r, ok in zip(batch, correct)]
            scores = [float(ok) for ok in correct]
        else:
            responses = _responses(model, tokenizer, built, new_tokens, delta_policy, prefill_chunk)
            scores = [score_response(r.task, text, r.answer, mode) for r, text in zip(batch, responses)]
        for record, b, response, score in zip(batch, built, responses, scores):
            length = record.meta_length if length_source == "meta" else len(b.tokens)
            results.append(
                SampleResult(
                    id=record.id,
                    task=record.task,
                    context_length=int(length),
                    prompt_tokens=len(b.tokens),
                    depths=record.depths,
                    answer=record.answer,
                    response=response,
                    score=score,
                )
            )
        if progress is not None:
            progress(len(results), len(records))
    return results
