"""The V2PE demo on CPU: train the tiny VLM twice on the same short data, with V2PE and with δ = 1, then
measure needle retrieval at 1x, 2x, 4x and 8x the training length.

    python -m megatron_v2pe.eval.demo --out runs/v2pe_demo [--steps N]

The task is MM-NIAH-style retrieval with a text needle and images as the haystack: a sample opens with
"The secret animal is the <animal>.", continues with wide scene images (7 tiles of 56 px plus a thumbnail
each, 34 tokens an image, so that the prompt is mostly visual tokens that δ can compress) and asks which
animal it was; the answer is one word. Training samples have 1 to ``--train-images`` images (at most a few
hundred tokens: the short ones teach the retrieval quickly, the long ones set the trained window);
evaluation samples have 1, 2, 4 and 8 times as many tokens as the longest training sample.

Both runs use ``examples/configs/tiny_cpu.yaml``, the same data, seed and steps, and RoPE base
``--rotary-base`` (5,000 by default; the README says why, and what other bases give); only
``data.delta_policy`` differs (``random``: δ drawn per image from {1, 1/2, ..., 1/256}; ``none``: δ = 1).
They train side by side, one single-threaded process each. Evaluation is teacher-forced (correct when the
argmax tokens equal the answer's tokens), the V2PE model with ``auto:<window>`` (largest δ that keeps every position
inside the longest training sample) and the baseline with ``none``. Data and checkpoints under ``--out``
are reused when they match the arguments and already reached ``--steps``.

Writes ``<out>/results.json`` (accuracy per length and model, the δ ``auto`` chose, the training losses)
and ``<out>/accuracy_vs_length.png``, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from megatron_v2pe.checkpoint.layout import latest_iteration
from megatron_v2pe.data.conversation import INTERNVL2_SYSTEM_MESSAGE
from megatron_v2pe.data.images import encode_png
from megatron_v2pe.data.long_context_synth import (
    _ANIMALS,
    SynthSample,
    draw_scene,
    random_objects,
    write_samples,
)
from megatron_v2pe.data.tokenizer import train_sentencepiece

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory the package is imported from
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"  # package data
TINY_TILE = 56  # the tiny preset's image_size
MULTIPLES = (1, 2, 4, 8)
TOKENS_PER_TILE = 4  # the tiny preset's
TEMPLATE = "internlm2-chat"  # the tiny preset's chat template
WIDE = 7  # images are WIDE tiles wide: WIDE tiles + a thumbnail, so mostly visual tokens
NEEDLE = "The secret animal is the {animal}."
QUESTION = "Which animal is the secret one? Answer with one word."
PROGRESS_SECONDS = 30.0


def needle_sample(key: str, images: int, rng: np.random.Generator, animal: str | None = None) -> SynthSample:
    """A text needle first, then `images` scene images, then the question (a random animal if none)."""
    animal = animal or str(rng.choice(_ANIMALS))
    scenes = [
        draw_scene(rng, random_objects(rng, int(rng.integers(1, 5))), WIDE * TINY_TILE, TINY_TILE)
        for _ in range(images)
    ]
    prompt = "\n".join([NEEDLE.format(animal=animal), "<image>" * images, QUESTION])
    meta = {
        "family": "mmniah",
        "task": "retrieval-text",
        "depths": [0.0],
        "answer": animal,
        "images": images,
    }
    return SynthSample(
        key, [{"from": "human", "value": prompt}, {"from": "gpt", "value": animal}], scenes, meta
    )


def _prompt_tokens(tokenizer_path: Path, sample: SynthSample) -> int:
    """Tokens of a sample's prompt and answer as training and evaluation lay them out."""
    from megatron_v2pe.data.tokenizer import load_tokenizer
    from megatron_v2pe.eval import mmniah

    builder = mmniah.prompt_builder(
        load_tokenizer(tokenizer_path),
        TOKENS_PER_TILE,
        TINY_TILE,
        max_tiles=WIDE * len(sample.images),
        template=TEMPLATE,
    )
    record = mmniah.NiahRecord(
        id=sample.key,
        task="retrieval-text",
        prompt=sample.conversations[0]["value"],
        images=[encode_png(image) for image in sample.images],
        answer=sample.metadata["answer"],
        depths=(0.0,),
        meta_length=None,
        source=sample.key,
    )
    built = mmniah.build_prompt(builder, record)
    return len(built.tokens) + len(built.answer_tokens)


def synthesise(
    out: Path, train_samples: int, eval_samples: int, train_images: int, min_train_images: int, seed: int
) -> dict:
    """Training shards, a tokenizer, and evaluation shards whose samples are 1x, 2x, 4x and 8x as long
    (in tokens) as the longest training sample; skipped if present. Returns paths and the window."""
    paths = {
        "train": out / "train",
        **{f"{m}x": out / f"eval_{m}x" for m in MULTIPLES},
        "tokenizer": out / "tokenizer.model",
    }
    spec = {
        "train_samples": train_samples,
        "eval_samples": eval_samples,
        "train_images": train_images,
        "min_train_images": min_train_images,
        "seed": seed,
    }
    stamp = out / "data.json"
    if stamp.is_file() and json.loads(stamp.read_text())["spec"] == spec:
        return {**paths, **json.loads(stamp.read_text())["sizes"]}
    rng = np.random.default_rng(seed)
    low, high = min_train_images, train_images
    train = [
        needle_sample(f"train-{i:06d}", int(rng.integers(low, high + 1)), rng) for i in range(train_samples)
    ]
    write_samples(train, paths["train"])
    texts = [INTERNVL2_SYSTEM_MESSAGE, "system user assistant"]
    texts += [s.conversations[0]["value"].replace("<image>", " ") for s in train]
    train_sentencepiece(texts, paths["tokenizer"], vocab_size=512)

    # tokens = base + per_image * images, base being the text around the images with the longest animal
    def probe(images: int, animal: str) -> int:
        return _prompt_tokens(
            paths["tokenizer"], needle_sample("probe", images, np.random.default_rng(0), animal)
        )

    one_image = {animal: probe(1, animal) for animal in _ANIMALS}
    per_image = probe(2, _ANIMALS[0]) - one_image[_ANIMALS[0]]
    base = max(one_image.values()) - per_image
    window = base + per_image * high + 1  # the longest training sample (prompt + answer), one token of slack
    images = {f"{m}x": max(1, (m * window - base - 1) // per_image) for m in MULTIPLES}
    for m in MULTIPLES:
        rng_m = np.random.default_rng([seed, m])
        write_samples(
            [needle_sample(f"eval{m}x-{i:06d}", images[f"{m}x"], rng_m) for i in range(eval_samples)],
            paths[f"{m}x"],
        )
    sizes = {"window": window, "images": images}
    stamp.write_text(json.dumps({"spec": spec, "sizes": sizes}) + "\n")
    return {**paths, **sizes}


def _trained_to(run: Path) -> int:
    return latest_iteration(run / "checkpoints") or 0


def _train_arguments(run: Path, policy: str, data: dict, args: argparse.Namespace) -> list[str]:
    return [
        "--config",
        str(CONFIG),
        f"data.datasets=[{{shards: '{data['train'] / 'manifest.json'}'}}]",
        f"data.tokenizer={data['tokenizer']}",
        f"data.delta_policy={policy}",
        f"data.max_seq_len={args.seq_len}",
        f"data.max_image_tiles={WIDE * args.train_images}",
        f"data.max_tiles={(WIDE + 1) * args.train_images}",
        f"training.train_iters={args.steps}",
        f"training.global_batch_size={args.batch}",
        f"training.seed={args.seed}",
        f"optimizer.lr={args.lr}",
        f"model.rotary_base={args.rotary_base}",
        f"checkpoint.save={run / 'checkpoints'}",
        f"checkpoint.save_interval={args.steps}",
        f"logging.log_interval={max(1, args.steps // 10)}",
        f"logging.metrics_file={run / 'metrics.jsonl'}",
        *args.overrides,
    ]


def train_runs(runs: dict[str, str], data: dict, args: argparse.Namespace) -> None:
    """The training runs, one single-threaded process each, side by side (a run whose checkpoint already
    reached --steps is skipped). Each process logs to <run>/train.log."""
    start, procs = time.perf_counter(), {}
    for name, policy in runs.items():
        run, arguments = args.out / name, _train_arguments(args.out / name, policy, data, args)
        stamp = run / "train_args.json"
        if _trained_to(run) and (not stamp.is_file() or json.loads(stamp.read_text()) != arguments):
            raise SystemExit(
                f"{run} holds a run trained with other settings (see {stamp.name}); "
                "choose another --out or delete that directory"
            )
        if _trained_to(run) >= args.steps:
            print(f"{name}: reusing the checkpoint at step {_trained_to(run)}", flush=True)
            continue
        run.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(arguments) + "\n")
        log = (run / "train.log").open("a")  # a resumed run appends
        command = [sys.executable, "-m", "megatron_v2pe.training.train", *arguments]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
        procs[name] = (
            subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env),
            log,
        )
        print(f"{name}: training {args.steps} steps (δ {policy}), log {run / 'train.log'}", flush=True)
    _wait_with_progress({name: proc for name, (proc, _) in procs.items()}, args)
    failed = []
    for name, (proc, log) in procs.items():
        rc = proc.wait()
        log.close()
        if rc != 0 or _trained_to(args.out / name) < args.steps:
            failed.append(
                f"{name} (exit status {rc}, step {_trained_to(args.out / name)}; see its train.log)"
            )
    if failed:  # a run stopped by a signal saved its checkpoint: running the demo again resumes it
        raise SystemExit("training failed: " + ", ".join(failed))
    if procs:
        print(f"trained {', '.join(procs)} in {time.perf_counter() - start:.0f} s", flush=True)


def _wait_with_progress(procs: dict[str, subprocess.Popen], args: argparse.Namespace) -> None:
    """Wait for the training processes, printing every run's latest logged step and loss twice a minute."""
    start = last = time.perf_counter()
    while any(proc.poll() is None for proc in procs.values()):
        time.sleep(1.0)
        if time.perf_counter() - last < PROGRESS_SECONDS:
            continue
        last = time.perf_counter()
        parts = []
        for name in procs:
            logged = _metrics(args.out / name)
            step = (
                f"step {logged[-1]['iteration']}/{args.steps}, loss {logged[-1]['loss']:.3f}"
                if logged
                else "starting"
            )
            parts.append(f"{name} {step}")
        print(f"  [{last - start:4.0f} s] " + " | ".join(parts), flush=True)


def evaluate_run(run: Path, policy: str, data: dict, args: argparse.Namespace) -> dict:
    """Accuracy at every multiple, with the δ the policy chose and the prompt lengths."""
    from megatron_v2pe.eval import mmniah
    from megatron_v2pe.eval.generation import prompt_positions
    from megatron_v2pe.eval.loading import load_for_evaluation
    from megatron_v2pe.v2pe.positions import parse_delta_policy

    model, tokenizer, _ = load_for_evaluation(
        run / "checkpoints", tokenizer=data["tokenizer"], attention_backend="reference"
    )
    parsed = parse_delta_policy(policy)
    rows = {}
    for m in MULTIPLES:
        records = mmniah.read_records([str(data[f"{m}x"])])
        budget = WIDE * data["images"][f"{m}x"]  # WIDE grid tiles per image (tiling budget per sample)
        builder = mmniah.prompt_builder(
            tokenizer, TOKENS_PER_TILE, TINY_TILE, max_tiles=budget, template=model.vlm_config.template
        )
        start = time.perf_counter()
        results = mmniah.evaluate_records(
            model,
            tokenizer,
            records,
            delta_policy=policy,
            teacher_forced=True,
            length_source="tokens",  # the demo's samples record no context length
            batch_size=1,  # the reference attention masks a whole pack: one prompt per forward is cheapest
            max_tiles=budget,
        )
        built = mmniah.build_prompt(builder, records[0])
        answer = len(built.answer_tokens)
        (positions,), (deltas,) = prompt_positions(model, [built.to_prompt()], parsed, reserve=answer)
        rows[f"{m}x"] = {
            "multiple": m,
            "accuracy": float(np.mean([r.score for r in results])),
            "samples": len(results),
            "prompt_tokens": int(np.mean([r.prompt_tokens for r in results])),
            "delta": float(np.min(deltas)) if deltas.size else 1.0,
            "last_position": float(positions[-1] + answer),  # of the last answer token
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(f"  {run.name} {m}x: {rows[f'{m}x']}", flush=True)
    return rows


def _metrics(run: Path) -> list[dict]:
    """The run's logged steps (logging.metrics_file), oldest first."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _losses(run: Path) -> list[float]:
    return [record["loss"] for record in _metrics(run)]


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    xs = list(MULTIPLES)
    for name, label in (("v2pe", "V2PE (δ auto)"), ("baseline", "baseline (δ = 1)")):
        ax.plot(xs, [summary["models"][name][f"{m}x"]["accuracy"] for m in xs], marker="o", label=label)
    ax.axhline(1 / len(_ANIMALS), color="gray", linestyle=":", label=f"chance (1/{len(_ANIMALS)})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{m}x\n{summary['models']['v2pe'][f'{m}x']['prompt_tokens']} tok" for m in xs])
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("context length (multiple of the training length)")
    ax.set_ylabel("retrieval accuracy (teacher-forced)")
    ax.set_title(f"tiny VLM, {summary['steps']} steps at ≤{summary['trained_window']} tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(summary: dict) -> str:
    lines = [f"{'length':>8} {'tokens':>7} {'V2PE':>6} {'δ auto':>8} {'baseline':>9}"]
    for m in MULTIPLES:
        v, b = summary["models"]["v2pe"][f"{m}x"], summary["models"]["baseline"][f"{m}x"]
        delta = f"1/{round(1 / v['delta'])}" if v["delta"] < 1 else "1"
        lines.append(
            f"{m:>7}x {v['prompt_tokens']:>7} {v['accuracy']:>6.2f} {delta:>8} {b['accuracy']:>9.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/v2pe_demo"))
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--train-samples", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=64, help="per length")
    parser.add_argument("--train-images", type=int, default=16, help="images per training sample (most)")
    parser.add_argument("--min-train-images", type=int, default=1, help="images per training sample (least)")
    parser.add_argument("--batch", type=int, default=4, help="global batch size (samples packed per step)")
    parser.add_argument("--lr", type=float, default=2.0e-3)
    parser.add_argument("--rotary-base", type=float, default=5000.0, help="RoPE base of both models")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("overrides", nargs="*", help="more section.key=value for both training runs")
    args = parser.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    data = synthesise(
        args.out / "data",
        args.train_samples,
        args.eval_samples,
        args.train_images,
        args.min_train_images,
        args.seed,
    )
    window = data["window"]
    args.seq_len = window + window % 2  # a multiple of the padding multiple
    runs = {"v2pe": ("random", f"auto:{window}"), "baseline": ("none", "none")}
    train_runs({name: train_policy for name, (train_policy, _) in runs.items()}, data, args)
    models = {}
    for name, (_, eval_policy) in runs.items():
        models[name] = evaluate_run(args.out / name, eval_policy, data, args)
    summary = {
        "task": "retrieval-text: a one-word needle first, scene images as the haystack, then the question",
        "rotary_base": args.rotary_base,
        "steps": args.steps,
        "trained_window": window,
        "train_images": args.train_images,
        "eval_images": data["images"],
        "eval_policies": {name: p for name, (_, p) in runs.items()},
        "train_policies": {name: p for name, (p, _) in runs.items()},
        "models": models,
        "losses": {name: _losses(args.out / name) for name in runs},
        "seconds": round(time.perf_counter() - start, 1),
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, args.out / "accuracy_vs_length.png")
    print(table(summary))
    print(f"wrote {args.out}/results.json and accuracy_vs_length.png ({summary['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
