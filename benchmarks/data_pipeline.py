"""Data-pipeline throughput of one CPU worker next to what one H100 consumes, and peak memory.

Run from the repository root: `python benchmarks/data_pipeline.py` (`--quick` for a smoke run). It writes
synthetic shards to a temporary directory, then times read -> decode -> tile -> tokenize -> pack in one
process on one thread (what one DataLoader worker does) for two kinds of data:

- long: MM-NIAH / Long-VQA / Long-MR-style samples of ~8K tokens, many 448-px drawings (one tile each);
- photos: one 1344x896 JPEG per sample (6 tiles + thumbnail), the heaviest decode and resize per tile.

Demand: an H100 training InternVL2-2B on these very packs at 40% MFU (dense bf16 peak 989 TFLOP/s) needs
FLOPs(pack) / (0.4 · peak) seconds per pack (megatron_v2pe.model.flops.training_flops_per_pack); its
tokens/s and tiles/s are printed next to the worker's. Memory: peak RSS of a fresh process that builds
packs of 32K and of 256K tokens, with the pack's own float32 pixels and the packing buffer's uint8 tiles
listed beside it (the buffer holds `buffer_size` samples: 32 for 32K packs, 16 for 256K packs of 32K-token
samples); the rest does not grow with the pack length.
"""

# ruff: noqa: E402  (the thread settings must precede the numpy and torch imports)
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import dataclasses
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import machine_description, print_table

try:
    import megatron_v2pe  # noqa: F401
except ImportError:  # not installed: use the checkout this script lives in
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from megatron_v2pe.data.config import DataConfig, DatasetSpec
from megatron_v2pe.data.loader import PackStream
from megatron_v2pe.data.long_context_synth import (
    FAMILIES,
    SynthConfig,
    filler_paragraph,
    generate,
    write_samples,
)
from megatron_v2pe.data.shards import ShardWriter
from megatron_v2pe.data.source import Consumer
from megatron_v2pe.data.tokenizer import load_tokenizer, train_sentencepiece
from megatron_v2pe.model.flops import H100_BF16_DENSE_PEAK, training_flops_per_pack
from megatron_v2pe.model.presets import VLMConfig, internvl2_2b

MFU = 0.40
PACK_32K = {"max_seq_len": 32768, "max_tiles": 128, "pad_multiple": 2, "pack_buffer_size": 32}
PACK_256K = {"max_seq_len": 262144, "max_tiles": 1024, "pad_multiple": 2, "pack_buffer_size": 16}


def write_long_dataset(directory: Path, samples: int, context_tokens: int) -> list[str]:
    """Manifests of the three synthetic families, samples split evenly between them."""
    config = SynthConfig(image_size=448, tokens_per_image=256)
    manifests = []
    for family in FAMILIES:
        batch = generate(
            family, max(1, samples // 3), seed=0, config=config, context_tokens=(context_tokens,)
        )
        manifests.append(str(write_samples(batch, directory / family)))
    return manifests


def _photo(rng: np.random.Generator) -> bytes:
    """A photo-like JPEG: smooth colour fields plus grain, 1344x896 (a 3x2 grid of 448-px tiles)."""
    coarse = rng.integers(0, 256, size=(12, 18, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((1344, 896), Image.Resampling.BICUBIC)
    pixels = np.asarray(image).astype(np.int16) + rng.integers(-12, 13, size=(896, 1344, 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_photo_dataset(directory: Path, samples: int) -> list[str]:
    rng = np.random.default_rng(0)
    photos = [_photo(rng) for _ in range(8)]
    with ShardWriter(directory) as writer:
        for i in range(samples):
            question = f"<image>\n{filler_paragraph(rng, 20)} What stands out?"
            record = {
                "conversations": [
                    {"from": "human", "value": question},
                    {"from": "gpt", "value": filler_paragraph(rng, 30)},
                ]
            }
            writer.write(f"photo{i:06d}", record, [("jpg", photos[i % len(photos)])])
    return [str(directory / "manifest.json")]


def benchmark_model(tokenizer_path: str) -> VLMConfig:
    """InternVL2-2B's shapes with the demo tokenizer's <IMG_CONTEXT> id."""
    tokenizer = load_tokenizer(tokenizer_path)
    return dataclasses.replace(internvl2_2b(), img_context_token_id=tokenizer.img_context_id)


def data_config(manifests: list[str], tokenizer_path: str, pack: dict) -> DataConfig:
    return DataConfig(
        datasets=[DatasetSpec(m) for m in manifests],
        tokenizer=tokenizer_path,
        **pack,
        max_image_tiles=6,
        shuffle_buffer=8,
        num_workers=0,
        num_epochs=1,
    )


def measure(manifests: list[str], tokenizer_path: str, max_packs: int) -> dict[str, float]:
    """One worker's rates over the packs it builds, and the H100 demand for the same packs."""
    model = benchmark_model(tokenizer_path)
    stream = PackStream(data_config(manifests, tokenizer_path, PACK_32K), model, Consumer(0, 1))
    tokens = padded = tiles = packs = 0
    flops = 0.0
    start = time.perf_counter()
    for batch in stream:
        seqlens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
        tokens += sum(seqlens)
        padded += batch.num_tokens
        tiles += int(batch.tiles_per_image.sum())
        packs += 1
        flops += training_flops_per_pack(model, seqlens, int(batch.tiles_per_image.sum()))
        if packs == max_packs:
            break
    seconds = time.perf_counter() - start
    gpu_seconds = flops / (MFU * H100_BF16_DENSE_PEAK)
    return {
        "packs": packs,
        "tokens/pack": tokens / packs,
        "tiles/pack": tiles / packs,
        "worker tokens/s": tokens / seconds,
        "worker tiles/s": tiles / seconds,
        "H100 tokens/s": tokens / gpu_seconds,
        "H100 tiles/s": tiles / gpu_seconds,
        "skipped": stream.stats.total_skipped,
    }


def _rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc (Linux)."""
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith(field + ":"))
    return kib / 1024


def rss_child(manifests: list[str], tokenizer_path: str, pack_tokens: int, max_packs: int) -> None:
    """Runs in a fresh process: prints JSON with its RSS before and at its peak while building packs of
    `pack_tokens` (the peak is reset after the imports, whose own transient peak would hide the rest)."""
    pack = PACK_32K if pack_tokens == PACK_32K["max_seq_len"] else PACK_256K
    stream = PackStream(
        data_config(manifests, tokenizer_path, pack), benchmark_model(tokenizer_path), Consumer(0, 1)
    )
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS
    baseline = _rss_mib("VmRSS")
    pixels = buffered = tokens = packs = 0
    for batch in stream:
        pixels = max(pixels, batch.pixel_values.numel() * batch.pixel_values.element_size())
        # the full buffer just before the pack left it: what remains plus the pack's own uint8 tiles
        buffered = max(
            buffered, sum(s.tiles.nbytes for s in stream.packer.buffer) + batch.pixel_values.numel()
        )
        tokens = max(tokens, batch.num_tokens)
        packs += 1
        if packs == max_packs:
            break
        del batch  # as a DataLoader worker does once the pack is handed over
    print(
        json.dumps(
            {
                "baseline": baseline,
                "peak": _rss_mib("VmHWM"),
                "pixels": pixels / 2**20,
                "buffered": buffered / 2**20,
                "tokens": tokens,
                "packs": packs,
            }
        )
    )


def measure_rss(
    manifests: list[str], tokenizer_path: str, pack_tokens: int, max_packs: int
) -> dict[str, float]:
    command = [
        sys.executable,
        __file__,
        "--rss-child",
        str(pack_tokens),
        "--packs",
        str(max_packs),
        "--tokenizer",
        tokenizer_path,
        *manifests,
    ]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run on little data")
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--packs", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("manifests", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.rss_child:
        rss_child(args.manifests, args.tokenizer, args.rss_child, args.packs)
        return 0

    scale = 1 if args.quick else 6
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        texts = [filler_paragraph(np.random.default_rng(i), 60) for i in range(200)]
        tokenizer = str(train_sentencepiece(texts, root / "demo.model", vocab_size=2000))
        long_8k = write_long_dataset(root / "long8k", 6 * scale, 8192)
        photos = write_photo_dataset(root / "photos", 20 * scale)
        rows = []
        for name, manifests in (
            ("long (8K samples, 448-px drawings)", long_8k),
            ("photos (1344x896 JPEG)", photos),
        ):
            m = measure(manifests, tokenizer, max_packs=3 * scale)
            rows.append(
                [
                    name,
                    m["packs"],
                    f"{m['tokens/pack']:.0f}",
                    f"{m['tiles/pack']:.0f}",
                    f"{m['worker tokens/s']:,.0f}",
                    f"{m['H100 tokens/s']:,.0f}",
                    f"{m['worker tiles/s']:.0f}",
                    f"{m['H100 tiles/s']:.0f}",
                    f"{m['worker tokens/s'] / m['H100 tokens/s']:.2f}x",
                    m["skipped"],
                ]
            )
        long_32k = write_long_dataset(root / "long32k", 4 * scale, 30000)
        rss = [
            ("32K", measure_rss(long_8k, tokenizer, 32768, 2 * scale)),
            ("256K", measure_rss(long_32k, tokenizer, 262144, max(1, scale // 3))),
        ]

    print(f"machine: {machine_description()}; 1 thread\n")
    print_table(
        f"One worker vs one H100 (InternVL2-2B, 32K packs, {MFU:.0%} MFU of "
        f"{H100_BF16_DENSE_PEAK / 1e12:.0f} TFLOP/s)",
        [
            "data",
            "packs",
            "tokens/pack",
            "tiles/pack",
            "worker tok/s",
            "H100 tok/s",
            "worker tiles/s",
            "H100 tiles/s",
            "worker/H100",
            "skipped",
        ],
        rows,
    )
    print_table(
        "Peak memory of one worker (fresh process; RSS in MiB)",
        [
            "pack",
            "packs",
            "tokens",
            "RSS before",
            "peak RSS",
            "pack pixels (f32)",
            "full buffer tiles (u8)",
            "peak - before - pixels - buffered",
        ],
        [
            [
                name,
                r["packs"],
                r["tokens"],
                f"{r['baseline']:.0f}",
                f"{r['peak']:.0f}",
                f"{r['pixels']:.0f}",
                f"{r['buffered']:.0f}",
                f"{r['peak'] - r['baseline'] - r['pixels'] - r['buffered']:.0f}",
            ]
            for name, r in rss
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
