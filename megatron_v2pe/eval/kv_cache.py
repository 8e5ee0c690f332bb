"""A preallocated KV cache slotted into the core attention of every decoder layer.

Keys reach core attention already rotated by their V2PE angles (``V2PESelfAttention`` applies them
right after the QKV projection), so caching what core attention receives is enough: a new token is
rotated by its own position once, and every cached key keeps the angle of the position it was computed
at. The cache also records every token's V2PE position (float64, on the host), sequence by sequence.

Each layer owns one key and one value buffer [sequences, kv heads, capacity, head dim], allocated once
for the longest sequence of the batch and written in place; the lengths are kept on the host, so no
step reallocates, copies or synchronises. Every forward runs inside ``cache.extend(counts, positions)``:
one packed THD batch whose sub-sample j (``counts[j]`` tokens, possibly 0) continues sequence j.

Under context parallelism every rank runs the same tokens; the new keys of a sequence are stored on one
rank only (the one holding fewest of that sequence's tokens), each rank attends over its own shard, and
the partial results are merged by log-sum-exp (``parallel/cache_attention.py``), so every rank gets the
same output while holding only about 1/CP of the cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from megatron.core.transformer.enums import AttnMaskType
from torch import Tensor

from megatron_v2pe.parallel.cache_attention import decode_attention, merge_over_group, reference_partial
from megatron_v2pe.parallel.context_parallel import context_parallel_group
from megatron_v2pe.parallel.reference_attention import ReferenceAttention
from megatron_v2pe.parallel.torch_attention import TorchAttention, cache_partial


def decoder_attentions(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention of every decoder layer of an InternVLModel or a GPTModel (not the ViT's)."""
    language_model = getattr(model, "language_model", model)
    decoder = getattr(language_model, "decoder", None)
    if decoder is None:
        raise ValueError(f"{type(model).__name__} has no language-model decoder to cache")
    return [layer.self_attention for layer in decoder.layers]


def rank_capacity(tokens: int, chunk: int, cp_size: int) -> int:
    """Cache slots one rank needs for a sequence of ``tokens`` fed ``chunk`` at most at a time: all of
    them without CP; with it, the fewest-first placement keeps every rank within one chunk of 1/CP."""
    return tokens if cp_size == 1 else min(tokens, -(-tokens // cp_size) + chunk)


@dataclass
class _Call:
    """What every layer needs to know about the forward in progress (host-side, shared by all layers)."""

    counts: list[int]
    starts: list[int]  # where sequence j's new tokens begin in the packed batch
    owner: list[int]  # the rank that stores them
    held: np.ndarray  # [cp, sequences] tokens each rank held before this call
    decode: bool = False  # one token per sequence, without CP: attention batched over the cache


class KVCache:
    """The buffers of every layer and the bookkeeping of what each rank holds."""

    def __init__(self, model: torch.nn.Module, num_sequences: int, capacity: int, cp_group=None):
        first = decoder_attentions(model)[0]
        weight = first.linear_qkv.weight
        heads, head_dim = first.num_query_groups_per_partition, first.hidden_size_per_attention_head
        shape = (num_sequences, heads, capacity, head_dim)
        layers = len(decoder_attentions(model))
        self.keys = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in range(layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.group = cp_group
        self.rank = 0 if cp_group is None else cp_group.rank()
        self.held = np.zeros((1 if cp_group is None else cp_group.size(), num_sequences), dtype=np.int64)
        self.positions = np.zeros((num_sequences, capacity * self.held.shape[0]), dtype=np.float64)
        self.capacity = capacity
        self.call: _Call | None = None
        # decoding reads lengths and rows from fixed tensors, updated in place (a CUDA graph replays them)
        self.decode_lengths = torch.zeros(num_sequences, dtype=torch.long, device=weight.device)
        self.rows = torch.arange(num_sequences, device=weight.device)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of every sequence so far, over all ranks."""
        return self.held.sum(axis=0)

    def sequence_positions(self, j: int) -> np.ndarray:
        """The V2PE positions of sequence j's cached tokens, in the order they came."""
        return self.positions[j, : self.lengths[j]]

    @contextmanager
    def extend(self, counts: Sequence[int], positions: np.ndarray) -> Iterator[None]:
        """Within the block, one forward appends ``counts[j]`` new tokens to sequence j, at the given
        positions (all the forward's tokens, in packed order)."""
        counts = [int(n) for n in counts]
        if len(counts) != self.held.shape[1] or len(positions) != sum(counts):
            raise ValueError(f"the cache holds {self.held.shape[1]} sequences; got counts for {len(counts)} "
                             f"({sum(counts)} tokens) and {len(positions)} positions")
        owner = [int(np.argmin(self.held[:, j])) for j in range(len(counts))]
        after = self.held.copy()
        after[owner, np.arange(len(counts))] += counts
        if after.max() > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} tokens per sequence and rank; "
                             f"this call needs {int(after.max())}: size it for prompt + new tokens")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
        self.call = _Call(counts, starts, owner, self.held)
        if self.group is None and all(n == 1 for n in counts):
            self.decode_lengths.copy_(torch.from_numpy(after[0]))
            self.call.decode = True
        try:
            yield
        finally:
            self.call = None
        for j, (n, start, length) in enumerate(zip(counts, starts, self.lengths)):
            self.positions[j, length : length + n] = positions[start : start + n]
        self.held = after


class CachedAttention(torch.nn.Module):
    """One layer's core attention over its cache plus the new tokens (causal); ``softmax_scale`` is the
    wrapped module's, so outputs match it to rounding."""

    def __init__(self, inner: torch.nn.Module, cache: KVCache, layer: int):
        super().__init__()
        self.inner, self.cache, self.layer = inner, cache, layer
        self.softmax_scale: float = inner.softmax_scale
        exact = isinstance(inner, ReferenceAttention) and not isinstance(inner, TorchAttention)
        self.partial = reference_partial if exact else cache_partial  # TE and torch: flash kernels

    def forward(self, query, key, value, attention_mask, attn_mask_type: AttnMaskType | None = None,
                attention_bias=None, packed_seq_params=None) -> Tensor:
        call = self.cache.call
        if call is None:
            raise RuntimeError("a forward under kv_cache() must run inside cache.extend(counts, positions)")
        if query.dim() != 3 or query.shape[0] != sum(call.counts):
            raise ValueError(
                f"the cache expects {sum(call.counts)} packed (THD) tokens, got {tuple(query.shape)}"
            )
        keys, values = self.cache.keys[self.layer], self.cache.values[self.layer]
        if call.decode:
            lengths = self.cache.decode_lengths
            keys[self.cache.rows, :, lengths - 1], values[self.cache.rows, :, lengths - 1] = key, value
            out = decode_attention(query, keys, values, lengths, self.softmax_scale)
            return out.reshape(query.shape[0], -1)
        self._write(key, value, call)
        out, lse = self._attend(query, call)
        if self.cache.group is not None:
            out = merge_over_group(out, lse, self.cache.group)
        return out.to(query.dtype).reshape(query.shape[0], -1)

    def _write(self, key: Tensor, value: Tensor, call: _Call) -> None:
        for j, (n, start) in enumerate(zip(call.counts, call.starts)):
            if n and call.owner[j] == self.cache.rank:
                at = int(call.held[self.cache.rank, j])
                self.cache.keys[self.layer][j, :, at : at + n] = key[start : start + n].transpose(0, 1)
                self.cache.values[self.layer][j, :, at : at + n] = value[start : start + n].transpose(0, 1)

    def _attend(self, query: Tensor, call: _Call) -> tuple[Tensor, Tensor]:
        """(out fp32 [t, hq, d], lse [t, hq]) of this rank's partial, sequence by sequence."""
        outs, lses = [], []
        for j, (n, start) in enumerate(zip(call.counts, call.starts)):
            if not n:
                continue
            prefix, own = int(call.held[self.cache.rank, j]), call.owner[j] == self.cache.rank
            stop = prefix + (n if own else 0)
            q = query[start : start + n]
            if stop == 0:
                outs.append(q.new_zeros(q.shape, dtype=torch.float32))
                lses.append(torch.full(q.shape[:2], -torch.inf, device=q.device))
                continue
            k, v = self.cache.keys[self.layer][j, :, :stop], self.cache.values[self.layer][j, :, :stop]
            out, lse = self.partial(q, k, v, prefix, own, self.softmax_scale)
            outs.append(out)
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses)


@contextmanager
def kv_cache(model: torch.nn.Module, num_sequences: int, capacity: int) -> Iterator[KVCache]:
    """Within the block, every forward of ``model`` (inside ``cache.extend``) appends to a fresh cache of
    ``capacity`` tokens per sequence on this rank; the original core attentions come back on exit.
    Under context parallelism (a model built with it) the cache is sharded over the CP group."""
    if model.training:
        raise ValueError("the KV cache is for inference: call model.eval() first")
    group = context_parallel_group() if model.config.context_parallel_size > 1 else None
    cache = KVCache(model, num_sequences, capacity, group)
    originals = []
    try:
        for layer, attention in enumerate(decoder_attentions(model)):
            originals.append((attention, attention.core_attention))
            attention.core_attention = CachedAttention(attention.core_attention, cache, layer)
        yield cache
    finally:
        for attention, original in originals:
            attention.core_attention = original
