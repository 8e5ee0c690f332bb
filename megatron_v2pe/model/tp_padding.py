"""Zero units (attention heads, vocabulary rows) that let a tensor-parallel size not dividing their count
split a tensor: the tensor is built with the units padded to the next multiple of the TP size, and
Megatron's even split then gives the padding to the last ranks.

- InternViT-6B has 25 heads; a 72B language model wants TP 8, and the vision tower shares its
  tensor-parallel group. The tower is then built with 32 heads (4 per rank, the last 7 zero). Padded heads
  change nothing: their q/k/v rows (and biases) and q/k norm weights are zero, so their queries, keys and
  values are zero, their attention output is zero, and the output projection's columns for them are zero
  too. Every gradient reaching a padded weight is exactly zero (each is a product with one of those
  zeros), so Adam and weight decay keep them zero.
- InternVL3-78B's vocabulary has 151,674 ids; TP 8 builds the embedding and output layer with 151,680
  rows (the last rank holds the 6 zero rows, as Megatron-LM pads). No real id looks up a padded
  embedding row, and the padded logits are -inf (``language_model``), so they get zero probability and
  their rows zero gradients.

Padding exists only in the ranks' pieces. Whole tensors (tensor-parallel size 1: conversion tables and
dist checkpoints) hold the real units only: a rank's sharded state dict names the real units it holds
as a piece of the unpadded tensor, so a checkpoint saved at one TP size loads at any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from torch import Tensor


def padded_size(units: int, tp: int) -> int:
    """The unit count a tensor-parallel size of ``tp`` splits: ``units`` rounded up to a multiple of it."""
    return math.ceil(units / tp) * tp


@dataclass(frozen=True)
class TPPadding:
    """``units`` real units padded to ``padded``, split over ``tp`` ranks; this is rank ``rank``."""

    units: int
    padded: int
    tp: int
    rank: int

    @classmethod
    def of(cls, units: int, tp: int, rank: int) -> TPPadding:
        """The least padding of ``units`` that ``tp`` ranks split."""
        return cls(units, padded_size(units, tp), tp, rank)

    @property
    def per_rank(self) -> int:
        return self.padded // self.tp

    @property
    def real(self) -> range:
        """The real units among those this rank holds, by global index."""
        return range(self.rank * self.per_rank, min((self.rank + 1) * self.per_rank, self.units))


def zero_padding(tensor: Tensor, dim: int, padding: TPPadding) -> None:
    """Zero the padded units of this rank's piece ``tensor`` (units side by side along ``dim``)."""
    width = tensor.shape[dim] // padding.per_rank
    real = len(padding.real)
    with torch.no_grad():
        tensor.narrow(dim, real * width, (padding.per_rank - real) * width).zero_()


def unpadded_sharded_tensor(sharded: ShardedTensor, dim: int, padding: TPPadding) -> ShardedTensorFactory:
    """``sharded`` (this rank's padded piece, split along ``dim`` over the TP group) as a factory of the
    real units held here: one piece of the unpadded tensor (uneven across ranks, none on a rank holding
    padding only); loading puts zeros in the padding."""
    prepend = sharded.prepend_axis_num
    real, per_rank = padding.real, padding.per_rank

    def build(key, data, replica_id, flattened_range):
        if not real:
            return []
        width = data.shape[dim] // per_rank
        # The prepended axes (layer stacks) become the piece's own: uneven pieces are saved with as
        # many local as global dimensions.
        piece = data.narrow(dim, 0, len(real) * width)[(None,) * prepend]
        global_shape, global_offset = list(sharded.global_shape), list(sharded.global_offset)
        global_shape[dim + prepend], global_offset[dim + prepend] = padding.units * width, real.start * width
        return [
            ShardedTensor(
                key, piece, piece.dtype, tuple(piece.shape), tuple(global_shape), tuple(global_offset),
                axis_fragmentations=None, replica_id=replica_id,
            )
        ]  # fmt: skip

    def merge(pieces):
        template = sharded.data
        padding_shape = list(template.shape)
        padding_shape[dim] = template.shape[dim] // per_rank * (per_rank - len(real))
        dtype = pieces[0].dtype if pieces else template.dtype  # optimizer states: their own dtype
        zeros = torch.zeros(padding_shape, dtype=dtype, device=template.device)
        return torch.cat([*(p[(0,) * prepend].to(template.device) for p in pieces), zeros], dim=dim)

    return ShardedTensorFactory(sharded.key, sharded.data, build, merge, sharded.replica_id)
