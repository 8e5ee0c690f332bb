"""Convert checkpoints between Hugging Face and Megatron-Core (dist checkpoint, any TP/PP/CP layout).

    v2pe-convert-checkpoint hf-to-megatron --hf-layout internvl2 --input InternVL2-2B --output ckpt/init \\
        --preset internvl2_2b
    v2pe-convert-checkpoint megatron-to-hf --hf-layout hf --input ckpt/run --output exported \\
        --delta-policy auto:32768

Layouts: ``internvl2`` is OpenGVLab's release (remote code; exporting to it needs --reference, the release
directory); ``hf`` is transformers' native InternVLForConditionalGeneration. The Megatron output is a
model-only checkpoint the training driver loads as its starting point. Outputs appear only when complete.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from megatron_v2pe.convert.checkpoint import hf_to_megatron, megatron_to_hf
from megatron_v2pe.convert.layouts import LAYOUTS
from megatron_v2pe.errors import UsageError, check_paths_exist, positive_int, run_command
from megatron_v2pe.model.internvl_config import from_hf_config
from megatron_v2pe.model.presets import PRESETS, VLMConfig, preset

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SIZE_UNITS = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]i?[bB])?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; write e.g. 5GB, 500MiB or 1000000")
    return int(float(match[1]) * SIZE_UNITS[(match[2] or "").upper()])


def _model_config(text: str, img_context_token_id: int | None) -> VLMConfig:
    """A preset name, or an InternVL2 release directory / config.json."""
    return preset(text) if text in PRESETS else from_hf_config(text, img_context_token_id)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [
        ("hf-to-megatron", "Hugging Face directory -> Megatron dist checkpoint"),
        ("megatron-to-hf", "Megatron dist checkpoint -> Hugging Face directory"),
    ]:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--hf-layout", choices=sorted(LAYOUTS), required=True)
        command.add_argument("--input", type=Path, required=True)
        command.add_argument("--output", type=Path, required=True, help="must not exist yet")
        command.add_argument("--dtype", choices=sorted(DTYPES), help="default: the input's dtype")
        command.add_argument(
            "--img-context-token-id",
            type=int,
            help="<IMG_CONTEXT> id when the config does not hold it (InternVL2 layout)",
        )
    to_megatron = commands.choices["hf-to-megatron"]
    to_megatron.add_argument(
        "--preset", choices=sorted(PRESETS), help="fail unless the checkpoint matches it"
    )
    to_hf = commands.choices["megatron-to-hf"]
    to_hf.add_argument(
        "--model-config", help="preset or InternVL2 config; default: the checkpoint's vlm_config.json"
    )
    to_hf.add_argument(
        "--delta-policy", help="recorded V2PE δ policy: auto[:window], fixed:<δ> or none (default auto)"
    )
    to_hf.add_argument(
        "--trained-window", type=positive_int, help="context the model was trained on (default: its max)"
    )
    to_hf.add_argument(
        "--reference", type=Path, help="the release directory (needed for --hf-layout internvl2)"
    )
    to_hf.add_argument("--tokenizer", type=Path, help="tokenizer files to copy (default: the checkpoint's)")
    to_hf.add_argument("--max-shard-size", type=_size, default=_size("5GB"))
    return parser


def _ensure_runtime() -> None:
    """One process, tensor-parallel 1: the dist checkpoint reshards on load, so conversion needs no more."""
    from megatron.core import parallel_state

    from megatron_v2pe.parallel import initialize

    if not parallel_state.model_parallel_is_initialized():
        initialize(seed=0)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_command("v2pe-convert-checkpoint", lambda: _convert(args))


def _check_paths(args: argparse.Namespace) -> None:
    """Every input path named on the command line exists (before any runtime or model is set up)."""
    check_paths_exist(args, ("input", "reference", "tokenizer"))
    model_config = getattr(args, "model_config", None)
    if model_config is not None and model_config not in PRESETS and not Path(model_config).exists():
        raise UsageError(
            f"--model-config {model_config} is neither a preset ({', '.join(sorted(PRESETS))}) nor an "
            "existing config.json or release directory"
        )


def _convert(args: argparse.Namespace) -> int:
    _check_paths(args)
    dtype = DTYPES[args.dtype] if args.dtype else None
    _ensure_runtime()
    if args.command == "hf-to-megatron":
        hf_to_megatron(
            args.input,
            args.output,
            args.hf_layout,
            expected=preset(args.preset) if args.preset else None,
            dtype=dtype,
            img_context_token_id=args.img_context_token_id,
        )
    else:
        config = _model_config(args.model_config, args.img_context_token_id) if args.model_config else None
        megatron_to_hf(
            args.input,
            args.output,
            args.hf_layout,
            config=config,
            dtype=dtype,
            delta_policy=args.delta_policy,
            trained_window=args.trained_window,
            reference=args.reference,
            tokenizer=args.tokenizer,
            max_shard_bytes=args.max_shard_size,
        )
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
