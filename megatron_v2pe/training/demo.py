"""CPU demo of the training driver: synthesise data, train the tiny VLM with V2PE, save a checkpoint.

    python -m megatron_v2pe.training.demo [--out runs/demo] [--steps 300]

Writes MM-NIAH-, Long-VQA- and Long-MR-style shards (``data.long_context_synth``) with 56-px images (one
tile of the tiny vision tower), trains a sentencepiece tokenizer on their text, then runs ``v2pe-train``
with ``examples/configs/tiny_cpu.yaml`` on them: packed sequences, δ drawn per image, AdamW with
warm-up and cosine decay, a checkpoint under ``<out>/checkpoints`` and TensorBoard events under
``<out>/tensorboard``. Run it again with more ``--steps`` and it resumes from the checkpoint.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron_v2pe.data.long_context_synth import FAMILIES, SynthConfig, generate, write_samples
from megatron_v2pe.data.tokenizer import train_sentencepiece
from megatron_v2pe.training import train

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"  # package data
TINY_TILE = 56  # the tiny preset's image_size
TOKENS_PER_TILE = 4


def synthesise(
    out: Path, samples: int, context_tokens: Sequence[int], seed: int = 0
) -> tuple[list[Path], Path]:
    """Shards of every synthetic family and a tokenizer trained on their text; skipped if present."""
    manifests = [out / family / "manifest.json" for family in FAMILIES]
    tokenizer = out / "tokenizer.model"
    if tokenizer.is_file() and all(m.is_file() for m in manifests):
        return manifests, tokenizer
    config = SynthConfig(image_size=TINY_TILE, tokens_per_image=TOKENS_PER_TILE)
    texts = ["system user assistant"]
    for family, manifest in zip(FAMILIES, manifests, strict=True):
        batch = list(generate(family, samples, seed, config, context_tokens))
        texts += [re.sub(r"<image>", " ", turn["value"]) for s in batch for turn in s.conversations]
        write_samples(batch, manifest.parent)
    train_sentencepiece(texts, tokenizer, vocab_size=512)
    return manifests, tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--samples", type=int, default=64, help="per family")
    parser.add_argument("overrides", nargs="*", help="more section.key=value for v2pe-train")
    args = parser.parse_args(argv)
    manifests, tokenizer = synthesise(args.out / "data", args.samples, context_tokens=(192, 384))
    datasets = "[" + ",".join(f"{{shards: '{m}'}}" for m in manifests) + "]"
    return train.main(
        [
            "--config",
            str(CONFIG),
            f"data.datasets={datasets}",
            f"data.tokenizer={tokenizer}",
            f"training.train_iters={args.steps}",
            f"checkpoint.save={args.out / 'checkpoints'}",
            f"logging.tensorboard_dir={args.out / 'tensorboard'}",
            *args.overrides,
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
