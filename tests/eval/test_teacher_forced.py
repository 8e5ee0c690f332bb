"""Teacher-forced scoring agrees with greedy generation on planted answers, also under context
parallelism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_v2pe.eval.generation import Prompt, generate
from megatron_v2pe.eval.teacher_forced import teacher_forced_correct
from megatron_v2pe.model.presets import language_transformer_config, tiny
from megatron_v2pe.model.vlm import InternVLModel
from tests.eval.test_generation import _prompts
from tests.model.vlm_batches import sub_sample
from tests.parallel.launch import run_torchrun

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


def test_planted_answers_are_correct_and_one_changed_token_is_not(model):
    questions = _questions()
    # Plant the model's own greedy continuations as gold answers: teacher forcing must accept them.
    greedy = generate(model, questions, 4, delta_policy="fixed:0.25").tokens
    assert teacher_forced_correct(model, questions, greedy, delta_policy="fixed:0.25") == [True, True]
    wrong = [greedy[0][:2] + [(greedy[0][2] + 1) % CONFIG.language.vocab_size] + greedy[0][3:], greedy[1]]
    if wrong[0][2] == CONFIG.img_context_token_id:
        wrong[0][2] = (wrong[0][2] + 1) % CONFIG.language.vocab_size
    assert teacher_forced_correct(model, questions, wrong, delta_policy="fixed:0.25") == [False, True]


def test_mismatched_inputs_are_refused(model):
    with pytest.raises(ValueError, match="one answer per question"):
        teacher_forced_correct(model, _questions(), [[5]])
    with pytest.raises(ValueError, match="IMG_CONTEXT"):
        teacher_forced_correct(model, _questions(), [[CONFIG.img_context_token_id], [5]])


def _changed(tokens: list[int], k: int) -> list[int]:
    """``tokens`` with its k-th token replaced by another that is not <IMG_CONTEXT>."""
    other = next(
        t for t in range(CONFIG.language.vocab_size) if t not in (tokens[k], CONFIG.img_context_token_id)
    )
    return tokens[:k] + [other] + tokens[k + 1 :]


def test_context_parallel_scoring_equals_single_process(model, tmp_path):
    """CP=2 over prompts of 17, 6 and 20 tokens with 6-token answers: the answers cross the boundary of
    the chunks the two ranks hold, so a right verdict needs both ranks' argmax."""
    questions, policy = _prompts(), "fixed:0.25"
    greedy = generate(model, questions, 6, delta_policy=policy).tokens
    answers = [greedy[0], _changed(greedy[1], 0), _changed(greedy[2], 5)]
    expected = teacher_forced_correct(model, questions, answers, delta_policy=policy)
    assert expected == [True, False, False]
    inputs = {"state": model.state_dict(), "questions": questions, "answers": answers, "policy": policy}
    torch.save(inputs, tmp_path / "inputs.pt")
    result = run_torchrun("teacher_forced_cp.py", 2, tmp_path, "--cp", "2")
    assert result["per_rank"] == [expected, expected]
