"""Evaluate a checkpoint on MM-NIAH (jsonl) or our synthetic MM-NIAH shards; see ``megatron_v2pe/eval/mmniah/``.

    python tools/evaluate.py --checkpoint ckpt/run --data mm_niah_val/annotations/*.jsonl \\
        --image-root mm_niah_val/images --out results/run
    python tools/evaluate.py --checkpoint ckpt/run --data data/synth/mmniah --binning adaptive \\
        --out results/synth --delta-policy auto:1024

Writes ``results.json`` (scores by task, context length and needle depth, and every sample's response),
``heatmap.png`` (length x depth per task) and ``accuracy_vs_length.png`` under --out.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron_v2pe.errors import (
    OutputExists,
    UsageError,
    check_paths_exist,
    is_lead_rank,
    positive_int,
    run_command,
)
from megatron_v2pe.eval import mmniah
from megatron_v2pe.eval.scoring import MODES
from megatron_v2pe.parallel.attention_backends import ATTENTION_BACKENDS, resolve_attention_backend
from megatron_v2pe.v2pe.positions import parse_delta_policy


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="model-only dist checkpoint (converted or exported) or a training run's checkpoint root",
    )
    parser.add_argument("--tokenizer", type=Path, help="default: the checkpoint's tokenizer/ directory")
    parser.add_argument(
        "--model-config",
        type=Path,
        help="vlm_config.json or the training YAML; default: the checkpoint's vlm_config.json",
    )
    parser.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="MM-NIAH .jsonl files (globs allowed) or synthetic shard directories / globs / manifests",
    )
    parser.add_argument("--task", help="MM-NIAH task of the jsonl files when their names do not say it")
    parser.add_argument("--image-root", type=Path, help="MM-NIAH image paths are relative to this")
    parser.add_argument(
        "--delta-policy",
        help="V2PE δ at inference: auto[:window], fixed:<δ> or none (default auto: auto:<trained window>)",
    )
    parser.add_argument(
        "--trained-window",
        type=positive_int,
        help="context the model was trained on (default: data.max_seq_len of --model-config YAML, "
        "else the model's maximum sequence length)",
    )
    parser.add_argument(
        "--max-new-tokens", type=positive_int,
        help="default: MM-NIAH's 32 for the counting tasks, 16 for the others",
    )
    parser.add_argument("--batch-size", type=positive_int, default=4, help="prompts generated together")
    parser.add_argument(
        "--prefill-chunk",
        type=positive_int,
        help="prompt tokens per forward of the prefill (default 8192); smaller needs less memory",
    )
    parser.add_argument(
        "--teacher-forced",
        action="store_true",
        help="score by one forward over prompt + gold answer instead of generating",
    )
    parser.add_argument(
        "--protocol",
        choices=list(mmniah.PROTOCOLS),
        default="mmniah",
        help="prompts, image tiling and new-token limits of MM-NIAH's own evaluation (default) or of "
        "V2PE's copy of it (README)",
    )
    parser.add_argument(
        "--scoring",
        choices=list(MODES),
        help="MM-NIAH's rules as its code applies them (official), without its faults (strict) or as "
        "V2PE's copy applies them (v2pe); default: official, v2pe under --protocol v2pe",
    )
    parser.add_argument(
        "--binning",
        choices=list(mmniah.BINNINGS),
        default="official",
        help="official: MM-NIAH's fixed length bins, mean needle depth, empty bins count 0; adaptive: "
        "powers-of-two length bins, first needle depth, empty bins left out",
    )
    parser.add_argument(
        "--length-bins",
        type=int,
        nargs="+",
        help="lower edges of the context-length bins (default: the binning's)",
    )
    parser.add_argument(
        "--length-from",
        choices=["tokens", "meta"],
        default="meta",
        help="context length of a sample: the length its record states (default) or its prompt's tokens",
    )
    parser.add_argument(
        "--max-tiles",
        type=positive_int,
        default=6,
        help="tile budget of one synthetic sample's images (MM-NIAH files are tiled as --protocol says)",
    )
    parser.add_argument(
        "--print-prompts", action="store_true", help="print the user text of the first record of each task"
    )
    parser.add_argument("--limit", type=positive_int, help="evaluate only the first N samples")
    parser.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto")
    parser.add_argument(
        "--context-parallel-size",
        type=positive_int,
        default=1,
        help="shard the KV cache of every sequence over this many ranks (launch with torchrun "
        "--nproc-per-node N, N = this size)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory (made if absent)")
    return parser


def _load(args: argparse.Namespace):
    """(model, tokenizer, trained window) from the command line."""
    from megatron_v2pe.eval.loading import load_for_evaluation

    return load_for_evaluation(
        args.checkpoint,
        tokenizer=args.tokenizer,
        model_config=args.model_config,
        trained_window=args.trained_window,
        attention_backend=args.attention_backend,
        context_parallel_size=args.context_parallel_size,
    )


def _print_prompts(records: Sequence[mmniah.NiahRecord]) -> None:
    """The user text of each task's first record, as the model gets it (before the chat template)."""
    for task in dict.fromkeys(r.task for r in records):
        record = next(r for r in records if r.task == task)
        print(f"--- prompt of {record.source} ({task})\n{record.prompt}\n--- end of prompt", flush=True)


def _print_scores(summary: dict) -> None:
    needles = "".join(f", {k} {v:.3f}" for k, v in summary["by_needle"].items())
    rules = f"{summary['scoring']} scoring, {summary['binning']} binning"
    print(f"overall {summary['overall']:.3f}{needles} ({summary['protocol']} protocol, {rules})")
    if summary["dropped_below_first_bin"]:
        print(f"  {summary['dropped_below_first_bin']} samples below the first length bin were left out")
    for task, score in summary["per_task"].items():
        print(
            f"  {task:24s} {score:.3f}  by length: "
            + "  ".join("-" if v is None else f"{v:.2f}" for v in summary["per_length"][task])
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    return run_command(parser.prog, lambda: _evaluate(args))


def _check_arguments(args: argparse.Namespace) -> None:
    """Everything that can be checked before the data or the model is read (UsageError)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.context_parallel_size != world:
        raise UsageError(
            f"--context-parallel-size {args.context_parallel_size} with {world} process(es): run on "
            f"exactly that many ranks (torchrun --nproc-per-node {args.context_parallel_size})"
        )
    check_paths_exist(args, ("checkpoint", "tokenizer", "model_config", "image_root"))
    for item in args.data:
        if glob.has_magic(item) and not glob.glob(item):
            raise UsageError(f"--data {item} matches no file; check the pattern")
        if not glob.has_magic(item) and "{" not in item and not os.path.exists(item):
            raise UsageError(f"--data {item} does not exist; check the path")
    if args.out.exists() and not args.out.is_dir():
        raise OutputExists(f"--out {args.out} is an existing file; name a directory for the results")
    if args.delta_policy is not None:
        try:  # the form only: the trained window that plain "auto" stands for is known with the model
            parse_delta_policy(args.delta_policy, default_window=args.trained_window or 1)
        except ValueError as err:
            raise UsageError(f"--delta-policy: {err}") from err
    try:
        resolve_attention_backend(args.attention_backend)
    except ImportError as err:
        raise UsageError(f"--attention-backend {args.attention_backend}: {err}") from err


def _as_usage_error(err: Exception) -> UsageError:
    """Bad data or checkpoint contents (the reader's message names the file), as a user error."""
    return err if isinstance(err, UsageError) else UsageError(str(err))


def _evaluate(args: argparse.Namespace) -> int:
    _check_arguments(args)
    try:
        stats = mmniah.ShardReadStats()
        records = mmniah.read_records(args.data, args.task, args.image_root, stats, args.protocol)
        if args.limit is not None:
            records = records[: args.limit]
        mmniah.check_lengths(records, args.length_from, args.binning, args.length_bins)
        if args.print_prompts:
            _print_prompts(records)
        model, tokenizer, window = _load(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise _as_usage_error(err) from err
    policy = parse_delta_policy(args.delta_policy or "auto", default_window=window).spec
    scoring = args.scoring or ("v2pe" if args.protocol == "v2pe" else "official")

    lead = is_lead_rank()  # under context parallelism every rank has the verdicts
    if lead:  # the memory plan of every batch
        logging.basicConfig(format="%(message)s")
        logging.getLogger("megatron_v2pe.eval.memory_plan").setLevel(logging.INFO)

    def progress(done: int, total: int) -> None:
        if lead:
            print(f"\r{done}/{total} samples", end="" if done < total else "\n", file=sys.stderr, flush=True)

    try:
        from megatron_v2pe.eval.loading import rope_for_policy

        note = rope_for_policy(model, policy)
        if note and lead:
            print(note, file=sys.stderr)
        results = mmniah.evaluate_records(
            model,
            tokenizer,
            records,
            delta_policy=policy,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            teacher_forced=args.teacher_forced,
            length_source=args.length_from,
            max_tiles=args.max_tiles,
            mode=scoring,
            protocol=args.protocol,
            progress=progress,
            prefill_chunk=args.prefill_chunk,
        )
        lengths = (r.context_length for r in results)
        edges = args.length_bins or mmniah.default_length_edges(lengths, args.binning)
        summary = mmniah.report_dict(results, edges, args.binning, scoring)
    except ValueError as err:
        raise _as_usage_error(err) from err
    summary = {
        "checkpoint": str(args.checkpoint),
        "data": [str(d) for d in args.data],
        "delta_policy": policy,
        "trained_window": window,
        "mode": "teacher-forced" if args.teacher_forced else "generate",
        "protocol": args.protocol,
        "max_new_tokens": args.max_new_tokens,
        "length_from": args.length_from,
        "skipped": stats.skipped,
        **summary,
    }
    if lead:
        _write(args, summary, policy)
    return 0


def _write(args: argparse.Namespace, summary: dict, policy: str) -> None:
    """results.json and the plots under --out, and the scores on stdout."""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    title = f"{args.checkpoint.name} (δ {policy})"
    mmniah.plot_heatmap(
        summary, args.out / "heatmap.png", title=f"MM-NIAH {title}, overall {summary['overall']:.3f}"
    )
    mmniah.plot_accuracy_vs_length(summary, args.out / "accuracy_vs_length.png", title=f"MM-NIAH {title}")
    _print_scores(summary)
    print(f"wrote {args.out}/results.json, heatmap.png, accuracy_vs_length.png")


if __name__ == "__main__":
    sys.exit(main())
