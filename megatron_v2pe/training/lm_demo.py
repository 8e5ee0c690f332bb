"""CPU demo: train a tiny InternLM2-style V2PE language model on synthetic recall across images.

    python -m megatron_v2pe.training.lm_demo [--steps 300] [--output history.json]

One process, packed THD micro-batches, δ drawn per image (`--delta-policy random`, as in the paper's
training). The loss is the answer tokens' cross-entropy (see `megatron_v2pe.data.synthetic`); at the
end the model answers held-out samples and the recall accuracy is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import torch
from tqdm import tqdm

from megatron_v2pe.data.synthetic import RecallTask, SyntheticRecallBatch, recall_batches
from megatron_v2pe.model.config import internlm2_transformer_config
from megatron_v2pe.model.language_model import V2PEGPTModel
from megatron_v2pe.model.layer_specs import v2pe_layer_spec
from megatron_v2pe.parallel import initialize
from megatron_v2pe.v2pe.positions import DeltaPolicy, parse_delta_policy

ROTARY_BASE = 1e6
EVAL_SEED_OFFSET = 1_000_003  # held-out samples come from a different stream than training


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=128, help="longest sample (sub-sample), in tokens")
    parser.add_argument("--micro-batch-tokens", type=int, default=1024, help="tokens per packed micro-batch")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of --steps")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--delta-policy", default="random", help="none | fixed:<δ> | random | auto:<window>")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4, help="query heads; key/value heads are half as many")
    parser.add_argument("--log-interval", type=int, default=25)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--output", default=None, help="write the loss history and results here (JSON)")
    args = parser.parse_args(argv)
    if args.heads < 2 or args.heads % 2:
        parser.error("--heads must be even: the model uses grouped-query attention with heads / 2 groups")
    if args.warmup_steps is None:
        args.warmup_steps = max(1, args.steps // 10)
    return args


def build_model(args: argparse.Namespace, vocab_size: int) -> V2PEGPTModel:
    """InternLM2 blocks (RMSNorm, SwiGLU with InternLM2's 4x FFN, GQA, no biases), untied embeddings."""
    config = internlm2_transformer_config(
        args.layers, args.hidden, args.heads, args.heads // 2, 4 * args.hidden, use_cpu_initialization=True
    )
    return V2PEGPTModel(
        config,
        v2pe_layer_spec("reference"),
        vocab_size,
        args.micro_batch_tokens,
        rotary_base=ROTARY_BASE,
        share_embeddings_and_output_weights=False,
    )


def lr_factor(step: int, warmup_steps: int, total_steps: int, final_factor: float = 0.1) -> float:
    """Linear warm-up to 1, then cosine decay to `final_factor` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def forward(model: V2PEGPTModel, batch: SyntheticRecallBatch, with_labels: bool = True) -> torch.Tensor:
    """Per-token cross-entropy [1, t] with labels, else logits [1, t, vocab]."""
    return model(
        batch.tokens,
        None,
        positions=batch.positions,
        labels=batch.labels if with_labels else None,
        packed_seq_params=batch.packed_seq_params(),
    )


def weighted_loss(per_token: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ w·CE / Σ w: only the answers count."""
    return (per_token * weights).sum() / weights.sum().clamp(min=1.0)


def format_delta(delta: float) -> str:
    return str(Fraction(delta).limit_denominator(1 << 16))


class IntervalStats:
    """Accumulates what one log line reports: loss, throughput and the δ of the images seen."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.deltas: list[np.ndarray] = []
        self.tokens = 0
        self.start = time.perf_counter()

    def add(self, loss: float, batch: SyntheticRecallBatch) -> None:
        self.losses.append(loss)
        self.deltas.append(batch.deltas)
        self.tokens += batch.num_tokens

    def summary(self, step: int, lr: float, grad_norm: float) -> dict:
        deltas = np.concatenate(self.deltas)
        return {
            "step": step,
            "loss": float(np.mean(self.losses)),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": self.tokens / (time.perf_counter() - self.start),
            "delta_mean": float(deltas.mean()),
            "delta_min": float(deltas.min()),
        }


def log_line(record: dict) -> str:
    return (
        f"step {record['step']:5d} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
        f"grad norm {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tokens/s | "
        f"δ mean {record['delta_mean']:.3f} min {format_delta(record['delta_min'])}"
    )


def train(
    model: V2PEGPTModel, task: RecallTask, policy: DeltaPolicy, args: argparse.Namespace
) -> tuple[list[float], list[dict]]:
    """AdamW with warm-up and cosine decay; returns the loss of every step and the log records."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, args.warmup_steps, args.steps)
    )
    batches = recall_batches(task, args.micro_batch_tokens, policy, args.seed)
    losses, records, stats = [], [], IntervalStats()
    model.train()
    for step in tqdm(range(1, args.steps + 1), desc="training", unit="step"):
        batch = next(batches)
        loss = weighted_loss(forward(model, batch), batch.loss_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        lr = schedule.get_last_lr()[0]
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        stats.add(losses[-1], batch)
        if step % args.log_interval == 0 or step == args.steps:
            records.append(stats.summary(step, lr, grad_norm))
            tqdm.write(log_line(records[-1]))
            stats = IntervalStats()
    return losses, records


@torch.no_grad()
def recall_accuracy(
    model: V2PEGPTModel, task: RecallTask, policy: DeltaPolicy, args: argparse.Namespace
) -> tuple[float, int]:
    """(fraction of answers whose argmax is the right value, number of answers) on unseen samples."""
    model.eval()
    batches = recall_batches(task, args.micro_batch_tokens, policy, args.seed + EVAL_SEED_OFFSET)
    correct = total = 0
    for _ in range(args.eval_batches):
        batch = next(batches)
        answers = batch.loss_weights[0] > 0
        predicted = forward(model, batch, with_labels=False)[0].argmax(dim=-1)
        correct += int((predicted[answers] == batch.labels[0][answers]).sum())
        total += int(answers.sum())
    return correct / total, total


def check_single_process() -> None:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        raise SystemExit(
            f"lm_demo runs in one process (WORLD_SIZE is {world_size}); start it with python, not torchrun"
        )


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    check_single_process()
    initialize(seed=args.seed)
    task = RecallTask(max_sample_tokens=args.seq_len)
    policy = parse_delta_policy(args.delta_policy)
    model = build_model(args, task.vocab_size)
    num_params = sum(p.numel() for p in model.parameters())
    print(
        f"V2PE LM: {args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.heads // 2} kv, "
        f"{num_params / 1e6:.2f}M parameters; vocab {task.vocab_size}; δ policy {policy.spec}; "
        f"{torch.get_num_threads()} threads"
    )
    start = time.perf_counter()
    losses, records = train(model, task, policy, args)
    train_seconds = time.perf_counter() - start
    accuracy, answers = recall_accuracy(model, task, policy, args)
    # A model that copies some value of its sample, without recall, gets 1 / pairs on average.
    copy_baseline = float(np.mean([1 / n for n in range(task.min_pairs, task.max_pairs + 1)]))
    print(
        f"trained {args.steps} steps in {train_seconds:.1f} s; final loss {np.mean(losses[-10:]):.4f} "
        f"(mean of the last 10 steps)\nrecall accuracy on {answers} held-out answers: {accuracy:.1%} "
        f"(chance {1 / task.num_values:.1%}; copying a random value of the sample {copy_baseline:.1%})"
    )
    result = {
        "args": vars(args),
        "loss": losses,
        "log": records,
        "train_seconds": train_seconds,
        "recall_accuracy": accuracy,
        "eval_answers": answers,
    }
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
