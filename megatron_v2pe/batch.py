"""The one batch type: a packed (THD) micro-batch of image-text sub-samples.

Everything downstream of the data pipeline consumes this dataclass; it becomes Megatron-Core's
``PackedSeqParams`` only at the model boundary. Per-token fields are 1-D over the pack and laid out by
``cu_seqlens_padded``: sub-sample j holds its real tokens at the start of
``[cu_seqlens_padded[j], cu_seqlens_padded[j+1])`` and padding after them (padding carries zero loss
weight). Labels are already shifted by one, per sub-sample, before any sharding. ``from_sequences``
lays a pack out from its sub-samples; ``padded_to`` lengthens one to a fixed size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor

from megatron_v2pe.v2pe.positions import DeltaPolicy, compute_positions

IGNORE_INDEX = -100
"""Label of tokens that are not supervised (prompt turns, the last token of a sub-sample, padding)."""


class SubSample(NamedTuple):
    """The real tokens of one sub-sample and, per token, its label (already shifted: the next token or
    IGNORE_INDEX, always IGNORE_INDEX for the last) and loss weight."""

    tokens: np.ndarray
    labels: np.ndarray
    loss_weights: np.ndarray


def _cumulative(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate(([0], np.cumsum(lengths)))


def _laid_out(values: Sequence[np.ndarray], cu_padded: np.ndarray, fill, dtype) -> np.ndarray:
    """The per-sub-sample arrays at the start of their padded slots, ``fill`` after them."""
    out = np.full(int(cu_padded[-1]), fill, dtype=dtype)
    for value, start in zip(values, cu_padded[:-1], strict=True):
        out[start : start + len(value)] = value
    return out


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

    @classmethod
    def from_sequences(
        cls,
        sequences: Sequence[SubSample],
        *,
        pixel_values: Tensor,
        tiles_per_image: Tensor,
        pad_multiple: int,
        pad_token_id: int,
        img_context_id: int,
        delta_policy: DeltaPolicy,
        rng: np.random.Generator | None,
    ) -> PackedBatch:
        """The pack of these sub-samples in order, each padded to a multiple of ``pad_multiple`` with
        ``pad_token_id`` (no label, no weight). ``delta_policy`` draws one δ per image over the real
        tokens; positions restart per sub-sample, and its padding continues them as text."""
        if pad_token_id == img_context_id:
            raise ValueError(
                f"pad_token_id {pad_token_id} is the <IMG_CONTEXT> id; padding must be a text token"
            )
        lengths = np.array([len(s.tokens) for s in sequences], dtype=np.int64)
        cu_seqlens = _cumulative(lengths)
        cu_padded = _cumulative(-(-lengths // pad_multiple) * pad_multiple)
        tokens = _laid_out([s.tokens for s in sequences], cu_padded, pad_token_id, np.int64)
        labels = _laid_out([s.labels for s in sequences], cu_padded, IGNORE_INDEX, np.int64)
        loss_weights = _laid_out([s.loss_weights for s in sequences], cu_padded, 0.0, np.float32)
        real_visual = np.concatenate([s.tokens == img_context_id for s in sequences])
        deltas = delta_policy.deltas(real_visual, cu_seqlens, rng)
        positions = compute_positions(tokens == img_context_id, deltas, cu_padded)
        return cls(
            tokens=torch.from_numpy(tokens),
            labels=torch.from_numpy(labels),
            loss_weights=torch.from_numpy(loss_weights),
            positions=torch.from_numpy(positions),
            cu_seqlens=torch.from_numpy(cu_seqlens.astype(np.int32)),
            cu_seqlens_padded=torch.from_numpy(cu_padded.astype(np.int32)),
            pixel_values=pixel_values,
            tiles_per_image=tiles_per_image,
            deltas=torch.from_numpy(np.asarray(deltas, dtype=np.float64)),
        )

    def padded_to(self, length: int, pad_token_id: int) -> PackedBatch:
        """The pack with its last sub-sample's padding extended to ``length`` tokens (pipeline stages
        exchange tensors of one shape). The new padding has no label or loss weight, its positions
        continue the last token's by 1, and causal attention keeps it out of the real tokens."""
        extra = length - self.num_tokens
        if extra < 0:
            raise ValueError(f"cannot pad a pack of {self.num_tokens} tokens to {length}")
        if extra == 0:
            return self
        cu_padded = self.cu_seqlens_padded.clone()
        cu_padded[-1] = length
        steps = torch.arange(1, extra + 1, dtype=self.positions.dtype, device=self.positions.device)
        return dataclasses.replace(
            self,
            tokens=torch.cat([self.tokens, self.tokens.new_full((extra,), pad_token_id)]),
            labels=torch.cat([self.labels, self.labels.new_full((extra,), IGNORE_INDEX)]),
            loss_weights=torch.cat([self.loss_weights, self.loss_weights.new_zeros(extra)]),
            positions=torch.cat([self.positions, self.positions[-1] + steps]),
            cu_seqlens_padded=cu_padded,
        )

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
