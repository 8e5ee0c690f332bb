"""Generation and teacher-forced scoring under context parallelism (torchrun, gloo): chunked prefill
into a KV cache sharded over 2 and 4 ranks, then decoding, equal to one process running one full
forward then decoding. One launch per CP size checks every case."""

from __future__ import annotations

import pytest
import torch

from megatron_v2pe.eval.generation import generate
from megatron_v2pe.eval.teacher_forced import teacher_forced_correct
from megatron_v2pe.model.presets import language_transformer_config, tiny
from megatron_v2pe.model.vlm import InternVLModel
from tests.eval.test_generation import _prompts
from tests.parallel.launch import run_torchrun

pytestmark = pytest.mark.usefixtures("megatron_runtime")

CONFIG = tiny()
WHOLE = 10**6  # a chunk longer than any batch: the prefill is one forward
GENERATE = [{"policy": "fixed:0.25", "chunk": 5, "steps": 6}, {"policy": "none", "chunk": 7, "steps": 3}]


@pytest.fixture(scope="module")
def model() -> InternVLModel:
    torch.manual_seed(1)
    return InternVLModel(CONFIG, language_transformer_config(CONFIG), attention_backend="reference").eval()


def _changed(tokens: list[int], k: int) -> list[int]:
    """``tokens`` with its k-th token replaced by another that is not <IMG_CONTEXT>."""
    other = next(
        t for t in range(CONFIG.language.vocab_size) if t not in (tokens[k], CONFIG.img_context_token_id)
    )
    return tokens[:k] + [other] + tokens[k + 1 :]


@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_inference_equals_single_process(model, tmp_path, cp):
    """Prompts of 17, 6 and 20 tokens (images cut by the chunk boundaries); answers of 6 tokens, one
    right and two with a wrong token, scored in chunks of 4 so the answers straddle shards."""
    questions = _prompts()
    expected = [generate(model, questions, run["steps"], delta_policy=run["policy"], prefill_chunk=WHOLE,
                         keep_logits=True) for run in GENERATE]
    greedy = generate(model, questions, 6, delta_policy="fixed:0.25").tokens
    answers = [greedy[0], _changed(greedy[1], 0), _changed(greedy[2], 5)]
    score = [{"policy": "fixed:0.25", "chunk": 4, "answers": answers}]
    verdicts = teacher_forced_correct(
        model, questions, answers, delta_policy="fixed:0.25", prefill_chunk=WHOLE
    )
    assert verdicts == [True, False, False]
    inputs = {"state": model.state_dict(), "questions": questions, "generate": GENERATE, "score": score}
    torch.save(inputs, tmp_path / "inputs.pt")
    assert run_torchrun("inference_cp.py", cp, tmp_path, "--cp", str(cp))["ranks"] == cp
    for rank in torch.load(tmp_path / "per_rank.pt", weights_only=False):
        for got, want in zip(rank["generated"], expected):
            assert got["tokens"] == want.tokens
            torch.testing.assert_close(got["logits"], want.step_logits, atol=1e-5, rtol=0)
        assert rank["verdicts"] == [verdicts]
