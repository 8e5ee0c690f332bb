"""Choosing the core-attention backend: one interface, three implementations.

``te``: Transformer Engine (GPU; FP8, context parallel, packed THD) — production.
``torch``: PyTorch kernels for GPUs without TE (varlen flash attention / FlexAttention / SDPA).
``reference``: plain PyTorch with explicit masks; runs anywhere; the oracle for the others.
``auto`` picks the first that the machine supports, in that order.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from megatron_v2pe.optional_deps import is_available, require

AttentionBackend = Literal["auto", "te", "torch", "reference"]
ATTENTION_BACKENDS = get_args(AttentionBackend)
BACKENDS = ATTENTION_BACKENDS[1:]  # what "auto" chooses from


def resolve_attention_backend(backend: str = "auto") -> str:
    """The concrete backend for ``backend`` on this machine, with a clear error if it cannot run."""
    if backend == "auto":
        if torch.cuda.is_available():
            return "te" if is_available("transformer_engine") else "torch"
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose 'auto' or one of {BACKENDS}")
    if backend == "te":
        require("transformer_engine", "The Transformer Engine attention backend (backend='te')")
    return backend


def local_core_attention(backend: str) -> type:
    """The core-attention class for the non-TE backends (TE specs bring their own)."""
    if backend == "torch":
        from megatron_v2pe.parallel.torch_attention import TorchAttention

        return TorchAttention
    from megatron_v2pe.parallel.reference_attention import ReferenceAttention

    return ReferenceAttention
