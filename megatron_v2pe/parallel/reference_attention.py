"""Reference core attention: plain PyTorch, runs anywhere, accepts packed (THD) input.

Megatron-Core's local ``DotProductAttention`` rejects packed sequences, and TE's attention needs a GPU.
This backend builds the mask explicitly (causal, and block-diagonal over the sub-samples of a pack given
by ``cu_seqlens``) and calls ``scaled_dot_product_attention``. Under context parallelism it all-gathers
K and V over the CP group and masks by the global index of every query and key, which makes it correct
for the zigzag layout and for packed sub-samples alike. Memory is O(t²) per head: it is meant for CPU
tests, the CPU demo and as the oracle other backends are checked against, not for long sequences.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_v2pe.parallel.context_parallel import (
    all_gather_tokens,
    context_parallel_group,
    kv_token_indices,
)


def segment_ids(cu_seqlens: Tensor, total: int) -> Tensor:
    """Sub-sample index of every token of a pack, from cumulative sequence lengths."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.long)
    if int(cu_seqlens[-1]) != total:
        raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but the pack has {total} tokens")
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)


def padded_cu_seqlens(params: PackedSeqParams) -> Tensor:
    """The boundaries that describe the token layout of a pack (padded ones when present)."""
    return params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q


class ReferenceAttention(MegatronModule):
    """Drop-in core attention for Megatron-Core's ``SelfAttention`` (bshd and THD, GQA, TP)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        self.cp_group = context_parallel_group(pg_collection) if config.context_parallel_size > 1 else None
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale or config.kv_channels**-0.5

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        if attention_bias is not None:
            raise NotImplementedError("ReferenceAttention does not support attention_bias")
        mask_type = attn_mask_type or self.attn_mask_type
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            out = self._forward_packed(query, key, value, packed_seq_params, mask_type)
            return out.reshape(query.shape[0], -1)  # [t, h·hd]
        if self.cp_group is not None:
            raise ValueError("context parallelism needs packed (THD) batches: pass packed_seq_params")
        out = self._forward_dense(query, key, value, attention_mask, mask_type)
        return out.reshape(query.shape[0], query.shape[1], -1)  # [s, b, h·hd]

    def _forward_packed(self, q, k, v, params: PackedSeqParams, mask_type: AttnMaskType) -> Tensor:
        """q [t, hq, d], k/v [t, hkv, d]: this rank's tokens of a pack -> [t, hq, d]."""
        cu = padded_cu_seqlens(params)
        q_index, kv_index = kv_token_indices(cu, self.cp_group)
        if self.cp_group is not None:
            k, v = all_gather_tokens(k, self.cp_group), all_gather_tokens(v, self.cp_group)
        segment = segment_ids(cu, int(cu[-1]))
        return self._attend_packed(q, k, v, segment[q_index], segment[kv_index], q_index, kv_index,
                                   causal=mask_type == AttnMaskType.causal)

    def _attend_packed(self, q, k, v, q_segment, kv_segment, q_index, kv_index, causal: bool) -> Tensor:
        """Attention of queries to keys of the same sub-sample (and not later ones, if causal), with
        every query and key identified by its sub-sample and its global index in the pack."""
        allowed = q_segment[:, None] == kv_segment[None, :]
        if causal:
            allowed &= q_index[:, None] >= kv_index[None, :]
        return self._attend(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), allowed).squeeze(1)

    def _forward_dense(self, q, k, v, attention_mask, mask_type: AttnMaskType) -> Tensor:
        """q [sq, b, hq, d], k/v [sk, b, hkv, d] -> [sq, b, hq, d]."""
        return self._attend(q, k, v, self._dense_mask(attention_mask, mask_type, q.shape[0], k.shape[0], q.device))

    @staticmethod
    def _dense_mask(attention_mask, mask_type, sq, sk, device) -> Optional[Tensor]:
        """Boolean 'may attend' mask broadcastable to [b, h, sq, sk] (Megatron masks mean 'masked')."""
        allowed = None
        if mask_type == AttnMaskType.causal:
            allowed = torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq)
        if attention_mask is not None and mask_type != AttnMaskType.no_mask:
            given = ~attention_mask.to(torch.bool)
            allowed = given if allowed is None else allowed & given
        return allowed

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
        """q [sq, b, hq, d], k/v [sk, b, hkv, d] -> [sq, b, hq, d]."""
        groups = q.shape[2] // k.shape[2]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (q, k, v))  # [b, h, s, d]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        dropout = self.dropout_p if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork():
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.softmax_scale
            )
        return out.permute(2, 0, 1, 3)
