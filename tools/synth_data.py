"""Write synthetic long-context shards (MM-NIAH, Long-VQA and Long-MR styles) with exact answers.

    python tools/synth_data.py --out data/synth --samples 200 --context-tokens 4096 16384

One shard directory (with manifest.json) per family under --out. With --tokenizer, also trains a small
sentencepiece model on the generated text, so that the CPU demo and the tests need no download.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from megatron_v2pe.data.long_context_synth import FAMILIES, SynthConfig, SynthSample, generate, write_samples
from megatron_v2pe.data.tokenizer import train_sentencepiece


def _collect_text(samples: Iterator[SynthSample], texts: list[str]) -> Iterator[SynthSample]:
    for sample in samples:
        texts.extend(re.sub(r"<image>", " ", turn["value"]) for turn in sample.conversations)
        yield sample


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="output directory (one subdirectory per family)"
    )
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--samples", type=int, default=100, help="samples per family")
    parser.add_argument(
        "--context-tokens", type=int, nargs="+", default=[2048], help="target lengths, cycled"
    )
    parser.add_argument(
        "--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="needle depths"
    )
    parser.add_argument("--image-size", type=int, default=448, help="side of the drawn images in pixels")
    parser.add_argument("--tokens-per-image", type=int, default=256, help="for the length estimate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-bytes", type=float, default=1e9)
    parser.add_argument("--tokenizer", type=Path, help="also train a demo sentencepiece model here")
    parser.add_argument("--vocab-size", type=int, default=1024, help="of the demo tokenizer")
    args = parser.parse_args(argv)
    if any(not 0.0 <= d <= 1.0 for d in args.depths):
        parser.error(f"depths must lie in [0, 1], got {args.depths}")

    config = SynthConfig(image_size=args.image_size, tokens_per_image=args.tokens_per_image)
    texts: list[str] = ["system user assistant"]
    for family in args.families:
        samples = generate(family, args.samples, args.seed, config, args.context_tokens, args.depths)
        manifest = write_samples(_collect_text(samples, texts), args.out / family, int(args.max_shard_bytes))
        print(f"{family}: {args.samples} samples -> {manifest}")
    if args.tokenizer:
        print(f"tokenizer -> {train_sentencepiece(texts, args.tokenizer, args.vocab_size)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
