"""Megatron-Core on a CPU-only host.

Megatron-Core assumes a GPU in a few places: it asks for ``torch.cuda.current_device()``, places small
bookkeeping tensors on ``"cuda"``, pins host memory, and keeps its RNG tracker in CUDA generator states.
On a host without CUDA those calls raise. ``install()`` redirects them to the CPU so that the same
Megatron-Core code paths (tensor, pipeline, context and data parallel over gloo) run unchanged in tests
and in the CPU demo. Without CUDA there is no Transformer Engine or apex either, so Megatron-Core falls
back to ``torch.optim.AdamW``; where that fallback breaks checkpointing of the distributed optimizer,
it is mended here too. It does nothing when CUDA is available, and nothing else in the code base needs
to know about it: ``megatron_v2pe.parallel.initialize`` calls it.
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


def _patch_distributed_optimizer_torch_adam() -> None:
    """Checkpointing Megatron's distributed optimizer around torch's AdamW (its fallback without TE or
    apex). torch keeps ``step`` as a per-parameter state tensor, while TE's and apex's FusedAdam keep it
    in the param group, and Megatron's torch-fallback code mishandles it:

    - ``state_dict`` reads ``step`` from the per-parameter states, which torch creates lazily at the
      first ``step()``: before it (a fresh optimizer about to load a checkpoint) the read fails.
      Create the states as torch's AdamW does at its first step (step 0, zero moments).
    - loading leaves ``step`` out of the checkpointed parameter state and restores it from the param
      groups, as one tensor shared by every parameter (AdamW then increments it once per parameter,
      so a resumed run diverges), and then copies every state tensor from the checkpoint, ``step``
      included: KeyError 'step'. Give each parameter its own copy of the restored ``step`` and copy
      only what the checkpoint holds.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    state_dict = DistributedOptimizer.state_dict
    set_states = DistributedOptimizer._set_main_param_and_optimizer_states

    def state_dict_with_created_states(self):
        if isinstance(self.optimizer, torch.optim.Adam | torch.optim.AdamW):
            for group in self.optimizer.param_groups:
                for param in group["params"]:
                    if not self.optimizer.state[param]:
                        self.optimizer.state[param] = {
                            "step": torch.tensor(0.0),
                            "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                            "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                        }
        return state_dict(self)

    def set_checkpointed_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()  # one tensor per parameter, as torch keeps it
            tensors = {"step": state["step"], **tensors}  # the checkpoint has none: keep the restored one
        set_states(self, model_param, tensors)

    DistributedOptimizer.state_dict = state_dict_with_created_states
    DistributedOptimizer._set_main_param_and_optimizer_states = set_checkpointed_states


def install() -> bool:
    """Make Megatron-Core usable without CUDA; returns True when the CPU runtime is active."""
    global _installed
    if torch.cuda.is_available():
        return False
    with _lock:
        if not _installed:
            _patch_torch_cuda()
            _patch_megatron_rng()
            _patch_distributed_optimizer_torch_adam()
            _CudaToCpu().__enter__()
            _installed = True
    return True
