"""Teacher-forced scoring: one pass over question + gold answer instead of generating.

For inputs too long to generate from comfortably. An answer counts as correct when the model's argmax at
every answer position (the logits of the token before it) is the answer token, i.e. exactly when greedy
decoding would have produced the answer. Positions follow the δ policy over question + answer, so the
answer tokens continue +1 from the question's last position as in generation. Several (question, answer)
pairs run as one batch through the chunked prefill of generation (``eval/prefill.py``), which computes
logits only at the answer positions; under context parallelism (a model built with it, every rank
calling with the same inputs) the KV cache is sharded over the ranks and every rank returns the same
verdicts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from megatron_v2pe.eval.generation import (
    Prompt,
    check_prefill_chunk,
    pack_prompts,
    prompt_positions,
    resolve_delta_policy,
)
from megatron_v2pe.eval.kv_cache import kv_cache, rank_capacity
from megatron_v2pe.eval.memory_plan import checked_plan
from megatron_v2pe.eval.prefill import prefill
from megatron_v2pe.model.vlm import InternVLModel
from megatron_v2pe.v2pe.positions import DeltaPolicy


def _check(model: InternVLModel, questions: Sequence[Prompt], answers: Sequence[Sequence[int]]) -> None:
    if len(questions) != len(answers) or not questions:
        raise ValueError(
            f"need one answer per question, got {len(questions)} questions, {len(answers)} answers"
        )
    if any(len(a) == 0 for a in answers) or any(len(q.tokens) == 0 for q in questions):
        raise ValueError("every question and every answer needs at least one token")
    if model.training:
        raise ValueError("scoring is for inference: call model.eval() first")
    if any(model.vlm_config.img_context_token_id in a for a in answers):
        raise ValueError("answers may not contain <IMG_CONTEXT> tokens")


@torch.no_grad()
def teacher_forced_correct(
    model: InternVLModel,
    questions: Sequence[Prompt],
    answers: Sequence[Sequence[int]],
    *,
    delta_policy: DeltaPolicy | str | None = None,
    prefill_chunk: int | None = None,
) -> list[bool]:
    """Whether greedy decoding of each question would reproduce its answer token by token."""
    _check(model, questions, answers)
    chunk = check_prefill_chunk(prefill_chunk)
    full = [Prompt(list(q.tokens) + list(a), q.pixel_values) for q, a in zip(questions, answers)]
    positions, _ = prompt_positions(model, full, resolve_delta_policy(model, delta_policy))
    packed = pack_prompts(full, positions)
    starts = np.concatenate([[0], np.cumsum(packed.lengths)[:-1]])
    # the logits at question token i - 1 + k predict answer token k
    rows = np.concatenate(
        [s + len(q.tokens) - 1 + np.arange(len(a)) for s, q, a in zip(starts, questions, answers)]
    )
    cp = model.config.context_parallel_size
    capacity = rank_capacity(max(packed.lengths), chunk, cp)
    checked_plan(model, len(full), capacity, min(chunk, len(packed.tokens)), len(rows), cp)
    with kv_cache(model, len(full), capacity) as cache:
        predicted = prefill(model, cache, packed, chunk, rows).argmax(dim=-1).cpu()
    target = torch.tensor([t for a in answers for t in a])
    owner = torch.repeat_interleave(torch.arange(len(answers)), torch.tensor([len(a) for a in answers]))
    wrong = torch.zeros(len(answers), dtype=torch.long).index_add_(0, owner, (predicted != target).long())
    return (wrong == 0).tolist()
