"""Chunked prefill into the preallocated KV cache: equal to one full forward, the cache holding what
core attention received, only the needed logits and image tiles computed, the memory plan; the
log-sum-exp partials against a float64 softmax."""

from __future__ import annotations

import re
import weakref

import numpy as np
import pytest
import torch

from megatron_v2pe.eval import memory_plan
from megatron_v2pe.eval.generation import generate, pack_prompts, prompt_positions, resolve_delta_policy
from megatron_v2pe.eval.kv_cache import KVCache, decoder_attentions, kv_cache, rank_capacity
from megatron_v2pe.eval.prefill import packed_params, prefill
from megatron_v2pe.parallel.cache_attention import merge_two, reference_partial
from tests.eval.test_generation import CONFIG, STEPS, _prompts, model  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("megatron_runtime")

WHOLE = 10**6  # a chunk longer than any batch: the prefill is one forward


def _cuts_inside_images(prompts, chunk: int) -> int:
    """How many chunk boundaries fall between two visual tokens of the packed prompts."""
    visual = np.concatenate([np.asarray(p.tokens) == CONFIG.img_context_token_id for p in prompts])
    cuts = np.arange(chunk, visual.size, chunk)
    return int((visual[cuts - 1] & visual[cuts]).sum())


@pytest.mark.parametrize("policy", ["none", "fixed:0.25"])
def test_chunked_prefill_then_decoding_equals_one_forward_then_decoding(model, policy):
    prompts = _prompts()
    whole = generate(model, prompts, STEPS, delta_policy=policy, prefill_chunk=WHOLE, keep_logits=True)
    # the first logits against the model's own full forward of the packed prompts
    positions, _ = prompt_positions(model, prompts, resolve_delta_policy(model, policy), STEPS)
    packed = pack_prompts(prompts, positions)
    full = model(input_ids=packed.tokens[None], positions=packed.positions[None], pixel_values=packed.tiles,
                 packed_seq_params=packed_params(packed.lengths, torch.device("cpu")))
    torch.testing.assert_close(whole.step_logits[0], full[0, packed.ends], atol=1e-5, rtol=0)
    for chunk in (1, 3, 5, 11):
        assert chunk == 1 or _cuts_inside_images(prompts, chunk) > 0
        chunked = generate(model, prompts, STEPS, delta_policy=policy, prefill_chunk=chunk, keep_logits=True)
        assert chunked.tokens == whole.tokens
        torch.testing.assert_close(chunked.step_logits, whole.step_logits, atol=1e-5, rtol=0)


def test_cache_holds_what_core_attention_received_in_buffers_allocated_once(model):
    """The cache after a chunked prefill and two decoding steps: per sequence, the keys and values core
    attention receives in one forward over the prompt and those two tokens (what a concatenating cache
    holds), in the same buffers as at the start."""
    prompts, policy = _prompts(), resolve_delta_policy(model, "fixed:0.25")
    positions, _ = prompt_positions(model, prompts, policy, 2)
    packed = pack_prompts(prompts, positions)
    new = torch.tensor([[20, 21, 22], [30, 31, 32]])  # two steps of three sequences
    new_positions = torch.tensor([p[-1] + 1 + np.arange(2) for p in positions]).T
    seen = []
    hooks = [a.core_attention.register_forward_pre_hook(lambda m, args: seen.append(args[1:3]))
             for a in decoder_attentions(model)]
    extended = [list(p.tokens) + new[:, j].tolist() for j, p in enumerate(prompts)]
    lengths = [len(t) for t in extended]
    try:
        model(input_ids=torch.tensor(sum(extended, []))[None],
              positions=torch.cat([torch.cat([torch.from_numpy(p), new_positions[:, j]]) for j, p in
                                   enumerate(positions)])[None],
              pixel_values=packed.tiles, packed_seq_params=packed_params(lengths, torch.device("cpu")))
    finally:
        for hook in hooks:
            hook.remove()
    with kv_cache(model, len(prompts), max(lengths)) as cache:
        pointers = [k.data_ptr() for k in cache.keys + cache.values]
        prefill(model, cache, packed, 4, packed.ends)
        for step in range(2):
            with cache.extend([1, 1, 1], new_positions[step].numpy()):
                model(input_ids=new[step][None], positions=new_positions[step][None],
                      packed_seq_params=packed_params([1, 1, 1], torch.device("cpu")))
        assert [k.data_ptr() for k in cache.keys + cache.values] == pointers
        assert cache.lengths.tolist() == lengths
        for j, prompt_positions_j in enumerate(positions):  # float64, exactly as fed
            np.testing.assert_array_equal(
                cache.sequence_positions(j), np.append(prompt_positions_j, new_positions[:, j].numpy())
            )
        cu = np.concatenate([[0], np.cumsum(lengths)])
        for layer, (key, value) in enumerate(seen):
            for j, n in enumerate(lengths):
                span = slice(cu[j], cu[j + 1])
                for held, given in ((cache.keys[layer], key), (cache.values[layer], value)):
                    torch.testing.assert_close(held[j, :, :n], given[span].transpose(0, 1), atol=1e-5, rtol=0)


def test_only_needed_logits_and_tiles_are_computed(model):
    rows, tiles = [], []
    output = model.language_model.output_layer.register_forward_hook(
        lambda m, args, out: rows.append(out[0].shape[0])
    )
    vision = model.vision_model.register_forward_pre_hook(lambda m, args: tiles.append(args[0].shape[0]))
    prompts = _prompts()
    try:
        generate(model, prompts, 3, delta_policy="none", prefill_chunk=5)
    finally:
        output.remove()
        vision.remove()
    assert max(rows) <= len(prompts) and sum(rows) == 3 * len(prompts)
    # a 5-token chunk holds visual tokens of at most 3 tiles of 4 tokens
    assert max(tiles) <= 3
    assert sum(tiles) >= sum(p.pixel_values.shape[0] for p in prompts if p.pixel_values is not None)


def test_memory_plan_counts_the_cache_and_refuses_what_cannot_fit(model, monkeypatch):
    plan = memory_plan.plan_memory(model, 3, 37, 8, 3)
    with kv_cache(model, 3, 37) as cache:
        assert plan.kv_cache == sum(k.nbytes + v.nbytes for k, v in zip(cache.keys, cache.values))
    assert plan.weights == sum(p.numel() * 4 for p in model.parameters())
    assert 0 < plan.activations and "KV cache" in str(plan)
    monkeypatch.setattr(memory_plan, "free_bytes", lambda device: 1000)
    with pytest.raises(ValueError, match=r"needs \d+\.\d+ GiB beyond the weights but 0\.00 GiB are free"):
        generate(model, _prompts(), 2)


def test_memory_plan_is_logged_only_when_it_is_the_largest_so_far(model, caplog, monkeypatch):
    monkeypatch.setattr(memory_plan, "_LARGEST_LOGGED", weakref.WeakKeyDictionary())  # other tests' runs
    caplog.set_level("INFO", logger=memory_plan.__name__)
    for capacity in (37, 37, 20, 64, 64):  # an evaluation's batches: the log shows the peak
        memory_plan.checked_plan(model, 3, capacity, 8, 3, 1)
    logged = [r.getMessage() for r in caplog.records if r.name == memory_plan.__name__]
    assert [re.search(r"\(([\d,]+) tokens per sequence", line)[1] for line in logged] == ["37", "64"]


@pytest.mark.parametrize("prefix, causal_new", [(0, True), (7, False), (7, True)])
def test_partials_merge_to_the_float64_softmax(prefix, causal_new):
    """Blocks of 3 keys merged by log-sum-exp == softmax over the visible keys in float64, GQA 4:2."""
    torch.manual_seed(0)
    n, d = 5, 8
    q = torch.randn(n, 4, d)
    keys = prefix + (n if causal_new else 0)
    k, v = torch.randn(2, keys, d), torch.randn(2, keys, d)
    out, lse = reference_partial(q, k, v, prefix, causal_new, 0.3, block=3)
    for i in range(n):
        visible = prefix + (i + 1 if causal_new else 0)
        for h in range(4):
            scores = 0.3 * (k[h // 2, :visible].double() @ q[i, h].double())
            torch.testing.assert_close(lse[i, h].double(), scores.logsumexp(0), atol=1e-5, rtol=0)
            torch.testing.assert_close(out[i, h].double(), scores.softmax(0) @ v[h // 2, :visible].double(),
                                       atol=1e-5, rtol=0)
    empty = torch.full((n, 4), -torch.inf)
    merged, merged_lse = merge_two(out, lse, torch.zeros_like(out), empty)  # a shard with no keys
    torch.testing.assert_close(merged, out)
    torch.testing.assert_close(merged_lse, lse)


class _Group:
    """The two calls the cache makes of a process group when placing tokens."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def test_context_parallel_placement_keeps_every_shard_within_one_chunk_of_its_share(model):
    """Chunks of 5 then single tokens over 2 ranks: each goes to the rank holding fewest, so a 19-token
    sequence sits as 10 + 9 in buffers of ceil(19 / 2) + 5 slots; a call beyond them is refused."""
    capacity = rank_capacity(19, 5, 2)
    assert capacity == 15
    cache = KVCache(model, 1, capacity, _Group(2, 1))
    assert cache.keys[0].shape[2] == capacity
    for counts in [[5]] * 3 + [[1]] * 4:
        with cache.extend(counts, np.arange(sum(counts), dtype=float)):
            pass
    assert cache.held.tolist() == [[10], [9]] and cache.lengths.tolist() == [19]
    with pytest.raises(ValueError, match="holds 15 tokens per sequence and rank"):
        with cache.extend([7], np.zeros(7)):
            pass
