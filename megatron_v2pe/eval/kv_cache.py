"""A KV cache slotted into the core attention of every decoder layer, for incremental decoding.

Keys reach core attention already rotated by their V2PE angles (``V2PESelfAttention`` applies them
right after the QKV projection), so caching what core attention receives is enough: a new token is
rotated by its own position once, and every cached key keeps the angle of the position it was computed
at. The cache wraps whichever core attention the layer holds and restores it on exit, so the model's
modules and Megatron-Core's attention code stay untouched; Megatron's own inference contexts (static and
dynamic batching, paged memory) are not needed for this.

Every forward call is one packed THD batch with the same number of sub-samples: sub-sample j of each call
continues cached sequence j (the prompt of sample j first, then its generated tokens).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from torch import Tensor

from megatron_v2pe.parallel.reference_attention import padded_cu_seqlens, segment_ids


class CachedAttention(torch.nn.Module):
    """Core attention over the cached keys/values of each sequence plus the new ones (causal).

    Replaces one layer's core attention for the duration of ``kv_cache``; ``softmax_scale`` is the wrapped
    module's, so outputs match it to rounding.
    """

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.softmax_scale: float = inner.softmax_scale
        self.key: Tensor | None = None  # [n, hkv, d]
        self.value: Tensor | None = None
        self.sequence: Tensor | None = None  # [n] which sequence each cached token belongs to
        self.order: Tensor | None = None  # [n] arrival index: a query sees keys that came no later
        self.num_sequences: int | None = None

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> Tensor:
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            raise ValueError("the KV cache needs packed (THD) batches: pass packed_seq_params")
        if attention_bias is not None:
            raise NotImplementedError("the KV cache does not support attention_bias")
        cu = padded_cu_seqlens(packed_seq_params)
        new_sequence = segment_ids(cu, query.shape[0])
        if self.num_sequences is None:
            self.num_sequences = cu.numel() - 1
        elif cu.numel() - 1 != self.num_sequences:
            raise ValueError(
                f"the cache holds {self.num_sequences} sequences but this batch has {cu.numel() - 1} "
                "sub-samples; every call must continue all cached sequences"
            )
        start = 0 if self.order is None else self.order.numel()
        new_order = torch.arange(start, start + query.shape[0], device=query.device)
        self._append(key, value, new_sequence, new_order)

        allowed = (new_sequence[:, None] == self.sequence[None, :]) & (
            new_order[:, None] >= self.order[None, :]
        )
        groups = query.shape[1] // self.key.shape[1]
        q = query.permute(1, 0, 2)  # [h, t, d]
        k = self.key.repeat_interleave(groups, dim=1).permute(1, 0, 2)
        v = self.value.repeat_interleave(groups, dim=1).permute(1, 0, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.softmax_scale)
        return out.permute(1, 0, 2).reshape(query.shape[0], -1)  # [t, h·d]

    def _append(self, key: Tensor, value: Tensor, sequence: Tensor, order: Tensor) -> None:
        if self.key is None:
            self.key, self.value, self.sequence, self.order = key, value, sequence, order
            return
        self.key = torch.cat([self.key, key])
        self.value = torch.cat([self.value, value])
        self.sequence = torch.cat([self.sequence, sequence])
        self.order = torch.cat([self.order, order])


def _decoder_attentions(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention of every decoder layer of an InternVLModel or a GPTModel (not the ViT's)."""
    language_model = getattr(model, "language_model", model)
    decoder = getattr(language_model, "decoder", None)
    if decoder is None:
        raise ValueError(f"{type(model).__name__} has no language-model decoder to cache")
    return [layer.self_attention for layer in decoder.layers]


@contextmanager
def kv_cache(model: torch.nn.Module) -> Iterator[list[CachedAttention]]:
    """Within the block, every forward of ``model`` appends to a fresh KV cache (one per layer).

    Only for inference without context parallelism; the original core attentions come back on exit.
    """
    if model.training:
        raise ValueError("the KV cache is for inference: call model.eval() first")
    if model.config.context_parallel_size > 1:
        raise NotImplementedError("the KV cache does not support context parallelism")
    caches: list[CachedAttention] = []
    originals = []
    try:
        for attention in _decoder_attentions(model):
            originals.append((attention, attention.core_attention))
            cache = CachedAttention(attention.core_attention)
            attention.core_attention = cache
            caches.append(cache)
        yield caches
    finally:
        for attention, original in originals:
            attention.core_attention = original
