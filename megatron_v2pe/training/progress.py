"""Progress of a run: one line per log interval, TensorBoard events, optional W&B, a metrics file.

Throughput is accounted the Megatron way: tokens/s counts real (unpadded) tokens of the global batch;
model FLOPs come from ``model.flops.training_flops_per_pack`` (matmuls only, causal attention per
sub-sample, backward = 2x forward), divided by wall time and the number of processes; MFU divides that
by the stated per-GPU peak (H100 SXM dense bf16 by default, named in the first line).
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Self

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_v2pe.batch import PackedBatch
from megatron_v2pe.data.skips import DataEvent, SkipReason, SkipStats
from megatron_v2pe.model.flops import mfu, training_flops_per_pack
from megatron_v2pe.model.presets import VLMConfig
from megatron_v2pe.parallel.runtime import current_device

logger = logging.getLogger("megatron_v2pe.training")


@dataclass
class LoggingConfig:
    """The ``logging:`` section of the training YAML."""

    log_interval: int = 10
    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    metrics_file: str | None = None  # one JSON line per step (rank 0)
    progress_bar: bool | None = None  # None: on a CPU-only host
    peak_flops_per_gpu: float = 989e12  # MFU denominator: H100 SXM dense bf16


@dataclass
class BatchCounts:
    """What one global batch held, summed over the data-parallel ranks."""

    tokens: int  # real tokens
    flops: float  # model training FLOPs
    images: int
    delta_sum: float
    delta_min: float
    delta_max: float


def global_batch_counts(config: VLMConfig, packs: Sequence[PackedBatch]) -> BatchCounts:
    """Counts of this rank's packs (before context-parallel sharding), summed over data parallelism."""
    device = current_device()
    sums = torch.zeros(4, dtype=torch.float64)
    extremes = torch.tensor([-float("inf"), -float("inf")], dtype=torch.float64)  # -min δ, max δ
    for pack in packs:
        seqlens = (pack.cu_seqlens[1:] - pack.cu_seqlens[:-1]).tolist()
        deltas = pack.deltas.to(torch.float64)
        sums += torch.tensor(
            [
                sum(seqlens),
                training_flops_per_pack(config, seqlens, pack.pixel_values.shape[0]),
                deltas.numel(),
                deltas.sum().item(),
            ],
            dtype=torch.float64,
        )
        if deltas.numel():
            extremes = torch.maximum(extremes, torch.stack([-deltas.min(), deltas.max()]))
    sums, extremes = sums.to(device), extremes.to(device)
    group = ps.get_data_parallel_group()
    dist.all_reduce(sums, group=group)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    tokens, flops, images, delta_sum = sums.tolist()
    neg_min, maximum = extremes.tolist()
    return BatchCounts(int(tokens), flops, int(images), delta_sum, -neg_min, maximum)


_DATA_PROBLEMS = [*SkipReason, *DataEvent]


def global_data_problems(stats: SkipStats) -> dict[str, int]:
    """Samples skipped and data events so far, by reason, summed over the data-parallel ranks."""
    counts = {**stats.skipped, **stats.events}
    local = torch.tensor(
        [counts.get(k, 0) for k in _DATA_PROBLEMS], dtype=torch.int64, device=current_device()
    )
    dist.all_reduce(local, group=ps.get_data_parallel_group())
    return {str(k): n for k, n in zip(_DATA_PROBLEMS, local.tolist(), strict=True)}


def describe_data_problems(problems: dict[str, int]) -> str:
    """One line: ``skipped samples 3 (duplicate_key 2, too_long 1), data events: truncated 4``."""
    skipped = {k: n for k, n in problems.items() if k in set(SkipReason) and n}
    events = {k: n for k, n in problems.items() if k in set(DataEvent) and n}

    def listed(counts: dict[str, int]) -> str:
        return ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "none"

    return f"skipped samples {sum(skipped.values())} ({listed(skipped)}), data events: {listed(events)}"


@dataclass
class StepRecord:
    iteration: int
    loss: float
    lr: float
    grad_norm: float | None
    seconds: float
    counts: BatchCounts
    data_problems: dict[str, int]  # run totals by reason (SkipReason, DataEvent)


def peak_memory() -> tuple[float, str]:
    """Peak memory in GiB and what was measured."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "GPU"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "host RSS"  # KiB on Linux


class Progress:
    """Rank 0 reports; the other ranks only keep the iteration count."""

    def __init__(self, config: LoggingConfig, train_iters: int, start_iteration: int, run_config: dict):
        self.config = config
        self.train_iters = train_iters
        self.world_size = dist.get_world_size()
        self.active = dist.get_rank() == 0
        self.window: list[StepRecord] = []
        self.last: StepRecord | None = None
        self.tensorboard = self.wandb = self.bar = self.metrics = None
        if not self.active:
            return
        if config.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(config.tensorboard_dir)
        if config.wandb_project:
            self.wandb = _start_wandb(config.wandb_project, run_config)
        if config.metrics_file:
            Path(config.metrics_file).parent.mkdir(parents=True, exist_ok=True)
            self.metrics = open(config.metrics_file, "a")  # noqa: SIM115 (open for the run; close())
        show_bar = config.progress_bar if config.progress_bar is not None else not torch.cuda.is_available()
        if show_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=train_iters, initial=start_iteration, unit="step", dynamic_ncols=True)
        self.emit(
            f"MFU is model TFLOP/s per process over a peak of {config.peak_flops_per_gpu / 1e12:.0f} TFLOP/s"
        )

    def emit(self, line: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def record(self, step: StepRecord) -> None:
        if not self.active:
            return
        self.window.append(step)
        self.last = step
        if self.metrics is not None:
            self.metrics.write(json.dumps({**asdict(step), "counts": asdict(step.counts)}) + "\n")
            self.metrics.flush()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{step.loss:.4f}", refresh=False)
        if step.iteration % self.config.log_interval == 0 or step.iteration == self.train_iters:
            self._report()

    def _report(self) -> None:
        window, self.window = self.window, []
        last = window[-1]
        seconds = sum(s.seconds for s in window)
        tokens = sum(s.counts.tokens for s in window)
        flops_per_gpu = sum(s.counts.flops for s in window) / seconds / self.world_size
        images = sum(s.counts.images for s in window)
        loss = sum(s.loss for s in window) / len(window)
        memory, where = peak_memory()
        values = {
            "loss": loss,
            "lr": last.lr,
            "grad_norm": last.grad_norm,
            "tokens_per_second": tokens / seconds,
            "tflops_per_gpu": flops_per_gpu / 1e12,
            "mfu": mfu(flops_per_gpu, self.config.peak_flops_per_gpu),
            "delta_mean": sum(s.counts.delta_sum for s in window) / images if images else None,
            "delta_min": min(s.counts.delta_min for s in window),
            "delta_max": max(s.counts.delta_max for s in window),
            "peak_memory_gib": memory,
        }
        grad = "n/a" if last.grad_norm is None else f"{last.grad_norm:.3f}"
        delta = (
            f"δ mean {values['delta_mean']:.4g} [{values['delta_min']:.4g}, {values['delta_max']:.4g}] "
            f"over {images} images"
            if images
            else "δ: no images"
        )
        self.emit(
            f"iter {last.iteration:>6d}/{self.train_iters} | loss {loss:.4f} | lr {last.lr:.3e} | grad norm {grad} | "
            f"{values['tokens_per_second']:,.0f} tok/s | {values['tflops_per_gpu']:.3f} TFLOP/s/GPU | "
            f"MFU {100 * values['mfu']:.2f}% | {delta} | peak mem {memory:.2f} GiB ({where}) | "
            f"{describe_data_problems(last.data_problems)}"
        )
        scalars = {k: v for k, v in values.items() if v is not None and abs(v) != float("inf")}
        scalars.update({f"data/{k}": n for k, n in last.data_problems.items()})
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(f"train/{key}", value, last.iteration)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=last.iteration)

    def close(self) -> None:
        if self.window:
            self._report()
        if self.last is not None:
            self.emit(f"data totals: {describe_data_problems(self.last.data_problems)}")
        for sink in (self.bar, self.tensorboard, self.metrics):
            if sink is not None:
                sink.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(project: str, run_config: dict):
    try:
        import wandb
    except ImportError:
        logger.warning(
            "logging.wandb_project is set but wandb is not installed (pip install wandb): not logging to W&B"
        )
        return None
    return wandb.init(project=project, config=run_config)


class StepTimer:
    """Wall time of one step, with the device drained so the time is the step's."""

    def __enter__(self) -> Self:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
