"""Train an InternVL2-style VLM with V2PE: one CPU process or many GPUs under torchrun / Slurm.

    v2pe-train --config examples/configs/tiny_cpu.yaml training.train_iters=50 checkpoint.save=runs/x
    torchrun --nproc-per-node 8 -m megatron_v2pe.training.train --config examples/configs/internvl2_2b_32k.yaml

The configuration (training/config.py) is validated before any process group, model or data is set up.
Each step runs one global batch (micro-batches x data-parallel ranks, one packed sequence per micro-batch)
through ``training.step.forward_backward`` and Megatron-Core's (distributed) optimizer, with the LR
schedule stepped once per iteration. SIGTERM or SIGUSR1 (Slurm preemption) ends the run after the current
step with a checkpoint and exit code 0, so that the job can be requeued and resumes exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer.module import Float16Module

from megatron_v2pe.batch import PackedBatch
from megatron_v2pe.checkpoint.errors import CheckpointError, CheckpointSaveError
from megatron_v2pe.checkpoint.layout import ResumePoint
from megatron_v2pe.checkpoint.model_config import write_model_config
from megatron_v2pe.checkpoint.model_only import load_model_weights
from megatron_v2pe.checkpoint.train_state import Checkpointer
from megatron_v2pe.data.loader import DataStateMismatch, PackedBatchLoader
from megatron_v2pe.data.tokenizer import Tokenizer, load_tokenizer
from megatron_v2pe.errors import UsageError, is_lead_rank, run_command
from megatron_v2pe.model.fusions import Fusions, vision_recompute_fields
from megatron_v2pe.model.presets import VLMConfig, language_transformer_config, vision_transformer_config
from megatron_v2pe.model.vlm import InternVLModel, model_chunks
from megatron_v2pe.parallel import destroy_model_parallel, initialize
from megatron_v2pe.parallel.context_parallel import shard_batch
from megatron_v2pe.parallel.fp8 import fp8_transformer_overrides
from megatron_v2pe.parallel.runtime import current_device
from megatron_v2pe.training.config import (
    ConfigError,
    TrainConfig,
    load_config,
    model_config,
    validate,
    validate_architecture,
    validate_samples,
)
from megatron_v2pe.training.optimizer import build_optimizer
from megatron_v2pe.training.progress import (
    Progress,
    StepRecord,
    StepTimer,
    global_batch_counts,
    global_data_problems,
)
from megatron_v2pe.training.step import forward_backward

logger = logging.getLogger("megatron_v2pe.training")


# --------------------------------------------------------------------------------------------------
# Building blocks


def params_dtype(config: TrainConfig) -> torch.dtype:
    """bf16 where asked and a GPU exists; fp32 on a CPU-only host."""
    return torch.bfloat16 if config.training.bf16 and torch.cuda.is_available() else torch.float32


def build_model(config: TrainConfig, vlm: VLMConfig) -> list[InternVLModel]:
    """This rank's model chunks (one per virtual pipeline stage), frozen parts already frozen."""
    p, m = config.parallel, config.model
    shared = {
        "tensor_model_parallel_size": p.tensor_model_parallel_size,
        "params_dtype": params_dtype(config),
        **m.recompute_fields(),
    }
    language = language_transformer_config(
        vlm,
        **shared,
        # FP8 for the language model only: FP8 GEMMs need token counts in multiples of 16, and a tile
        # is 1,025 ViT tokens (1,024 patches and the class token).
        **fp8_transformer_overrides(config.training.fp8),
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        sequence_parallel=p.sequence_parallel,
        calculate_per_token_loss=True,
        # Packs differ in length; the pipeline schedules need one shape, so packs are padded to
        # max_seq_len there (PackedBatch.padded_to) and may keep their own length without pipelining.
        variable_seq_lengths=p.pipeline_model_parallel_size == 1,
        # TransformerConfig rejects variable lengths with the default MoE dispatcher even without
        # experts; the dispatcher is unused here.
        moe_token_dispatcher_type="alltoall",
        bias_activation_fusion=m.fused_swiglu,
    )
    vision = vision_transformer_config(vlm, **vision_recompute_fields(shared))
    fusions = Fusions(loss_chunk_tokens=m.loss_chunk_tokens, compiled_norm=m.compiled_norm)
    chunks = model_chunks(vlm, language, vision, m.attention_backend, fusions)
    for chunk in chunks:
        chunk.freeze(vision=m.freeze_vision, projector=m.freeze_projector, language=m.freeze_language)
    return [chunk.to(current_device()) for chunk in chunks]


def wrap_model(config: TrainConfig, chunks: list[InternVLModel]) -> list[DistributedDataParallel]:
    """Megatron DDP (bf16 chunks inside Float16Module, which returns fp32 losses)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=config.parallel.use_distributed_optimizer,
    )
    wrapped = []
    for chunk in chunks:
        inner = Float16Module(chunk.config, chunk) if params_dtype(config) == torch.bfloat16 else chunk
        wrapped.append(DistributedDataParallel(chunk.config, ddp_config, inner))
    return wrapped


@dataclass
class RunResult:
    iteration: int
    stopped_by_signal: bool


class ExitSignals:
    """Remembers SIGTERM / SIGUSR1; ``received`` agrees across ranks, so all of them stop together."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, enabled: bool):
        self.signum: int | None = None
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS} if enabled else {}

    def _handle(self, signum, _frame) -> None:
        self.signum = signum

    def received(self) -> bool:
        flag = torch.tensor([0 if self.signum is None else 1], device=current_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# --------------------------------------------------------------------------------------------------
# The run


def preflight(config: TrainConfig) -> tuple[VLMConfig, Tokenizer]:
    """(architecture, tokenizer), after every check that needs no process group, model or data
    loader: the configuration, the tokenizer, the model against the layout, the first samples."""
    validate(config, int(os.environ.get("WORLD_SIZE", "1")))
    try:
        tokenizer = load_tokenizer(config.data.tokenizer)
    except UsageError as err:
        raise ConfigError(f"data.tokenizer: {err}") from err
    try:
        vlm = model_config(config, tokenizer)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from err
    validate_architecture(config, vlm)
    validate_samples(config, config.data_config(), vlm, tokenizer)
    return vlm, tokenizer


def train(config: TrainConfig) -> RunResult:
    """Validate, set up, resume if a checkpoint exists, and train to ``training.train_iters``."""
    vlm, tokenizer = preflight(config)
    p, t = config.parallel, config.training
    initialize(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        seed=t.seed,
    )
    try:
        return _train(config, vlm, tokenizer)
    finally:
        destroy_model_parallel()


def _train(config: TrainConfig, vlm: VLMConfig, tokenizer: Tokenizer) -> RunResult:
    c = config.checkpoint
    checkpointer = Checkpointer(
        c.save, keep_last=c.keep_last, async_save=c.async_save, optimizer_sharding=c.optimizer_sharding
    )
    try:
        point = checkpointer.find(c.load or c.save, vlm)
        loader = PackedBatchLoader(
            config.data_config(), vlm, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        )
        if point is not None:
            _restore_data_stream(config, loader, checkpointer.data_state(point))
        return _train_loop(config, vlm, tokenizer, checkpointer, point, loader)
    finally:
        checkpointer.close()


def _restore_data_stream(config: TrainConfig, loader: PackedBatchLoader, state: dict | None) -> None:
    if state is None:
        return
    try:
        loader.load_state_dict(state)
    except DataStateMismatch as err:
        if not config.checkpoint.restart_data_stream:
            raise CheckpointError(
                f"cannot continue the data stream: {err}; or set checkpoint.restart_data_stream=true to "
                "start it afresh (samples already seen are seen again)"
            ) from err
        logger.warning("%s: the data stream starts afresh (checkpoint.restart_data_stream)", err)


def _train_loop(
    config: TrainConfig,
    vlm: VLMConfig,
    tokenizer: Tokenizer,
    checkpointer: Checkpointer,
    point: ResumePoint | None,
    loader: PackedBatchLoader,
) -> RunResult:
    t, c = config.training, config.checkpoint
    chunks = build_model(config, vlm)
    wrapped = wrap_model(config, chunks)
    optimizer, scheduler = build_optimizer(
        config.optimizer,
        wrapped,
        train_iters=t.train_iters,
        params_dtype=params_dtype(config),
        use_distributed_optimizer=config.parallel.use_distributed_optimizer,
        override_scheduler=c.override_opt_param_scheduler,
    )
    if point is not None:
        checkpointer.load(point, chunks, optimizer, scheduler, t.seed)
    elif c.pretrained_checkpoint:
        load_model_weights(c.pretrained_checkpoint, chunks, optimizer)
    iteration = point.iteration if point else 0
    if c.save and dist.get_rank() == 0:  # beside the checkpoints: evaluation and conversion read it
        write_model_config(vlm, Path(c.save))

    packs = iter(loader)
    micro_batches = config.num_micro_batches(dist.get_world_size())
    progress = Progress(config.logging, t.train_iters, iteration, config.to_dict())
    signals = ExitSignals(t.exit_signal_handler)
    last_saved = iteration if point else None
    stopped = False
    try:
        while iteration < t.train_iters:
            with StepTimer() as timer:
                batch = [next(packs) for _ in range(micro_batches)]
                counts = global_batch_counts(vlm, batch)
                loss, grad_norm = _step(config, wrapped, optimizer, _prepare(config, vlm, tokenizer, batch))
                scheduler.step(1)
            iteration += 1
            progress.record(
                StepRecord(
                    iteration, loss, optimizer.param_groups[0]["lr"], grad_norm, timer.seconds, counts,
                    global_data_problems(loader.stats()),
                )
            )
            checkpointer.finalize()
            stopped = signals.received()
            if c.save and (
                stopped
                or iteration == t.train_iters
                or (c.save_interval and iteration % c.save_interval == 0)
            ):
                checkpointer.save(
                    iteration, chunks, optimizer, scheduler, loader.state_dict(), {"config": config.to_dict()}
                )
                last_saved = iteration
            if stopped:
                progress.emit(
                    f"stopping after iteration {iteration} on signal {signals.signum or 'of another rank'}"
                    + (f"; checkpoint {last_saved} saved" if c.save else "; no checkpoint.save set")
                )
                break
    finally:
        packs.close()  # data-loader workers ignore SIGTERM: let them go before the interpreter exits
        signals.restore()
        checkpointer.finalize(blocking=True)
        progress.close()
    return RunResult(iteration, stopped)


def _prepare(
    config: TrainConfig, vlm: VLMConfig, tokenizer: Tokenizer, packs: list[PackedBatch]
) -> list[PackedBatch]:
    """This rank's micro-batches: padded to one length under pipelining, then sharded for CP."""
    p = config.parallel
    if p.pipeline_model_parallel_size > 1:
        packs = [b.padded_to(config.data.max_seq_len, tokenizer.pad_id) for b in packs]
    cp = p.context_parallel_size
    return (
        [shard_batch(b, cp, ps.get_context_parallel_rank(), vlm.img_context_token_id) for b in packs]
        if cp > 1
        else packs
    )


def _step(
    config: TrainConfig, wrapped: list, optimizer, batches: list[PackedBatch]
) -> tuple[float, float | None]:
    for model in wrapped:
        model.zero_grad_buffer()
    optimizer.zero_grad()
    result = forward_backward(wrapped, batches)
    _, grad_norm, _ = optimizer.step()
    return result.loss, grad_norm


# --------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(
        prog="v2pe-train",
        description=__doc__.split("\n\n")[0],
        epilog="overrides: section.key=value, e.g. training.train_iters=10 parallel.tensor_model_parallel_size=2",
    )
    parser.add_argument("--config", help="YAML file (see examples/configs/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    path, overrides = parse_args(argv)
    try:
        return run_command("v2pe-train", lambda: _run(load_config(path, overrides)))
    except CheckpointSaveError as err:  # a fault, but one with a known cause: one line, not a traceback
        if is_lead_rank():
            print(f"v2pe-train: {err}", file=sys.stderr, flush=True)
        return 1


def _run(config: TrainConfig) -> int:
    result = train(config)
    if dist.is_initialized():
        dist.destroy_process_group()
    logger.info(
        "finished at iteration %d%s", result.iteration, " (signal)" if result.stopped_by_signal else ""
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
