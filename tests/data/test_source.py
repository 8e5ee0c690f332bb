"""Splitting across ranks and workers, shuffling, blending and resuming shard sources."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch.utils.data

from megatron_v2pe.data.source import BlendedSource, Consumer, DatasetUnreadable, ShardSource, expand_urls
from tests.data.helpers import write_items

WORKERS = 2


class _Keys(torch.utils.data.IterableDataset):
    """(epoch, key) of every sample that one rank's DataLoader worker reads."""

    def __init__(self, urls, rank, world_size, num_epochs):
        self.urls, self.rank, self.world_size, self.num_epochs = urls, rank, world_size, num_epochs

    def __iter__(self):
        worker = torch.utils.data.get_worker_info().id
        consumer = Consumer(self.rank * WORKERS + worker, self.world_size * WORKERS)
        for sample in ShardSource(self.urls, consumer, seed=7, shuffle_buffer=5, num_epochs=self.num_epochs):
            yield sample.ref.epoch, sample.key


@pytest.mark.parametrize("shard_bytes", [3000, 30000])  # many shards; fewer shards than consumers (slices)
def test_every_sample_exactly_once_per_epoch_across_ranks_and_workers(tmp_path, shard_bytes):
    urls = expand_urls(str(write_items(tmp_path, range(40), max_bytes=shard_bytes)))
    assert (len(urls) < 2 * WORKERS) == (shard_bytes == 30000)
    seen = []
    for rank in range(2):
        loader = torch.utils.data.DataLoader(
            _Keys(urls, rank, 2, num_epochs=2), batch_size=None, num_workers=WORKERS
        )
        seen += list(loader)
    for epoch in (0, 1):
        keys = Counter(key.rsplit(":", 1)[1] for e, key in seen if e == epoch)
        assert keys == Counter(f"item{i:05d}" for i in range(40))


def test_shuffling_changes_order_within_and_across_epochs(tmp_path):
    urls = expand_urls(str(write_items(tmp_path, range(30))))
    source = ShardSource(urls, Consumer(0, 1), seed=1, shuffle_buffer=8, num_epochs=2)
    keys = [(s.ref.epoch, s.key.rsplit(":", 1)[1]) for s in source]
    first = [k for e, k in keys if e == 0]
    second = [k for e, k in keys if e == 1]
    assert sorted(first) == sorted(second) == [f"item{i:05d}" for i in range(30)]
    assert first != sorted(first) and first != second


@pytest.mark.parametrize("stop", [1, 17, 30, 31, 44])  # inside epoch 0, at its end, inside epoch 1
def test_source_resumes_exactly(tmp_path, stop):
    urls = expand_urls(str(write_items(tmp_path, range(30))))
    urls[1] = f"pipe:cat {urls[1]}"

    def source():
        return ShardSource(urls, Consumer(1, 3), seed=5, shuffle_buffer=4, num_epochs=None)

    reference = [s.key for s in islice(source(), 60)]
    interrupted = source()
    iterator = iter(interrupted)
    assert [s.key for s in islice(iterator, stop)] == reference[:stop]
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = source()
    resumed.load_state_dict(state)
    assert [s.key for s in islice(resumed, 60 - stop)] == reference[stop:]


def test_blend_follows_weights_and_resumes(tmp_path):
    urls = [
        expand_urls(str(write_items(tmp_path / name, items)))
        for name, items in (("a", range(10)), ("b", range(100, 110)))
    ]

    def blend():
        sources = [ShardSource(u, Consumer(0, 1), dataset=d, seed=3) for d, u in enumerate(urls)]
        return BlendedSource(sources, [3.0, 1.0], np.random.default_rng(9))

    draws = [s.ref.dataset for s in islice(blend(), 2000)]
    assert abs(draws.count(0) / 2000 - 0.75) < 0.03
    reference = [s.key for s in islice(blend(), 50)]
    first = blend()
    head = [s.key for s in islice(first, 23)]
    state = json.loads(json.dumps(first.state_dict()))
    second = blend()
    second.load_state_dict(state)
    assert head + [s.key for s in islice(second, 27)] == reference


def test_a_finite_dataset_leaves_the_blend(tmp_path):
    a = ShardSource(
        expand_urls(str(write_items(tmp_path / "a", range(4)))), Consumer(0, 1), dataset=0, num_epochs=1
    )
    b = ShardSource(
        expand_urls(str(write_items(tmp_path / "b", range(100, 120)))),
        Consumer(0, 1),
        dataset=1,
        num_epochs=1,
    )
    datasets = [s.ref.dataset for s in BlendedSource([a, b], [1.0, 1.0], np.random.default_rng(0))]
    assert datasets.count(0) == 4 and datasets.count(1) == 20


def test_state_of_other_shards_is_refused(tmp_path):
    urls = expand_urls(str(write_items(tmp_path, range(10))))
    state = ShardSource(urls, Consumer(0, 2)).state_dict()
    with pytest.raises(ValueError, match="same shard list, seed, world size and worker count"):
        ShardSource(urls, Consumer(0, 4)).load_state_dict(state)


def test_unreadable_dataset_stops_with_the_path(tmp_path):
    with pytest.raises(DatasetUnreadable, match=r"none of the 2 shards exists: /nowhere/a\.tar"):
        ShardSource(["/nowhere/a.tar", "/nowhere/b.tar"], Consumer(0, 1))
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(DatasetUnreadable, match=f"read no sample .* from \\['{garbage}'\\]"):
        list(ShardSource([str(garbage)], Consumer(0, 1), num_epochs=1))
