"""Megatron-Core on a CPU-only host.

Megatron-Core assumes a GPU in a few places: it asks for ``torch.cuda.current_device()``, places small
bookkeeping tensors on ``"cuda"``, pins host memory, and keeps its RNG tracker in CUDA generator states.
On a host without CUDA those calls raise. ``install()`` redirects them to the CPU so that the same
Megatron-Core code paths (tensor, pipeline, context and data parallel over gloo) run unchanged in tests
and in the CPU demo. It does nothing when CUDA is available, and nothing else in the code base needs to
know about it: ``megatron_v2pe.parallel.initialize`` calls it.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import torch
from torch.overrides import TorchFunctionMode

_lock = threading.Lock()
_installed = False
_CPU = torch.device("cpu")


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    """Places every tensor that code asks to put on a CUDA device on the CPU instead, and names CPU
    tensor types as their CUDA counterparts (Megatron's optimizers recognise parameter precision by
    ``tensor.type() == 'torch.cuda.FloatTensor'``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        kwargs.pop("pin_memory", None)
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to:
            args = tuple(_CPU if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


def _cpu_rng_state(*_args, **_kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(state: torch.Tensor, *_args, **_kwargs) -> None:
    torch.set_rng_state(state)


class _HostStream:
    """Stands in for a CUDA stream: on the CPU every operation is already ordered."""

    def wait_event(self, _event) -> None:
        pass

    def wait_stream(self, _stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: _CPU
    cuda.set_device = lambda *_a, **_k: None
    cuda.synchronize = lambda *_a, **_k: None
    cuda.get_rng_state = _cpu_rng_state
    cuda.set_rng_state = _set_cpu_rng_state
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)
    cuda.manual_seed_all = lambda seed: None  # torch.manual_seed has already seeded the CPU
    cuda.max_memory_allocated = lambda *_a, **_k: 0
    cuda.memory_allocated = lambda *_a, **_k: 0
    cuda.stream = lambda *_a, **_k: contextlib.nullcontext()
    cuda.current_stream = lambda *_a, **_k: _HostStream()
    cuda.empty_cache = lambda: None


def _patch_megatron_rng() -> None:
    """Megatron's RNG tracker forks 'device' generator states; on the CPU that is the CPU generator."""
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = _cpu_rng_state
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state
    # The tracker warns when the CPU state changes inside a fork: here that is the forked state itself.
    logging.getLogger(mcore_random.__name__).addFilter(
        lambda record: "CPU RNG state changed" not in record.getMessage()
    )


def install() -> bool:
    """Make Megatron-Core usable without CUDA; returns True when the CPU runtime is active."""
    global _installed
    if torch.cuda.is_available():
        return False
    with _lock:
        if not _installed:
            _patch_torch_cuda()
            _patch_megatron_rng()
            _CudaToCpu().__enter__()
            _installed = True
    return True
