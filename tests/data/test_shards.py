"""Shard writing and reading: make_shards round trip, URL forms, damaged tar data, resumable reads."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from megatron_v2pe.data.shards import iter_groups, read_group, unpack_sample
from megatron_v2pe.data.skips import BadSample, SkipReason, SkipStats
from megatron_v2pe.data.source import expand_urls
from tests.data.helpers import item_members, load_tool, png_bytes, write_items, write_tar

make_shards = load_tool("make_shards")


def _jpeg(width, height):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _internvl_dataset(tmp_path, records):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(_jpeg(64, 48))
    (root / "sub" / "b.png").write_bytes(png_bytes(30, 70))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records) + "\n"
    )
    return jsonl, root


def _conversation(question, answer="answer"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


GOOD = [
    {"id": "one", "image": "a.jpg", "conversations": _conversation("<image>\nwhat is it? 你好")},
    {
        "id": "two",
        "image": ["a.jpg", "sub/b.png"],
        "conversations": _conversation("<image><image>two?"),
        "metadata": {"source": "test"},
    },
    {"id": "three", "conversations": _conversation("text only")},
]


def _shard_records(manifest):
    groups = [g for url in expand_urls(str(manifest)) for g in iter_groups(url)]
    return [(g.key, *unpack_sample(g.members)) for g in groups]


def test_make_shards_round_trip(tmp_path):
    jsonl, root = _internvl_dataset(tmp_path, GOOD * 4)
    out = tmp_path / "shards"
    assert (
        make_shards.main(
            [str(jsonl), "--image-root", str(root), "--out", str(out), "--max-shard-bytes", "3000"]
        )
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 12 and len(manifest["shards"]) > 1
    assert sum(s["samples"] for s in manifest["shards"]) == 12
    records = _shard_records(out / "manifest.json")
    assert [key for key, _, _ in records] == [f"{n:09d}" for n in range(1, 13)]
    for (_, record, images), original in zip(records, GOOD * 4, strict=True):
        assert record["conversations"] == original["conversations"]
        assert record["id"] == original["id"]
        paths = [original["image"]] if isinstance(original.get("image"), str) else original.get("image", [])
        assert record["metadata"] == {
            **original.get("metadata", {}),
            **({"source_images": paths} if paths else {}),
        }
        assert images == [(root / p).read_bytes() for p in paths]


def test_make_shards_reports_and_skips_bad_records(tmp_path, caplog):
    bad = [
        "{not json",
        {"image": "missing.jpg", "conversations": _conversation("<image>")},
        {"image": "broken.png", "conversations": _conversation("<image>")},
        {"image": "a.jpg", "conversations": _conversation("<image><image>")},
        {"image": "a.jpg", "conversations": _conversation("no placeholder")},
        {"conversations": [{"from": "robot", "value": "x"}]},
    ]
    jsonl, root = _internvl_dataset(tmp_path, [GOOD[0], *bad, GOOD[2]])
    manifest, stats = make_shards.convert(
        jsonl, root, tmp_path / "out", 1 << 20, "shard", add_missing_placeholder=False
    )
    summary = json.loads(manifest.read_text())
    assert summary["samples"] == 2
    assert summary["skipped"] == {
        "invalid_json": 1,
        "missing_image": 1,
        "bad_image": 1,
        "image_count_mismatch": 2,
        "bad_record": 1,
    }
    assert f"{jsonl}:3" in caplog.text and "missing.jpg" in caplog.text
    _, stats = make_shards.convert(
        jsonl, root, tmp_path / "out2", 1 << 20, "shard", add_missing_placeholder=True
    )
    assert stats.skipped["image_count_mismatch"] == 1  # the one-image record without <image> is fixed
    fixed = [
        r for _, r, _ in _shard_records(tmp_path / "out2" / "manifest.json") if "no placeholder" in str(r)
    ]
    assert fixed[0]["conversations"][0]["value"] == "<image>\nno placeholder"


def test_url_forms_read_the_same_samples(tmp_path):
    manifest = write_items(tmp_path / "ds", range(20))
    urls = expand_urls(str(manifest))
    assert len(urls) > 2
    keys = [g.key for url in urls for g in iter_groups(url)]
    assert keys == [f"item{i:05d}" for i in range(20)]
    braces = expand_urls(f"{tmp_path}/ds/shard-{{000000..{len(urls) - 1:06d}}}.tar")
    assert (
        braces
        == urls
        == expand_urls(str(tmp_path / "ds" / "shard-*.tar"))
        == expand_urls(str(tmp_path / "ds"))
    )
    piped = [g.key for url in urls for g in iter_groups(f"pipe:cat {url}")]
    assert piped == keys
    gz = tmp_path / "one.tar.gz"
    gz.write_bytes(gzip.compress(Path(urls[0]).read_bytes()))
    assert [g.members for g in iter_groups(str(gz))] == [g.members for g in iter_groups(urls[0])]


@pytest.mark.parametrize("form", ["plain", "gzip", "pipe"])
def test_reading_resumes_at_a_sample_boundary(tmp_path, form):
    path = write_tar(tmp_path / "s.tar", [m for i in range(6) for m in item_members(i)])
    url = {"plain": str(path), "pipe": f"pipe:cat {path}", "gzip": str(tmp_path / "s.tar.gz")}[form]
    if form == "gzip":
        (tmp_path / "s.tar.gz").write_bytes(gzip.compress(path.read_bytes()))
    groups = list(iter_groups(url))
    assert [g.key for g in groups] == [f"item{i:05d}" for i in range(6)]
    assert [g.key for g in iter_groups(url, groups[2].end)] == [g.key for g in groups[3:]]
    assert read_group(url, groups[4].offset).members == groups[4].members


def _header_offset(path, name):
    with tarfile.open(path) as tar:
        return tar.getmember(name).offset


def test_corrupt_header_is_skipped_and_neighbours_marked(tmp_path):
    path = write_tar(tmp_path / "s.tar", [m for i in range(1, 6) for m in item_members(i)])
    offset = _header_offset(path, "item00002.0.png")  # item 2 has two images
    data = bytearray(path.read_bytes())
    data[offset : offset + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    stats = SkipStats()
    groups = list(iter_groups(str(path), stats=stats))
    assert [g.key for g in groups] == [f"item{i:05d}" for i in range(1, 6)]
    damaged = {g.key: g.damaged for g in groups}
    assert damaged == {
        "item00001": False,
        "item00002": True,
        "item00003": True,
        "item00004": False,
        "item00005": False,
    }
    assert stats.events == {"corrupt_tar_data": 1}
    assert sorted(groups[1].members) == ["1.png", "json"]
    with pytest.raises(BadSample) as caught:
        unpack_sample(groups[1].members)
    assert caught.value.reason is SkipReason.MISSING_IMAGE
    unpack_sample(groups[2].members)  # intact: marked only because it follows the damage


def test_truncated_shard_keeps_what_precedes_the_cut(tmp_path):
    path = write_tar(tmp_path / "s.tar", [m for i in range(1, 4) for m in item_members(i)])
    cut = _header_offset(path, "item00003.json") + 700  # inside item 3's data
    path.write_bytes(path.read_bytes()[:cut])
    stats = SkipStats()
    groups = list(iter_groups(str(path), stats=stats))
    assert [(g.key, g.damaged) for g in groups] == [
        ("item00001", False),
        ("item00002", False),
        ("item00003", True),
    ]
    assert stats.events == {"corrupt_tar_data": 1}
