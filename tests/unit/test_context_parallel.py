"""Context-parallel sharding of packed batches: one permutation for every per-token field."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_v2pe.model.presets import tiny
from megatron_v2pe.parallel.context_parallel import shard_batch, zigzag_token_indices
from tests.model.vlm_batches import pack, sub_sample

CONFIG = tiny()


def _random_pack(rng: np.random.Generator, cp: int):
    """Sub-samples of random layouts, some shorter than 2·CP before padding."""
    samples = []
    for _ in range(rng.integers(1, 5)):
        layout = [int(rng.integers(1, 2 * cp + 3))]
        if rng.random() < 0.6:
            layout += [("image", int(rng.integers(1, 3)), float(rng.choice([1, 0.5, 1 / 256]))), 2]
        samples.append(sub_sample(CONFIG, rng, layout))
    return pack(samples, pad_multiple=2 * cp)


def _zigzag_by_loop(cu: list[int], cp: int, rank: int) -> list[int]:
    """Direct statement of the layout: per sub-sample, chunk `rank` then chunk `2·cp-1-rank`."""
    kept = []
    for start, end in zip(cu[:-1], cu[1:]):
        chunk = (end - start) // (2 * cp)
        for c in (rank, 2 * cp - 1 - rank):
            kept += list(range(start + c * chunk, start + (c + 1) * chunk))
    return kept


@pytest.mark.parametrize("cp", [1, 2, 4])
@pytest.mark.parametrize("seed", range(8))
def test_each_rank_holds_the_global_values_at_its_tokens(cp, seed):
    rng = np.random.default_rng(seed)
    batch = _random_pack(rng, cp)
    cu = batch.cu_seqlens_padded.tolist()
    seen = []
    slots = torch.nonzero(batch.tokens == CONFIG.img_context_token_id).flatten().tolist()
    for rank in range(cp):
        index = _zigzag_by_loop(cu, cp, rank)
        assert zigzag_token_indices(batch.cu_seqlens_padded, cp, rank).tolist() == index
        shard = shard_batch(batch, cp, rank, CONFIG.img_context_token_id)
        for field in ("tokens", "labels", "loss_weights", "positions"):
            assert torch.equal(getattr(shard, field), getattr(batch, field)[index]), field
        assert torch.equal(shard.cu_seqlens_padded, batch.cu_seqlens_padded)
        if cp > 1:  # unsharded batches fill their slots in order
            expected_feature = [slots.index(i) if i in slots else -1 for i in index]
            assert shard.image_feature_index.tolist() == expected_feature
        seen += index
    assert sorted(seen) == list(range(batch.num_tokens))


def test_unpadded_sub_sample_is_refused_with_the_fix():
    batch = pack([sub_sample(CONFIG, np.random.default_rng(0), [5])], pad_multiple=2)
    with pytest.raises(ValueError, match="multiple of 2 x context parallel size = 8"):
        shard_batch(batch, 4, 0, CONFIG.img_context_token_id)


def test_sharding_twice_is_refused():
    batch = _random_pack(np.random.default_rng(1), 2)
    shard = shard_batch(batch, 2, 1, CONFIG.img_context_token_id)
    with pytest.raises(ValueError, match="already sharded"):
        shard_batch(shard, 2, 0, CONFIG.img_context_token_id)
