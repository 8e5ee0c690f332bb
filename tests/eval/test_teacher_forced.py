"""Teacher-forced scoring agrees with greedy generation on planted answers (under context parallelism:
tests/eval/test_generation_cp.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_v2pe.eval.generation import Prompt, generate
from megatron_v2pe.eval.teacher_forced import teacher_forced_correct
from megatron_v2pe.model.presets import language_transformer_config, tiny
from megatron_v2pe.model.vlm import InternVLModel
from tests.model.vlm_batches import sub_sample

pytestmark = pytest.mark.usefixtures("megatron_runtime")

CONFIG = tiny()


@pytest.fixture(scope="module")
def model() -> InternVLModel:
    torch.manual_seed(1)
    return InternVLModel(CONFIG, language_transformer_config(CONFIG), attention_backend="reference").eval()


def _questions() -> list[Prompt]:
    rng = np.random.default_rng(1)
    samples = [sub_sample(CONFIG, rng, layout) for layout in ([3, ("image", 1, 1.0), 4], [7])]
    return [Prompt(s["tokens"].tolist(), s["pixels"] if s["tiles"] else None) for s in samples]


@pytest.mark.parametrize("chunk", [None, 3])
def test_planted_answers_are_correct_and_one_changed_token_is_not(model, chunk):
    """Also with a 3-token prefill chunk: boundaries inside the image and inside the answers."""
    questions = _questions()
    # Plant the model's own greedy continuations as gold answers: teacher forcing must accept them.
    greedy = generate(model, questions, 4, delta_policy="fixed:0.25").tokens
    score = lambda answers: teacher_forced_correct(  # noqa: E731
        model, questions, answers, delta_policy="fixed:0.25", prefill_chunk=chunk
    )
    assert score(greedy) == [True, True]
    wrong = [greedy[0][:2] + [(greedy[0][2] + 1) % CONFIG.language.vocab_size] + greedy[0][3:], greedy[1]]
    if wrong[0][2] == CONFIG.img_context_token_id:
        wrong[0][2] = (wrong[0][2] + 1) % CONFIG.language.vocab_size
    assert score(wrong) == [False, True]


def test_mismatched_inputs_are_refused(model):
    with pytest.raises(ValueError, match="one answer per question"):
        teacher_forced_correct(model, _questions(), [[5]])
    with pytest.raises(ValueError, match="IMG_CONTEXT"):
        teacher_forced_correct(model, _questions(), [[CONFIG.img_context_token_id], [5]])
