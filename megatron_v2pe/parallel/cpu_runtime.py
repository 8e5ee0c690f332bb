"""Megatron-Core on a CPU-only host, for as long as the parallel runtime is up.

Megatron-Core assumes a GPU in a few places: it asks for ``torch.cuda.current_device()``, places small
bookkeeping tensors on ``"cuda"``, pins host memory, and keeps its RNG tracker in CUDA generator states.
On a host without CUDA those calls raise. ``enter()`` redirects them to the CPU so that the same
Megatron-Core code paths (tensor, pipeline, context and data parallel over gloo) run unchanged in tests
and in the CPU demo; ``exit()`` puts everything back, so that after it ``device="cuda"`` fails and CPU
tensors report CPU types again. Both do nothing when CUDA is available. Only
``megatron_v2pe.parallel.initialize`` and ``destroy_model_parallel`` call them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode

_lock = threading.Lock()
_CPU = torch.device("cpu")
_active: list[tuple[TorchFunctionMode, Callable[[], None]]] = []  # the entered mode and how to undo the rest


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


def _patch(owner, replacements: dict) -> Callable[[], None]:
    """Replace attributes of ``owner``; returns the function that puts the originals back."""
    originals = {name: getattr(owner, name) for name in replacements}
    for name, value in replacements.items():
        setattr(owner, name, value)

    def restore() -> None:
        for name, value in originals.items():
            setattr(owner, name, value)

    return restore


def _patch_torch_cuda() -> Callable[[], None]:
    return _patch(torch.cuda, {
        "current_device": lambda: _CPU,
        "set_device": lambda *_a, **_k: None,
        "synchronize": lambda *_a, **_k: None,
        "get_rng_state": _cpu_rng_state,
        "set_rng_state": _set_cpu_rng_state,
        "manual_seed": lambda seed: torch.default_generator.manual_seed(seed),
        "manual_seed_all": lambda seed: None,  # torch.manual_seed has already seeded the CPU
        "max_memory_allocated": lambda *_a, **_k: 0,
        "memory_allocated": lambda *_a, **_k: 0,
        "stream": lambda *_a, **_k: contextlib.nullcontext(),
        "current_stream": lambda *_a, **_k: _HostStream(),
        "empty_cache": lambda: None,
    })


def _cpu_rng_warning(record: logging.LogRecord) -> bool:
    return "CPU RNG state changed" not in record.getMessage()


def _patch_megatron_rng() -> Callable[[], None]:
    """Megatron's RNG tracker forks 'device' generator states; on the CPU that is the CPU generator."""
    from megatron.core.tensor_parallel import random as mcore_random

    restore = _patch(mcore_random, {"_get_cuda_rng_state": _cpu_rng_state,
                                    "_set_cuda_rng_state": _set_cpu_rng_state})
    # The tracker warns when the CPU state changes inside a fork: here that is the forked state itself.
    logger = logging.getLogger(mcore_random.__name__)
    logger.addFilter(_cpu_rng_warning)

    def undo() -> None:
        logger.removeFilter(_cpu_rng_warning)
        restore()

    return undo


def enter() -> bool:
    """Make Megatron-Core usable without CUDA until ``exit()``; returns True when the CPU runtime is
    active. Entering again while active changes nothing."""
    if torch.cuda.is_available():
        return False
    with _lock:
        if not _active:
            undo_cuda, undo_rng = _patch_torch_cuda(), _patch_megatron_rng()
            mode = _CudaToCpu()
            mode.__enter__()
            _active.append((mode, lambda: (undo_rng(), undo_cuda())))
    return True


def exit() -> None:
    """Undo ``enter()``: torch.cuda and Megatron's RNG hooks are the originals again."""
    with _lock:
        while _active:
            mode, undo = _active.pop()
            mode.__exit__(None, None, None)
            undo()
