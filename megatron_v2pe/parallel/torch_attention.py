"""PyTorch core attention for GPUs without Transformer Engine.

Packed (THD) batches never materialise a t x t mask: on CUDA with fp16/bf16 they go to PyTorch's
variable-length flash attention (``varlen_attn``, causal or bidirectional per sub-sample); otherwise to
FlexAttention with a block-sparse document mask (compiled on CUDA; eager, forward-only on CPU, where it
serves to check this backend against the reference one). Unpacked batches use
``scaled_dot_product_attention`` with ``is_causal`` instead of an explicit mask.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from torch import Tensor
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from megatron_v2pe.parallel.reference_attention import ReferenceAttention, padded_cu_seqlens

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # older PyTorch: FlexAttention serves every case
    varlen_attn = None


@functools.cache
def _varlen_keywords() -> frozenset[str]:
    """``varlen_attn``'s keyword arguments: PyTorch 2.10/2.11 take ``is_causal`` only; later releases
    take ``scale``, ``window_size`` and ``enable_gqa``."""
    return frozenset(inspect.signature(varlen_attn).parameters)


def _varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, causal: bool, scale: float) -> Tensor | None:
    """Flash attention per sub-sample through whichever ``varlen_attn`` is installed, or None when it
    cannot take this softmax scale (then FlexAttention serves)."""
    keywords = _varlen_keywords()
    kwargs = {}
    if "scale" in keywords:
        kwargs["scale"] = scale
    elif scale != q.shape[-1] ** -0.5:
        return None
    if "window_size" in keywords:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kwargs["is_causal"] = causal
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in keywords:
            kwargs["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    longest = int((cu[1:] - cu[:-1]).max())
    return varlen_attn(q, k, v, cu, cu, longest, longest, **kwargs)


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


class TorchAttention(ReferenceAttention):
    """Same interface and results as ReferenceAttention, with memory-efficient PyTorch kernels."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if self.dropout_p:
            raise ValueError(
                "the 'torch' attention backend has no attention dropout; set attention_dropout=0 "
                "or use the 'te' or 'reference' backend"
            )

    def _forward_packed(self, q, k, v, params: PackedSeqParams, mask_type: AttnMaskType) -> Tensor:
        causal = mask_type == AttnMaskType.causal
        if (self.cp_group is None and varlen_attn is not None and q.is_cuda
                and q.dtype in (torch.float16, torch.bfloat16)):
            out = _varlen_attention(q, k, v, padded_cu_seqlens(params), causal, self.softmax_scale)
            if out is not None:
                return out
        return super()._forward_packed(q, k, v, params, mask_type)

    def _attend_packed(self, q, k, v, q_segment, kv_segment, q_index, kv_index, causal: bool) -> Tensor:
        """FlexAttention with a block-sparse mask over (query, key) global indices."""
        if not q.is_cuda and torch.is_grad_enabled() and q.requires_grad:
            raise NotImplementedError(
                "the 'torch' attention backend cannot train on the CPU (FlexAttention has no CPU "
                "backward); use the 'reference' backend there"
            )

        def same_subsample(b, h, qi, ki):
            allowed = q_segment[qi] == kv_segment[ki]
            return allowed & (q_index[qi] >= kv_index[ki]) if causal else allowed

        block_mask = create_block_mask(same_subsample, None, None, q.shape[0], k.shape[0], device=q.device)
        attend = _compiled_flex_attention() if q.is_cuda else flex_attention
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, h, t, d]
        out = attend(q, k, v, block_mask=block_mask, scale=self.softmax_scale,
                     enable_gqa=q.shape[1] != k.shape[1])
        return out.squeeze(0).transpose(0, 1)

    def _forward_dense(self, q, k, v, attention_mask, mask_type: AttnMaskType) -> Tensor:
        if attention_mask is not None and mask_type != AttnMaskType.no_mask:
            return super()._forward_dense(q, k, v, attention_mask, mask_type)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (q, k, v))  # [b, h, s, d]
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=mask_type == AttnMaskType.causal, scale=self.softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        return out.permute(2, 0, 1, 3)
