"""Attention of new tokens over a KV cache, as partial results merged by the log-sum-exp rule.

A query may see keys held in several places: the cached prefix of its sequence (possibly sharded over
context-parallel ranks) and the new tokens of its own call (causally). Each place yields a *partial*:
the softmax-weighted values over its keys alone (fp32) and the log-sum-exp of its scores. Partials
combine exactly: with L = logsumexp_i(lse_i), out = Σ_i exp(lse_i - L) · out_i. A place with no
visible key contributes lse = -inf and nothing else.

``reference_partial`` computes a partial with explicit scores over blocks of keys, so its memory is
O(queries × block) whatever the cache length; the torch backend swaps in flash kernels on a GPU
(``parallel/torch_attention.py``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

KEY_BLOCK = 2048
"""Keys per block of ``reference_partial`` (bounds its score tensor to heads × queries × KEY_BLOCK)."""


def visible_keys(num_queries: int, prefix: int, causal_new: bool, device: torch.device) -> Tensor:
    """How many keys each query sees: the ``prefix`` cached ones, and with ``causal_new`` the new keys
    stored right after them up to its own."""
    limit = torch.full((num_queries,), prefix, dtype=torch.long, device=device)
    return limit + torch.arange(1, num_queries + 1, device=device) if causal_new else limit


def reference_partial(
    q: Tensor, k: Tensor, v: Tensor, prefix: int, causal_new: bool, scale: float, block: int = KEY_BLOCK
) -> tuple[Tensor, Tensor]:
    """q [n, hq, d], k/v [hkv, m, d] -> (out [n, hq, d] fp32, lse [n, hq] fp32).

    Query i sees keys [0, prefix), and also [prefix, prefix + i] when ``causal_new`` (then m = prefix + n).
    """
    n, hq, d = q.shape
    hkv, m = k.shape[0], k.shape[1]
    groups = hq // hkv
    limit = visible_keys(n, prefix, causal_new, q.device)
    qg = q.float().reshape(n, hkv, groups, d).permute(1, 2, 0, 3) * scale  # [hkv, g, n, d]
    out = q.new_zeros(hkv, groups, n, d, dtype=torch.float32)
    lse = torch.full((hkv, groups, n), -torch.inf, dtype=torch.float32, device=q.device)
    for start in range(0, m, block):
        stop = min(start + block, m)
        scores = torch.einsum("hgnd,hkd->hgnk", qg, k[:, start:stop].float())
        hidden = torch.arange(start, stop, device=q.device)[None, :] >= limit[:, None]  # [n, keys]
        scores = scores.masked_fill(hidden, -torch.inf)
        block_lse = scores.logsumexp(dim=-1)
        weights = torch.exp(scores - block_lse.clamp(min=-1e30)[..., None])
        block_out = torch.einsum("hgnk,hkd->hgnd", weights, v[:, start:stop].float())
        out, lse = merge_two(out, lse, block_out, block_lse)
    return out.permute(2, 0, 1, 3).reshape(n, hq, d), lse.permute(2, 0, 1).reshape(n, hq)


def merge_two(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Two partials over disjoint keys -> the partial over all of them (out [..., d], lse [...])."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = lse.clamp(min=-1e30)  # both -inf: weights 0, not NaN
    out = torch.exp(lse_a - safe)[..., None] * out_a + torch.exp(lse_b - safe)[..., None] * out_b
    return out, lse


def merge_over_group(out: Tensor, lse: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Every rank's partial for the same queries -> the full attention output, the same on every rank
    (the partials are merged in rank order everywhere)."""
    outs = [torch.empty_like(out) for _ in range(group.size())]
    lses = [torch.empty_like(lse) for _ in range(group.size())]
    dist.all_gather(outs, out.contiguous(), group=group)
    dist.all_gather(lses, lse.contiguous(), group=group)
    merged, merged_lse = outs[0], lses[0]
    for other, other_lse in zip(outs[1:], lses[1:]):
        merged, merged_lse = merge_two(merged, merged_lse, other, other_lse)
    return merged


def decode_attention(
    q: Tensor, key_cache: Tensor, value_cache: Tensor, lengths: Tensor, scale: float
) -> Tensor:
    """One new query per sequence over its cache (the new key already written), batched over the whole
    capacity so that shapes never change (the step can be a CUDA graph): q [B, hq, d], caches
    [B, hkv, capacity, d], lengths [B] (keys per sequence, on the device) -> [B, hq, d]. The queries of
    each KV head's group are its queries (GQA without repeating the cache). Without context
    parallelism there is nothing to merge, so no log-sum-exp."""
    batch, heads, dim = q.shape
    kv_heads, capacity = key_cache.shape[1], key_cache.shape[2]
    visible = torch.arange(capacity, device=q.device)[None, :] < lengths[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(batch, kv_heads, heads // kv_heads, dim), key_cache, value_cache,
        attn_mask=visible[:, None, None, :], scale=scale,
    )
    return out.reshape(batch, heads, dim)
