"""Zero attention heads that let a tensor-parallel size not dividing the head count split a tower.

InternViT-6B has 25 heads; a 72B language model wants TP 8, and the vision tower shares its
tensor-parallel group. The tower is then built with the heads padded to the next multiple of the TP size
(32: 4 per rank, the last 7 zero). Padded heads change nothing: their q/k/v rows (and biases) and q/k norm
weights are zero, so their queries, keys and values are zero, their attention output is zero, and the
output projection's columns for them are zero too. Every gradient reaching a padded weight is exactly
zero (each is a product with one of those zeros), so Adam and weight decay keep them zero.

Padding exists only in the ranks' pieces. Whole tensors (tensor-parallel size 1: conversion tables and
dist checkpoints) hold the real heads only: a rank's sharded state dict names the real heads it holds as
pieces of the unpadded tensor, so a checkpoint saved at one TP size loads at any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from torch import Tensor


def padded_heads(heads: int, tp: int) -> int:
    """The head count a tensor-parallel size of ``tp`` splits: ``heads`` rounded up to a multiple of it."""
    return math.ceil(heads / tp) * tp


@dataclass(frozen=True)
class HeadPadding:
    """``heads`` real heads padded to ``padded``, split over ``tp`` ranks; this is rank ``rank``."""

    heads: int
    padded: int
    tp: int
    rank: int

    @property
    def per_rank(self) -> int:
        return self.padded // self.tp

    @property
    def real(self) -> range:
        """The real heads among those this rank holds, by global index."""
        return range(self.rank * self.per_rank, min((self.rank + 1) * self.per_rank, self.heads))


def zero_padded_heads(tensor: Tensor, dim: int, padding: HeadPadding) -> None:
    """Zero the padded heads of this rank's piece ``tensor`` (heads side by side along ``dim``)."""
    width = tensor.shape[dim] // padding.per_rank
    real = len(padding.real)
    with torch.no_grad():
        tensor.narrow(dim, real * width, (padding.per_rank - real) * width).zero_()


def unpadded_sharded_tensor(sharded: ShardedTensor, dim: int, padding: HeadPadding) -> ShardedTensorFactory:
    """``sharded`` (this rank's padded piece, split along ``dim`` over the TP group) as a factory of
    pieces of the unpadded tensor: one per real head held here; loading puts zeros in the padding."""
    prepend = sharded.prepend_axis_num
    outer = [(i, sharded.global_offset[i], sharded.axis_fragmentations[i]) for i in range(prepend)]
    real, per_rank, heads = padding.real, padding.per_rank, padding.heads

    def build(key, data, replica_id, flattened_range):
        width = data.shape[dim] // per_rank
        return [
            ShardedTensor.from_rank_offsets(
                key, data.narrow(dim, i * width, width), *outer, (dim + prepend, head, heads),
                replica_id=replica_id, prepend_axis_num=prepend,
            )
            for i, head in enumerate(real)
        ]  # fmt: skip

    def merge(pieces):
        template = sharded.data
        padding_shape = list(template.shape)
        padding_shape[dim] = template.shape[dim] // per_rank * (per_rank - len(real))
        dtype = pieces[0].dtype if pieces else template.dtype  # optimizer states: their own dtype
        padding = torch.zeros(padding_shape, dtype=dtype, device=template.device)
        return torch.cat([*(p.to(template.device) for p in pieces), padding], dim=dim)

    return ShardedTensorFactory(sharded.key, sharded.data, build, merge, sharded.replica_id)
