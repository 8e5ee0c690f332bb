"""Evaluate a checkpoint on MM-NIAH (jsonl) or our synthetic MM-NIAH shards; see ``megatron_v2pe/eval/mmniah.py``.

    python tools/evaluate.py --checkpoint ckpt/run --data data/synth/mmniah --out results/run \\
        --delta-policy auto:1024

Writes ``results.json`` (scores by task, context length and needle depth, and every sample's response),
``heatmap.png`` (length x depth per task) and ``accuracy_vs_length.png`` under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron_v2pe.eval import mmniah


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
        help="V2PE δ at inference: auto[:window], fixed:<δ> or none (default auto:<trained window>)",
    )
    parser.add_argument(
        "--trained-window",
        type=int,
        help="context the model was trained on (default: data.max_seq_len of --model-config YAML, "
        "else the model's maximum sequence length)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4, help="prompts generated together")
    parser.add_argument(
        "--teacher-forced",
        action="store_true",
        help="score by one forward over prompt + gold answer instead of generating",
    )
    parser.add_argument(
        "--length-bins",
        type=int,
        nargs="+",
        help="lower edges of the context-length bins (default: powers of two covering the data)",
    )
    parser.add_argument(
        "--length-from",
        choices=["tokens", "meta"],
        default="tokens",
        help="context length of a sample: its prompt's token count or the length its metadata records",
    )
    parser.add_argument("--max-tiles", type=int, default=6, help="tile budget of one sample's images")
    parser.add_argument("--limit", type=int, help="evaluate only the first N samples")
    parser.add_argument("--attention-backend", choices=["auto", "te", "torch", "reference"], default="auto")
    parser.add_argument(
        "--context-parallel-size",
        type=int,
        default=1,
        help="split every sequence over this many ranks (teacher-forced only; launch with torchrun "
        "--nproc-per-node N, N = this size)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.max_new_tokens < 1 or args.batch_size < 1:
        print("error: --max-new-tokens and --batch-size must be >= 1", file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.context_parallel_size != world or (world > 1 and not args.teacher_forced):
        print(
            f"error: --context-parallel-size {args.context_parallel_size} with {world} process(es): context "
            "parallelism scores teacher-forced (add --teacher-forced) on exactly that many ranks "
            f"(torchrun --nproc-per-node {args.context_parallel_size})",
            file=sys.stderr,
        )
        return 2
    try:
        stats = mmniah.ShardReadStats()
        records = mmniah.read_records(args.data, args.task, args.image_root, stats)
        if args.limit is not None:
            records = records[: args.limit]
        model, tokenizer, window = _load(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    policy = args.delta_policy or f"auto:{window}"

    lead = int(os.environ.get("RANK", "0")) == 0  # under context parallelism every rank has the verdicts

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
            progress=progress,
        )
        edges = args.length_bins or mmniah.default_length_edges(r.context_length for r in results)
        summary = mmniah.report_dict(results, edges)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    summary = {
        "checkpoint": str(args.checkpoint),
        "data": [str(d) for d in args.data],
        "delta_policy": policy,
        "trained_window": window,
        "mode": "teacher-forced" if args.teacher_forced else "generate",
        "max_new_tokens": args.max_new_tokens,
        "length_from": args.length_from,
        "skipped": stats.skipped,
        **summary,
    }
    if not lead:
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    title = f"{args.checkpoint.name} (δ {policy})"
    mmniah.plot_heatmap(
        summary, args.out / "heatmap.png", title=f"MM-NIAH {title}, overall {summary['overall']:.3f}"
    )
    mmniah.plot_accuracy_vs_length(summary, args.out / "accuracy_vs_length.png", title=f"MM-NIAH {title}")
    print(f"overall {summary['overall']:.3f}")
    for task, score in summary["per_task"].items():
        print(
            f"  {task:24s} {score:.3f}  by length: "
            + "  ".join("-" if v is None else f"{v:.2f}" for v in summary["per_length"][task])
        )
    print(f"wrote {args.out}/results.json, heatmap.png, accuracy_vs_length.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
