"""The trainer's iterable: every sample once per epoch, and resume to the identical next batches."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections import Counter
from itertools import islice

import pytest
import torch

from megatron_v2pe.data.config import DataConfig, DatasetSpec
from megatron_v2pe.data.loader import PackedBatchLoader
from megatron_v2pe.model.presets import tiny
from tests.data.helpers import subsample_items, write_items
from tests.parallel.launch import REPO_ROOT


@pytest.fixture(scope="module")
def items_manifest(tmp_path_factory):
    return write_items(tmp_path_factory.mktemp("items"), range(48))


def _config(manifest, tokenizer_path, **overrides):
    fields = {
        "datasets": (DatasetSpec(str(manifest)),),
        "tokenizer": str(tokenizer_path),
        "max_seq_len": 256,
        "max_tiles": 12,
        "pad_multiple": 4,
        "pack_buffer_size": 4,
        "system_message": None,
        "shuffle_buffer": 6,
        "num_workers": 2,
        "seed": 11,
    }
    return DataConfig(**{**fields, **overrides})


def test_every_sample_once_per_epoch_through_the_whole_pipeline(
    items_manifest, tokenizer_path, tokenizer, model
):
    config = _config(items_manifest, tokenizer_path, num_epochs=1)
    items = Counter()
    for rank in range(2):
        loader = PackedBatchLoader(config, model, rank=rank, world_size=2)
        for batch in loader:
            assert batch.cu_seqlens_padded[-1] <= 256 and batch.tiles_per_image.sum() <= 12
            items.update(subsample_items(batch, tokenizer))
        assert loader.stats().total_skipped == 0
    assert items == Counter(range(48))


def _assert_same(a, b):
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), field.name
        else:
            assert x == y, field.name


@pytest.mark.parametrize(("workers", "stop"), [(2, 5), (2, 8), (0, 3)])
def test_resume_gives_the_batches_an_uninterrupted_run_would(
    items_manifest, tokenizer_path, model, workers, stop
):
    config = _config(items_manifest, tokenizer_path, num_workers=workers)  # endless: crosses epochs
    reference = list(islice(PackedBatchLoader(config, model), stop + 12))
    first = PackedBatchLoader(config, model)
    batches = iter(first)
    for expected in reference[:stop]:
        _assert_same(next(batches), expected)
    batches.close()
    state = json.loads(json.dumps(first.state_dict()))  # plain data: survives any checkpoint format
    resumed = PackedBatchLoader(config, model)
    resumed.load_state_dict(state)
    for got, expected in zip(islice(resumed, 12), reference[stop:], strict=True):
        _assert_same(got, expected)


def test_resume_refuses_another_layout(items_manifest, tokenizer_path, model):
    config = _config(items_manifest, tokenizer_path, num_workers=2)
    state = PackedBatchLoader(config, model).state_dict()
    with pytest.raises(ValueError, match="saved with data.num_workers=2, this run has 3; set data.num_workers=2"):
        PackedBatchLoader(dataclasses.replace(config, num_workers=3), model).load_state_dict(state)


def test_tokenizer_and_model_must_agree(items_manifest, tokenizer_path, tokenizer):
    config = _config(items_manifest, tokenizer_path, num_workers=0)
    wrong = tiny(vocab_size=tokenizer.vocab_size, img_context_token_id=3)
    with pytest.raises(ValueError, match=f"<IMG_CONTEXT> id is {tokenizer.img_context_id} but the model"):
        next(iter(PackedBatchLoader(config, wrong)))


_LEFT_OPEN = """
import sys
from megatron_v2pe.data.config import DataConfig, DatasetSpec
from megatron_v2pe.data.loader import PackedBatchLoader
from megatron_v2pe.data.tokenizer import load_tokenizer
from megatron_v2pe.model.presets import tiny

manifest, tokenizer_path = sys.argv[1:3]
tokenizer = load_tokenizer(tokenizer_path)
config = DataConfig(datasets=(DatasetSpec(manifest),), tokenizer=tokenizer_path, system_message=None,
                    max_seq_len=256, max_tiles=12, pad_multiple=4, pack_buffer_size=4,
                    num_workers=2, seed=11)
model = tiny(vocab_size=tokenizer.vocab_size, img_context_token_id=tokenizer.img_context_id)
batches = iter(PackedBatchLoader(config, model))
next(batches)  # the workers run on, and the iterator stays open until the interpreter exits
print("first batch", flush=True)
"""


def test_workers_of_a_loader_left_open_do_not_keep_the_process_from_exiting(items_manifest, tokenizer_path):
    """Workers ignore SIGTERM (the trainer decides on preemption), so multiprocessing's exit clean-up
    (terminate, then join) alone would wait for them forever."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _LEFT_OPEN, str(items_manifest), str(tokenizer_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "first batch" in proc.stdout, proc.stderr[-3000:]
