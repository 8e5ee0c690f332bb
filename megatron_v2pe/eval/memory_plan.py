"""The memory a cached evaluation run needs, checked against the device before it starts.

Weights are already resident; the KV cache is exact (its buffers are allocated up front); activations
are an estimate for one chunk (the per-layer hidden states, the fp32 attention partials, the reference
backend's score blocks, the logits rows, the image tiles a chunk encodes). A run whose cache and
activations exceed the free memory is refused with the numbers instead of failing mid-way.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_v2pe.eval.kv_cache import decoder_attentions
from megatron_v2pe.parallel.cache_attention import KEY_BLOCK
from megatron_v2pe.parallel.reference_attention import ReferenceAttention
from megatron_v2pe.parallel.torch_attention import TorchAttention

log = logging.getLogger(__name__)
GIB = 2**30
_LARGEST_LOGGED = weakref.WeakKeyDictionary()  # model -> the largest plan (bytes) logged for it so far


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of one run on one rank; ``free`` is None where the device cannot say."""

    device: str
    weights: int
    kv_cache: int
    activations: int
    free: int | None
    chunk: int
    capacity: int

    def __str__(self) -> str:
        free = "unknown" if self.free is None else f"{self.free / GIB:.2f} GiB"
        return (
            f"memory plan on {self.device}: weights {self.weights / GIB:.2f} GiB (loaded) + KV cache "
            f"{self.kv_cache / GIB:.2f} GiB ({self.capacity:,} tokens per sequence) + activations "
            f"~{self.activations / GIB:.2f} GiB (chunks of {self.chunk:,} tokens); free {free}"
        )

    def check(self) -> None:
        """Refuse (ValueError with the numbers) a run that cannot fit."""
        needed = self.kv_cache + self.activations
        if self.free is not None and needed > self.free:
            raise ValueError(
                f"this run needs {needed / GIB:.2f} GiB beyond the weights but {self.free / GIB:.2f} GiB "
                f"are free ({self}): use a smaller prefill chunk, fewer prompts per batch, or context "
                "parallelism over more devices"
            )


def free_bytes(device: torch.device) -> int | None:
    """Memory available for new tensors: the GPU's free memory plus what PyTorch's allocator holds
    unused; on the CPU the kernel's MemAvailable (None if unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    meminfo = Path("/proc/meminfo")
    if device.type != "cpu" or not meminfo.exists():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def plan_memory(
    model, num_sequences: int, capacity: int, chunk: int, logit_rows: int, cp_size: int = 1
) -> MemoryPlan:
    """The plan of caching ``num_sequences`` sequences of ``capacity`` tokens (this rank's share), fed
    ``chunk`` tokens at a time, with ``logit_rows`` logits rows per forward at most."""
    weight = next(model.parameters())
    attention = decoder_attentions(model)[0]
    heads_kv, head_dim = attention.num_query_groups_per_partition, attention.hidden_size_per_attention_head
    heads = attention.num_attention_heads_per_partition
    size = weight.element_size()
    layers = len(decoder_attentions(model))
    kv = layers * 2 * num_sequences * heads_kv * capacity * head_dim * size
    config = model.config
    ffn = config.ffn_hidden_size // config.tensor_model_parallel_size
    hidden = chunk * (3 * config.hidden_size + (heads + 2 * heads_kv) * head_dim + 3 * ffn) * size
    partials = chunk * heads * head_dim * 4 * (2 + cp_size)
    core = attention.core_attention
    exact = isinstance(core, ReferenceAttention) and not isinstance(core, TorchAttention)
    scores = 5 * heads * chunk * KEY_BLOCK * 4 if exact else 0  # scores, mask, weights, fp32 keys
    logits = 2 * logit_rows * model.vlm_config.language.vocab_size * 4
    activations = hidden + partials + scores + logits + _vision_bytes(model, chunk, exact, size)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return MemoryPlan(str(weight.device), params, kv, activations, free_bytes(weight.device), chunk, capacity)


def _vision_bytes(model, chunk: int, exact: bool, size: int) -> int:
    """The vision tower's activations for the tiles one chunk may encode."""
    vision = getattr(model, "vision_model", None)
    if vision is None:
        return 0
    config = model.vlm_config
    tiles = -(-chunk // config.tokens_per_tile) + 1
    patches = (config.vision.image_size // config.vision.patch_size) ** 2 + 1
    per_tile = patches * config.vision.hidden_size * 12 * size
    if exact:
        per_tile += 2 * config.vision.num_attention_heads * patches * patches * 4
    return tiles * per_tile


def checked_plan(
    model, num_sequences: int, capacity: int, chunk: int, logit_rows: int, cp_size: int
) -> MemoryPlan:
    """``plan_memory``, refused when it cannot fit; logged when it is the largest so far for this model
    (an evaluation calls this once per batch: the log shows the peak, not one line per batch)."""
    plan = plan_memory(model, num_sequences, capacity, chunk, logit_rows, cp_size)
    needed = plan.kv_cache + plan.activations
    if needed > _LARGEST_LOGGED.get(model, -1):
        _LARGEST_LOGGED[model] = needed
        log.info("%s", plan)
    plan.check()
    return plan
