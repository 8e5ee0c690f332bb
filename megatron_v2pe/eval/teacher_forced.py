"""Teacher-forced scoring: one forward over question + gold answer instead of generating.

For inputs too long to generate from comfortably. An answer counts as correct when the model's argmax at
every answer position (the logits of the token before it) is the answer token, i.e. exactly when greedy
decoding would have produced the answer. Positions follow the δ policy over question + answer, so the
answer tokens continue +1 from the question's last position as in generation. Several (question, answer)
pairs run as one packed batch.

Under context parallelism (a model built with ``context_parallel_size`` > 1, every rank of the CP group
calling with the same inputs) each sub-sample is padded to a multiple of 2·CP, every rank runs its
zigzag share of the tokens (``parallel/context_parallel.py``), and the per-sample counts of wrong answer
tokens are summed over the group, so every rank returns the same verdicts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_v2pe.data.batch import IGNORE_INDEX
from megatron_v2pe.eval.generation import Prompt, packed_params, prompt_positions, resolve_delta_policy
from megatron_v2pe.model.vlm import InternVLModel
from megatron_v2pe.parallel.context_parallel import (
    context_parallel_group,
    image_feature_index,
    zigzag_token_indices,
)
from megatron_v2pe.parallel.reference_attention import segment_ids
from megatron_v2pe.v2pe.positions import DeltaPolicy


@torch.no_grad()
def teacher_forced_correct(
    model: InternVLModel,
    questions: Sequence[Prompt],
    answers: Sequence[Sequence[int]],
    *,
    delta_policy: DeltaPolicy | str | None = None,
) -> list[bool]:
    """Whether greedy decoding of each question would reproduce its answer token by token."""
    if len(questions) != len(answers) or not questions:
        raise ValueError(
            f"need one answer per question, got {len(questions)} questions, {len(answers)} answers"
        )
    if any(len(a) == 0 for a in answers) or any(len(q.tokens) == 0 for q in questions):
        raise ValueError("every question and every answer needs at least one token")
    if model.training:
        raise ValueError("scoring is for inference: call model.eval() first")
    image_id = model.vlm_config.img_context_token_id
    if any(image_id in a for a in answers):
        raise ValueError("answers may not contain <IMG_CONTEXT> tokens")
    full = [Prompt(list(q.tokens) + list(a), q.pixel_values) for q, a in zip(questions, answers)]
    positions, _ = prompt_positions(model, full, resolve_delta_policy(model, delta_policy))
    group = context_parallel_group() if model.config.context_parallel_size > 1 else None
    cp = 1 if group is None else group.size()
    ids, targets, token_positions, lengths = _padded_pack(
        full, [len(q.tokens) for q in questions], answers, positions, 2 * cp if cp > 1 else 1
    )
    device = next(model.parameters()).device
    params = packed_params(lengths, device)
    cu = params.cu_seqlens_q.cpu()
    mine = torch.arange(len(ids)) if cp == 1 else zigzag_token_indices(cu, cp, group.rank())
    tiles = [p.pixel_values for p in full if p.pixel_values is not None]
    logits = model(
        input_ids=ids[mine].to(device)[None],
        positions=token_positions[mine].to(device)[None],
        pixel_values=torch.cat(tiles).to(device) if tiles else None,
        packed_seq_params=params,
        image_feature_index=None if cp == 1 else image_feature_index(ids, image_id)[mine].to(device),
    )
    target = targets[mine].to(device)
    scored = target != IGNORE_INDEX
    wrong = torch.zeros(len(full), dtype=torch.long, device=device)
    sample = segment_ids(cu, len(ids))[mine].to(device)
    wrong.index_add_(0, sample[scored], (logits[0].argmax(dim=-1)[scored] != target[scored]).long())
    if group is not None:
        dist.all_reduce(wrong, group=group)
    return (wrong == 0).tolist()


def _padded_pack(
    full: Sequence[Prompt],
    question_lengths: Sequence[int],
    answers: Sequence[Sequence[int]],
    positions: Sequence[np.ndarray],
    multiple: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """(token ids, targets, positions, sub-sample lengths) of the pack of question + answer sequences,
    each padded to a multiple of ``multiple``. A target is the answer token at the position whose logits
    predict it, IGNORE_INDEX elsewhere. Pads follow the answer, so causal attention hides them."""
    tokens, targets, padded_positions, lengths = [], [], [], []
    for prompt, question_length, answer, pos in zip(full, question_lengths, answers, positions):
        n = len(prompt.tokens)
        padded = -(-n // multiple) * multiple
        target = np.full(padded, IGNORE_INDEX)
        target[question_length - 1 : question_length - 1 + len(answer)] = answer
        tokens.append(np.concatenate([prompt.tokens, np.zeros(padded - n, dtype=np.int64)]))
        padded_positions.append(np.concatenate([pos, pos[-1] + 1 + np.arange(padded - n)]))
        targets.append(target)
        lengths.append(padded)
    return (
        torch.from_numpy(np.concatenate(tokens)).to(torch.long),
        torch.from_numpy(np.concatenate(targets)),
        torch.from_numpy(np.concatenate(padded_positions)),
        lengths,
    )
