"""Process-group set-up for Megatron-Core, on GPUs (NCCL) or on a CPU-only host (gloo)."""

from __future__ import annotations

import datetime
import os
import signal

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_v2pe.parallel import cpu_runtime, torch_adamw_checkpoint
from megatron_v2pe.parallel.config import ParallelConfig


def initialize(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    seed: int = 1234,
    timeout_minutes: int = 10,
) -> None:
    """Start torch.distributed (from torchrun's environment, or as a single process) and Megatron's
    model-parallel groups, and seed the model-parallel RNG tracker. On a host without CUDA the CPU
    runtime is active from here until ``destroy_model_parallel``."""
    torch_adamw_checkpoint.install()
    on_cpu = cpu_runtime.enter()
    if not dist.is_initialized():
        # torchrun and the Slurm launchers set MASTER_ADDR/MASTER_PORT; a lone process picks a free
        # port without writing it to the environment, where its own subprocesses would inherit it.
        alone = "MASTER_PORT" not in os.environ
        rank = int(os.environ.get("RANK", 0))
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        if not on_cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(
            backend="gloo" if on_cpu else "nccl",
            init_method=f"tcp://127.0.0.1:{_free_port()}" if alone else "env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    ParallelConfig(
        tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size=context_parallel_size
    ).check_world_size(dist.get_world_size())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def current_device() -> torch.device:
    """The device this rank computes on: its GPU, or the CPU on a CPU-only host."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
"""What Slurm (preemption, time limit, scancel) and a terminal send to every process of a job step."""


def ignore_exit_signals() -> None:
    """For helper processes (data-loader workers, checkpoint writers): the training process decides
    when to stop, and needs its helpers alive to finish the step and save."""
    for signum in EXIT_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def destroy_model_parallel() -> None:
    """Tear down Megatron's groups and leave the CPU runtime (keeps torch.distributed up, so another
    layout can follow)."""
    parallel_state.destroy_model_parallel()
    cpu_runtime.exit()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
