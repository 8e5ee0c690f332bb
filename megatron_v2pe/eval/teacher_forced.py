"""Teacher-forced scoring: one forward over question + gold answer instead of generating.

For inputs too long to generate from comfortably. An answer counts as correct when the model's argmax at
every answer position (the logits of the token before it) is the answer token, i.e. exactly when greedy
decoding would have produced the answer. Positions follow the δ policy over question + answer, so the
answer tokens continue +1 from the question's last position as in generation. Several (question, answer)
pairs run as one packed batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from megatron_v2pe.eval.generation import Prompt, packed_params, prompt_positions, resolve_delta_policy
from megatron_v2pe.model.vlm import InternVLModel
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
    device = next(model.parameters()).device
    tiles = [p.pixel_values for p in full if p.pixel_values is not None]
    lengths = [len(p.tokens) for p in full]
    logits = model(
        input_ids=torch.tensor(np.concatenate([p.tokens for p in full]), device=device)[None],
        positions=torch.from_numpy(np.concatenate(positions)).to(device)[None],
        pixel_values=torch.cat(tiles).to(device) if tiles else None,
        packed_seq_params=packed_params(lengths, device),
    )
    predicted = logits[0].argmax(dim=-1).tolist()
    starts = np.concatenate([[0], np.cumsum(lengths)])
    results = []
    for start, question, answer in zip(starts, questions, answers):
        first = start + len(question.tokens) - 1  # the logits that predict the first answer token
        results.append(predicted[first : first + len(answer)] == list(answer))
    return results
