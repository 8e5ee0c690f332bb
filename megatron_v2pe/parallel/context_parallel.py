"""Context parallelism over packed sequences.

Every sub-sample of a pack, padded to a multiple of 2·CP, is split on its own into 2·CP equal chunks;
rank r keeps chunks r and 2·CP-1-r (the zigzag that balances causal attention work, and the layout
Transformer Engine's THD context parallelism expects). Tokens, labels (shifted globally beforehand),
loss weights and V2PE positions go through the one same permutation, ``zigzag_token_indices``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from torch import Tensor

from megatron_v2pe.batch import PackedBatch


def zigzag_token_indices(cu_seqlens_padded: Tensor, cp_size: int, cp_rank: int) -> Tensor:
    """Global indices (into the padded pack) of the tokens CP rank ``cp_rank`` keeps, in its local order."""
    cu = cu_seqlens_padded.to(torch.long)
    lengths = cu[1:] - cu[:-1]
    bad = torch.nonzero(lengths % (2 * cp_size)).flatten()
    if bad.numel():
        j = int(bad[0])
        raise ValueError(
            f"sub-sample {j} has padded length {int(lengths[j])}, not a multiple of 2 x context "
            f"parallel size = {2 * cp_size}: pad every sub-sample to a multiple of 2·CP when packing"
        )
    chunk = lengths // (2 * cp_size)
    starts = torch.stack([cu[:-1] + cp_rank * chunk, cu[:-1] + (2 * cp_size - 1 - cp_rank) * chunk], 1)
    return _ranges(starts.flatten(), chunk.repeat_interleave(2))


def _ranges(starts: Tensor, lengths: Tensor) -> Tensor:
    """Concatenation of arange(s, s + n) for each (s, n), without a Python loop."""
    offsets = torch.cumsum(lengths, 0) - lengths
    return torch.repeat_interleave(starts - offsets, lengths) + torch.arange(int(lengths.sum()))


def image_feature_index(tokens: Tensor, img_context_token_id: int) -> Tensor:
    """For every token, the index of the image feature that fills it (-1 for text tokens)."""
    visual = tokens == img_context_token_id
    return torch.where(visual, torch.cumsum(visual, 0) - 1, -1)


def shard_batch(batch: PackedBatch, cp_size: int, cp_rank: int, img_context_token_id: int) -> PackedBatch:
    """This rank's share of a pack. cu_seqlens stay global (attention needs the whole layout) and the
    image tiles stay whole (``encode_images_context_parallel`` spreads them over the ranks)."""
    if batch.cp_size != 1:
        raise ValueError("the batch is already sharded for context parallelism")
    if cp_size == 1:
        return batch
    index = zigzag_token_indices(batch.cu_seqlens_padded, cp_size, cp_rank)
    per_token = {f: getattr(batch, f)[index] for f in ("tokens", "labels", "loss_weights", "positions")}
    return dataclasses.replace(
        batch,
        **per_token,
        image_feature_index=image_feature_index(batch.tokens, img_context_token_id)[index],
        cp_size=cp_size,
        cp_rank=cp_rank,
    )


def kv_token_indices(cu_seqlens_padded: Tensor, cp_group: Optional[dist.ProcessGroup]) -> tuple[Tensor, Tensor]:
    """(global indices of this rank's queries, of the keys after an all-gather over ``cp_group``)."""
    if cp_group is None or cp_group.size() == 1:
        everything = torch.arange(int(cu_seqlens_padded[-1]), device=cu_seqlens_padded.device)
        return everything, everything
    size, rank = cp_group.size(), cp_group.rank()
    per_rank = [zigzag_token_indices(cu_seqlens_padded, size, r) for r in range(size)]
    device = cu_seqlens_padded.device
    return per_rank[rank].to(device), torch.cat(per_rank).to(device)


def all_gather_tokens(x: Tensor, cp_group: dist.ProcessGroup) -> Tensor:
    """All-gather along the token dimension in rank order; the gradient is reduce-scattered back."""
    return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=cp_group)


def context_parallel_group(pg_collection=None) -> Optional[dist.ProcessGroup]:
    """The CP group of a module (its process-group collection, else Megatron's global one)."""
    group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
    return group if group is not None else parallel_state.get_context_parallel_group()
