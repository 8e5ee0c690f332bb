"""Every attention backend available here gives the same outputs as the reference backend."""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType

from megatron_v2pe.model.config import internlm2_transformer_config
from megatron_v2pe.optional_deps import is_available
from megatron_v2pe.parallel.attention_backends import resolve_attention_backend
from megatron_v2pe.parallel.reference_attention import ReferenceAttention
from megatron_v2pe.parallel.torch_attention import TorchAttention

pytestmark = pytest.mark.usefixtures("megatron_runtime")

HEADS, GROUPS, HEAD_DIM = 4, 2, 16
LENGTHS = [37, 5, 64, 22]


def _core(cls, mask_type):
    config = internlm2_transformer_config(1, HEADS * HEAD_DIM, HEADS, GROUPS, 64)
    return cls(config, layer_number=1, attn_mask_type=mask_type, attention_type="self").eval()


def _packed_qkv(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = sum(LENGTHS)
    q = torch.randn(t, HEADS, HEAD_DIM, generator=g)
    k, v = (torch.randn(t, GROUPS, HEAD_DIM, generator=g) for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max(LENGTHS), max_seqlen_kv=max(LENGTHS))
    return q, k, v, params


def _naive_packed(q, k, v, causal: bool) -> torch.Tensor:
    """Attention computed one sub-sample and one head at a time, from the formula."""
    out, start = [], 0
    for n in LENGTHS:
        rows = []
        for h in range(HEADS):
            g = h // (HEADS // GROUPS)
            scores = q[start:start + n, h] @ k[start:start + n, g].T / math.sqrt(HEAD_DIM)
            if causal:
                scores = scores.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
            rows.append(scores.softmax(-1) @ v[start:start + n, g])
        out.append(torch.stack(rows, dim=1))
        start += n
    return torch.cat(out).reshape(sum(LENGTHS), -1)


@pytest.mark.parametrize("mask_type", [AttnMaskType.causal, AttnMaskType.no_mask])
@pytest.mark.parametrize("cls", [ReferenceAttention, TorchAttention])
def test_packed_attention_matches_formula(cls, mask_type):
    q, k, v, params = _packed_qkv()
    with torch.no_grad():
        got = _core(cls, mask_type)(q, k, v, None, packed_seq_params=params)
    expected = _naive_packed(q, k, v, causal=mask_type == AttnMaskType.causal)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask_type", [AttnMaskType.causal, AttnMaskType.no_mask])
def test_unpacked_torch_backend_matches_reference(mask_type):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(40, 3, HEADS, HEAD_DIM, generator=g)
    k, v = (torch.randn(40, 3, GROUPS, HEAD_DIM, generator=g) for _ in range(2))
    expected = _core(ReferenceAttention, mask_type)(q, k, v, None)
    got = _core(TorchAttention, mask_type)(q, k, v, None)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_auto_backend_on_this_machine():
    expected = ("te" if is_available("transformer_engine") else "torch") if torch.cuda.is_available() \
        else "reference"
    assert resolve_attention_backend("auto") == expected
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_attention_backend("flash")


def test_torch_backend_refuses_cpu_training_with_a_clear_error():
    q, k, v, params = _packed_qkv()
    q.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="reference"):
        _core(TorchAttention, AttnMaskType.causal)(q, k, v, None, packed_seq_params=params)
