"""PyTorch LayerNorm / RMSNorm for the local (non-TE) layer specs, with sequence parallelism.

Megatron-Core's fallback ``WrappedTorchNorm`` refuses sequence parallelism. Under SP each rank
normalises its own slice of the sequence, so the weight gradients are partial sums; Megatron-Core
all-reduces them across the tensor-parallel group for every parameter marked ``sequence_parallel``,
which is all this wrapper adds.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

_NORMS = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}


class TorchNorm:
    """Builds ``torch.nn.LayerNorm`` or ``torch.nn.RMSNorm`` per ``config.normalization``."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused) -> torch.nn.Module:
        if config.normalization not in _NORMS:
            raise ValueError(f"normalization {config.normalization!r} is not one of {sorted(_NORMS)}")
        norm = _NORMS[config.normalization](hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
