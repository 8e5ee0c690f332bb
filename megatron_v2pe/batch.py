"""The one batch type: a packed (THD) micro-batch of image-text sub-samples.

Everything downstream of the data pipeline consumes this dataclass; it becomes Megatron-Core's
``PackedSeqParams`` only at the model boundary. Per-token fields are 1-D over the pack and laid out by
``cu_seqlens_padded``: sub-sample j holds its real tokens at the start of
``[cu_seqlens_padded[j], cu_seqlens_padded[j+1])`` and padding after them (padding carries zero loss
weight). Labels are already shifted by one, per sub-sample, before any sharding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor

IGNORE_INDEX = -100
"""Label of tokens that are not supervised (prompt turns, the last token of a sub-sample, padding)."""


@dataclass
class PackedBatch:
    tokens: Tensor  # [t] int64
    labels: Tensor  # [t] int64, next token or IGNORE_INDEX
    loss_weights: Tensor  # [t] float32
    positions: Tensor  # [t] float64, V2PE positions, restarting at 0 in each sub-sample
    cu_seqlens: Tensor  # [n+1] int32, cumulative real lengths
    cu_seqlens_padded: Tensor  # [n+1] int32, cumulative padded lengths (the token layout)
    pixel_values: Tensor  # [tiles, 3, H, W] float32, tiles of all images in <IMG_CONTEXT> order
    tiles_per_image: Tensor  # [images] int64
    deltas: Tensor  # [images] float64, the δ each image was given (for logging)
    # Set by context-parallel sharding (parallel/context_parallel.py): per-token fields then hold this
    # rank's tokens only, cu_seqlens stay global, and image_feature_index [t] maps each local
    # <IMG_CONTEXT> slot to its row of the pack's image features (-1 for text).
    cp_size: int = 1
    cp_rank: int = 0
    image_feature_index: Optional[Tensor] = None

    def __post_init__(self) -> None:
        t = self.tokens.shape[0]
        for name in ("labels", "loss_weights", "positions"):
            if getattr(self, name).shape != (t,):
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}, tokens have ({t},)")
        if int(self.cu_seqlens_padded[-1]) != t * self.cp_size:
            raise ValueError(
                f"cu_seqlens_padded ends at {int(self.cu_seqlens_padded[-1])}, but the pack has "
                f"{t} tokens x {self.cp_size} context-parallel ranks"
            )
        if int(self.tiles_per_image.sum()) != self.pixel_values.shape[0]:
            raise ValueError(
                f"tiles_per_image sums to {int(self.tiles_per_image.sum())} but pixel_values holds "
                f"{self.pixel_values.shape[0]} tiles"
            )
        if self.deltas.shape != self.tiles_per_image.shape:
            raise ValueError(f"{self.deltas.numel()} deltas for {self.tiles_per_image.numel()} images")

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    @property
    def max_seqlen(self) -> int:
        return int((self.cu_seqlens_padded[1:] - self.cu_seqlens_padded[:-1]).max())

    def packed_seq_params(self) -> PackedSeqParams:
        """Megatron-Core's description of the pack (THD; padded boundaries are the token layout)."""
        return PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=self.cu_seqlens,
            cu_seqlens_kv=self.cu_seqlens,
            cu_seqlens_q_padded=self.cu_seqlens_padded,
            cu_seqlens_kv_padded=self.cu_seqlens_padded,
            max_seqlen_q=self.max_seqlen,
            max_seqlen_kv=self.max_seqlen,
        )

    def to(self, device: torch.device | str) -> PackedBatch:
        tensors = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(
            self, **{k: v.to(device) for k, v in tensors.items() if isinstance(v, Tensor)}
        )
