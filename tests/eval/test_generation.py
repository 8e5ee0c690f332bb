"""Generation with V2PE positions: KV cache against recomputation, batching, positions of new tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_v2pe.eval.generation import Prompt, Sampling, generate, prompt_positions, resolve_delta_policy
from megatron_v2pe.model.presets import language_transformer_config, tiny
from megatron_v2pe.model.vlm import InternVLModel
from tests.model.vlm_batches import sub_sample

pytestmark = pytest.mark.usefixtures("megatron_runtime")

CONFIG = tiny()
STEPS = 5


@pytest.fixture(scope="module")
def model() -> InternVLModel:
    torch.manual_seed(0)
    return InternVLModel(CONFIG, language_transformer_config(CONFIG), attention_backend="reference").eval()


def _prompts() -> list[Prompt]:
    """Three prompts of different lengths, two with images (several tiles), one text only."""
    rng = np.random.default_rng(0)
    layouts = [[4, ("image", 2, 1.0), 3], [6], [2, ("image", 1, 1.0), 5, ("image", 1, 1.0), 1]]
    samples = [sub_sample(CONFIG, rng, layout) for layout in layouts]
    return [Prompt(s["tokens"].tolist(), s["pixels"] if s["tiles"] else None) for s in samples]


@pytest.mark.parametrize("policy", ["fixed:0.25", "none"])
def test_kv_cache_equals_recomputation_token_by_token(model, policy):
    prompts = _prompts()
    cached = generate(model, prompts, STEPS, delta_policy=policy, keep_logits=True)
    recomputed = generate(model, prompts, STEPS, delta_policy=policy, use_cache=False, keep_logits=True)
    assert cached.tokens == recomputed.tokens
    assert cached.step_logits.shape == (STEPS, len(prompts), CONFIG.language.vocab_size)
    torch.testing.assert_close(cached.step_logits, recomputed.step_logits, atol=1e-5, rtol=0)


def test_sampling_with_kv_cache_equals_recomputation_and_repeats(model):
    prompts = _prompts()
    sampling = Sampling(temperature=1.0, top_k=20, seed=3)
    cached = generate(model, prompts, STEPS, delta_policy="fixed:0.5", sampling=sampling)
    again = generate(model, prompts, STEPS, delta_policy="fixed:0.5", sampling=sampling)
    recomputed = generate(model, prompts, STEPS, delta_policy="fixed:0.5", sampling=sampling, use_cache=False)
    assert cached.tokens == again.tokens == recomputed.tokens


def test_batched_generation_equals_one_by_one(model):
    prompts = _prompts()
    batched = generate(model, prompts, STEPS, delta_policy="fixed:0.25", keep_logits=True)
    for j, prompt in enumerate(prompts):
        alone = generate(model, [prompt], STEPS, delta_policy="fixed:0.25", keep_logits=True)
        assert alone.tokens[0] == batched.tokens[j]
        torch.testing.assert_close(alone.step_logits[:, 0], batched.step_logits[:, j], atol=1e-5, rtol=0)


def test_generated_positions_continue_from_last_prompt_position(model):
    prompts = _prompts()
    out = generate(model, prompts, STEPS, delta_policy="fixed:0.25")
    # prompt 0: 4 text, <img>, 8 slots at 1/4, </img>, 3 text -> last position 4 + 1 + 2 + 1 + 3 - 1 = 10
    assert out.positions[0].tolist() == [11.0, 12.0, 13.0, 14.0, 15.0]
    assert out.positions[1].tolist() == [6.0, 7.0, 8.0, 9.0, 10.0]
    positions, _ = prompt_positions(model, prompts, resolve_delta_policy(model, "fixed:0.25"))
    for prompt_pos, new_pos in zip(positions, out.positions):
        np.testing.assert_array_equal(new_pos, prompt_pos[-1] + 1 + np.arange(STEPS))


def test_positions_reach_the_model_as_given(model):
    """The positions fed at every cached step are the prompt's last position + k."""
    seen = []
    handle = model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["positions"].clone()), with_kwargs=True
    )
    try:
        out = generate(model, _prompts(), 3, delta_policy="fixed:0.25")
    finally:
        handle.remove()
    assert len(seen) == 3
    for k, fed in enumerate(seen[1:], start=1):
        expected = [p[k - 1] for p in out.positions]  # the k-th generated token is fed at step k
        assert fed.dtype == torch.float64 and fed[0].tolist() == expected


def test_auto_policy_picks_largest_delta_that_fits_with_the_generated_tokens(model):
    prompt = _prompts()[0]  # 9 text + 8 visual tokens: last prompt position 8 + 8δ
    wide = generate(model, [prompt], 2, delta_policy="auto:64")
    assert wide.deltas[0].tolist() == [1.0]
    # 9 text + 8 visual + 2 reserved tokens: last position 10 + 8δ must stay below 14 -> δ = 1/4
    narrow = generate(model, [prompt], 2, delta_policy="auto:14")
    assert narrow.deltas[0].tolist() == [0.25]
    assert narrow.positions[0].max() < 14
    with pytest.raises(ValueError, match="does not fit window 10"):
        generate(model, [prompt], 2, delta_policy="auto:10")


def test_stop_token_ends_a_sequence_and_bad_input_is_refused(model):
    prompts = _prompts()
    free = generate(model, prompts, STEPS, delta_policy="none")
    stop = free.tokens[1][1]
    stopped = generate(model, prompts, STEPS, delta_policy="none", stop_tokens=[stop])
    assert stopped.tokens[1] == free.tokens[1][: free.tokens[1].index(stop) + 1]
    with pytest.raises(ValueError, match="at least one prompt"):
        generate(model, [], 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompts, 0)
