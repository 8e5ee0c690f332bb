"""Faster paths of the language model that compute what the plain ones do (each tested against them).

All are off by default: which of them pays off, and at which chunk size, is measured on the GPU
(benchmarks/gpu/bench_step.py). The fused SwiGLU is Megatron-Core's own (TransformerConfig's
``bias_activation_fusion``) and set there; the Transformer Engine spec fuses its norms itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Fusions:
    loss_chunk_tokens: Optional[int] = None  # chunked cross entropy, tokens per chunk; None: full logits
    compiled_norm: bool = False  # torch.compile'd RMSNorm in the local (non-TE) layer specs

    def __post_init__(self):
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens < 1:
            raise ValueError(f"loss_chunk_tokens must be >= 1 or None, got {self.loss_chunk_tokens}")


def vision_recompute_fields(fields: dict) -> dict:
    """The language model's recompute fields as the vision tower takes them: selective recompute there
    covers core attention only (Megatron-Core's MLP recompute around InternViT's layer-scaled residual
    branches never finished a step of the tiny model on CPU, its memory growing without bound)."""
    if fields.get("recompute_granularity") != "selective":
        return fields
    return {**fields, "recompute_modules": ["core_attn"]}
