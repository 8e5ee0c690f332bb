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

from megatron_v2pe.parallel.cache_attention import merge_two, reference_partial
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


def _flash(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """[1, h, s, d] inputs -> (out [h, s, d] fp32, lse [h, s]) from PyTorch's flash-attention kernel."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention
    out, lse, *_ = flash(q, k, v, 0.0, causal, False, scale=scale)
    return out[0].float(), lse[0]


def cache_partial(
    q: Tensor, k: Tensor, v: Tensor, prefix: int, causal_new: bool, scale: float
) -> tuple[Tensor, Tensor]:
    """``reference_partial`` through flash attention on a GPU in fp16/bf16 (else the reference).

    The cached prefix is one non-causal call in which the queries of each KV head's group are folded
    into the query length (GQA without copying the cache); the new keys are one square causal call."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        return reference_partial(q, k, v, prefix, causal_new, scale)
    n, hq, d = q.shape
    hkv = k.shape[0]
    groups = hq // hkv
    out = q.new_zeros(n, hq, d, dtype=torch.float32)
    lse = torch.full((n, hq), -torch.inf, dtype=torch.float32, device=q.device)
    if prefix:
        folded = q.reshape(n, hkv, groups, d).permute(1, 0, 2, 3).reshape(1, hkv, n * groups, d)
        part, part_lse = _flash(folded, k[None, :, :prefix], v[None, :, :prefix], False, scale)
        out = part.reshape(hkv, n, groups, d).permute(1, 0, 2, 3).reshape(n, hq, d)
        lse = part_lse.reshape(hkv, n, groups).permute(1, 0, 2).reshape(n, hq)
    if causal_new:
        new_k, new_v = (x[:, prefix : prefix + n].repeat_interleave(groups, dim=0)[None] for x in (k, v))
        part, part_lse = _flash(q.transpose(0, 1)[None], new_k, new_v, True, scale)
        out, lse = merge_two(out, lse, part.transpose(0, 1), part_lse.transpose(0, 1))
    return out, lse
