"""Convert InternVL conversation jsonl plus an image root into webdataset shards and a manifest.

    python tools/make_shards.py train.jsonl --image-root /data/images --out shards/train

Each line is {"image": path or [paths] (optional), "conversations": [...], ...}; image paths are
relative to --image-root (absolute paths are kept). Images are stored as their original bytes. Bad
records (invalid JSON, not a conversation, missing or undecodable image, <image> placeholders that do
not match the images) are reported with their line number, counted in the manifest and skipped. The
shard format is described in megatron_v2pe/data/shards.py and docs/data_format.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron_v2pe.data.conversation import IMAGE_PLACEHOLDER, count_placeholders, parse_conversations
from megatron_v2pe.data.images import decode_image, encode_png
from megatron_v2pe.data.shards import IMAGE_MEMBER, ShardWriter
from megatron_v2pe.data.skips import BadSample, SkipReason, SkipStats


def _image_paths(record: dict) -> list[str]:
    paths = record.get("image", [])
    paths = [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise BadSample(SkipReason.BAD_RECORD, "'image' must be a path or a list of paths")
    return paths


def _with_placeholder(record: dict) -> dict:
    """InternVL's convention for one-image records without a placeholder: it goes first in the first
    human turn."""
    conversations = [dict(turn) for turn in record["conversations"]]
    first = next(turn for turn in conversations if turn.get("from") in ("human", "user"))
    first["value"] = f"{IMAGE_PLACEHOLDER}\n{first['value']}"
    return {**record, "conversations": conversations}


def _load_image(path: Path, index: int) -> tuple[str, bytes]:
    """(extension, bytes) of a checked image: original bytes, or PNG for formats the shards do not name."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise BadSample(SkipReason.MISSING_IMAGE, f"image {index} ({path}): {err.strerror}") from None
    try:
        image = decode_image(data)
    except ValueError as err:
        raise BadSample(SkipReason.BAD_IMAGE, f"image {index} ({path}): {err}") from None
    extension = path.suffix.lower().lstrip(".")
    if IMAGE_MEMBER.match(f"0.{extension}"):
        return extension, data
    return "png", encode_png(image)


def convert_record(
    line: str, image_root: Path, add_missing_placeholder: bool
) -> tuple[dict, list[tuple[str, bytes]]]:
    """The shard record and images of one jsonl line; raises BadSample."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadSample(SkipReason.INVALID_JSON, str(err)) from None
    turns = parse_conversations(record)
    paths = _image_paths(record)
    placeholders = count_placeholders(turns)
    if add_missing_placeholder and placeholders == 0 and len(paths) == 1:
        record, placeholders = _with_placeholder(record), 1
    if placeholders != len(paths):
        raise BadSample(
            SkipReason.IMAGE_COUNT_MISMATCH, f"{placeholders} <image> placeholders, {len(paths)} images"
        )
    images = [_load_image(image_root / p, k) for k, p in enumerate(paths)]
    kept = {k: v for k, v in record.items() if k not in ("image", "images", "metadata")}
    metadata = {**record.get("metadata", {}), **({"source_images": paths} if paths else {})}
    return {**kept, "metadata": metadata}, images


def convert(
    jsonl: Path, image_root: Path, out: Path, max_shard_bytes: int, prefix: str, add_missing_placeholder: bool
) -> tuple[Path, SkipStats]:
    stats = SkipStats()
    writer = ShardWriter(out, prefix=prefix, max_bytes=max_shard_bytes)
    with jsonl.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record, images = convert_record(line, image_root, add_missing_placeholder)
            except BadSample as bad:
                stats.skip(bad.reason, f"{jsonl}:{number}", bad.detail)
                continue
            writer.write(f"{number:09d}", record, images)
    return writer.close(skipped=stats.skipped), stats


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("jsonl", type=Path, help="InternVL conversation jsonl")
    parser.add_argument(
        "--image-root", type=Path, default=Path("."), help="directory image paths are relative to"
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for the shards and manifest.json")
    parser.add_argument("--max-shard-bytes", type=float, default=1e9, help="shard size bound (default 1e9)")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix")
    parser.add_argument(
        "--add-missing-placeholder",
        action="store_true",
        help="give one-image records without <image> a placeholder at the start of the first human turn",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    manifest, stats = convert(
        args.jsonl,
        args.image_root,
        args.out,
        int(args.max_shard_bytes),
        args.prefix,
        args.add_missing_placeholder,
    )
    summary = json.loads(manifest.read_text())
    shards = len(summary["shards"])
    print(f"wrote {summary['samples']} samples in {shards} shards to {args.out}; {stats.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
