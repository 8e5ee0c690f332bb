"""Damaged shards: every bad sample is skipped and counted by reason, and no good sample is lost or
misaligned."""

from __future__ import annotations

import json
import tarfile
from collections import Counter

import pytest

from megatron_v2pe.data.config import DataConfig, DatasetSpec
from megatron_v2pe.data.loader import PackedBatchLoader
from megatron_v2pe.data.source import DatasetUnreadable
from tests.data.helpers import (
    context_runs,
    item_images,
    item_members,
    item_record,
    subsample_items,
    write_tar,
)

GOOD = {0, 3, 6, 9, 10, 12, 13, 14}


def _damaged_members(i):
    members = item_members(i)
    name = f"item{i:05d}"
    if i == 1:  # invalid JSON
        return [(f"{name}.json", b'{"conversations": ['), *members[1:]]
    if i == 4:  # one image, undecodable
        return [members[0], (f"{name}.0.png", b"\x89PNG\r\n\x1a\n definitely not")]
    if i == 5:  # the record names two images, the second member is absent
        record = {**item_record(i), "images": ["0.png", "1.png"]}
        return [(f"{name}.json", json.dumps(record).encode()), members[1]]
    if i == 7:  # one image, two placeholders
        record = item_record(i)
        record["conversations"][0]["value"] = "<image>" + record["conversations"][0]["value"]
        return [(f"{name}.json", json.dumps(record).encode()), *members[1:]]
    if i == 8:  # images without a record
        return members[1:]
    return members


@pytest.fixture
def damaged_dataset(tmp_path):
    first = write_tar(tmp_path / "part-0.tar", [m for i in range(10) for m in _damaged_members(i)])
    with tarfile.open(first) as tar:
        offset = tar.getmember("item00002.1.png").offset  # item 2 has two images; break the second's header
    data = bytearray(first.read_bytes())
    data[offset + 100 : offset + 108] = b"garbage!"
    first.write_bytes(bytes(data))
    # Item 14's members again under item 11's key, right after item 11: two samples, one key.
    impostor = [(name.replace("item00014", "item00011"), data) for name, data in item_members(14)]
    members = [m for i in range(10, 16) for m in item_members(i) + (impostor if i == 11 else [])]
    second = write_tar(tmp_path / "part-1.tar", members)
    with tarfile.open(second) as tar:
        cut = tar.getmember("item00015.json").offset_data + 10  # item 15 cut inside its record
    second.write_bytes(second.read_bytes()[:cut])
    return f"{tmp_path}/part-{{0..2}}.tar"  # part-2.tar does not exist


@pytest.mark.parametrize("workers", [0, 2])  # logs of worker processes do not reach caplog: check them with 0
def test_every_bad_input_is_skipped_and_counted(
    damaged_dataset, tokenizer_path, tokenizer, model, caplog, workers
):
    config = DataConfig(
        datasets=(DatasetSpec(damaged_dataset),),
        tokenizer=str(tokenizer_path),
        max_seq_len=256,
        max_tiles=12,
        pad_multiple=2,
        pack_buffer_size=3,
        system_message=None,
        shuffle_buffer=4,
        num_workers=workers,
        num_epochs=1,
    )
    loader = PackedBatchLoader(config, model)
    seen = Counter()
    for batch in loader:
        items = subsample_items(batch, tokenizer)
        seen.update(items)
        cu = batch.cu_seqlens_padded.tolist()
        image = 0
        for item, start, end in zip(items, cu[:-1], cu[1:], strict=True):
            images = len(item_images(item))
            assert (batch.tokens[start:end] == tokenizer.img_start_id).sum() == images
            tiles = batch.tiles_per_image[image : image + images]
            assert (
                context_runs(batch.tokens[start:end].numpy(), tokenizer.img_context_id)
                == (4 * tiles).tolist()
            )
            image += images
    assert seen == Counter(GOOD)
    stats = loader.stats()
    assert dict(stats.skipped) == {
        "invalid_json": 1,
        "corrupt_member": 2,
        "bad_image": 1,
        "missing_image": 1,
        "image_count_mismatch": 1,
        "missing_record": 1,
        "duplicate_key": 2,
    }
    assert dict(stats.events) == {"corrupt_tar_data": 2, "unreadable_shard": 1}
    for key in (
        ()
        if workers
        else (
            "item00001",
            "item00002",
            "item00004",
            "item00005",
            "item00007",
            "item00008",
            "item00011",
            "item00015",
            "part-2.tar",
        )
    ):
        assert key in caplog.text


def _config(shards, tokenizer_path, **overrides):
    return DataConfig(
        datasets=(DatasetSpec(shards),), tokenizer=str(tokenizer_path), system_message=None, **overrides
    )


def test_a_wholly_unreadable_dataset_stops_the_job_naming_it(tmp_path, tokenizer_path, model):
    with pytest.raises(Exception, match=r"none of the 4 shards exists: /nowhere/x-0\.tar"):
        next(iter(PackedBatchLoader(_config("/nowhere/x-{0..3}.tar", tokenizer_path, num_workers=1), model)))
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(DatasetUnreadable, match=r"empty\.tar"):
        next(
            iter(
                PackedBatchLoader(_config(str(tmp_path / "empty.tar"), tokenizer_path, num_workers=0), model)
            )
        )


def test_a_dataset_without_one_usable_sample_stops_instead_of_spinning(tmp_path, tokenizer_path, model):
    shard = write_tar(tmp_path / "bad.tar", [(f"k{i}.json", b"{oops") for i in range(5)])
    loader = PackedBatchLoader(_config(str(shard), tokenizer_path, num_workers=0), model)
    with pytest.raises(
        DatasetUnreadable, match=r"no usable sample in epoch 0: skipped samples: 6 \(invalid_json 6\)"
    ):
        next(iter(loader))
