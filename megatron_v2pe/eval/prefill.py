"""Chunked prefill: prompts go through the model ``chunk`` tokens at a time, into the KV cache.

The prompts of a batch are laid end to end (prompt j is sequence j of the cache) and cut every
``chunk`` tokens, wherever that falls (inside an image's visual tokens too): each forward is one packed
batch of at most ``chunk`` tokens attending causally to the cache plus itself, so activations are
O(chunk) whatever the prompt length. A chunk encodes only the image tiles whose features it needs (a
tile cut by a boundary is encoded by both chunks; tile features do not depend on other tiles), and the
output layer runs only on the rows asked for (``logits_at``): never a [prompt × vocabulary] tensor.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor

from megatron_v2pe.eval.kv_cache import KVCache
from megatron_v2pe.model.vlm import InternVLModel


def packed_params(lengths: Sequence[int], device: torch.device) -> PackedSeqParams:
    """THD description of sub-samples of the given lengths (0 allowed), without padding."""
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=device)
    longest = int(max(lengths))
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        cu_seqlens_q_padded=cu,
        cu_seqlens_kv_padded=cu,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )


@dataclass(frozen=True)
class PackedPrompts:
    """Prompts end to end, on the host: token ids [T], V2PE positions [T] (float64), the length of each,
    and their image tiles [n, 3, S, S] in order (None without images)."""

    tokens: Tensor
    positions: Tensor
    lengths: list[int]
    tiles: Tensor | None

    @property
    def ends(self) -> np.ndarray:
        """Index in the stream of each prompt's last token."""
        return np.cumsum(self.lengths) - 1


@contextmanager
def logits_at(model: InternVLModel, rows: Tensor | None) -> Iterator[None]:
    """Within the block, the output layer sees only hidden states ``rows`` of the forward (all if None),
    so the logits are [1, len(rows), vocab]."""
    if rows is None:
        yield
        return
    handle = model.language_model.output_layer.register_forward_pre_hook(
        lambda module, args: (args[0][rows], *args[1:])
    )
    try:
        yield
    finally:
        handle.remove()


def chunk_images(
    tokens: Tensor, first_feature: int, image_id: int, tiles: Tensor | None, tokens_per_tile: int
) -> tuple[Tensor | None, Tensor]:
    """(the tiles a piece of the stream needs, the feature row of each of its tokens among them, -1
    for text), given the index of the piece's first image feature in the whole stream."""
    visual = tokens == image_id
    count = int(visual.sum())
    if count == 0:
        return None, torch.full_like(tokens, -1)
    first_tile = first_feature // tokens_per_tile
    last_tile = (first_feature + count - 1) // tokens_per_tile
    feature = torch.cumsum(visual, 0) - 1 + first_feature - first_tile * tokens_per_tile
    return tiles[first_tile : last_tile + 1], torch.where(visual, feature, -1)


def prefill(
    model: InternVLModel, cache: KVCache, prompts: PackedPrompts, chunk: int, rows: np.ndarray
) -> Tensor:
    """Feed the prompts into ``cache`` ``chunk`` tokens at a time; return the logits [len(rows), vocab]
    at the stream indices ``rows`` (sorted)."""
    device = next(model.parameters()).device
    image_id, per_tile = model.vlm_config.img_context_token_id, model.vlm_config.tokens_per_tile
    bounds = np.concatenate([[0], np.cumsum(prompts.lengths)])
    features_before = torch.cumsum(prompts.tokens == image_id, 0) - (prompts.tokens == image_id).long()
    logits = []
    for start in range(0, int(bounds[-1]), chunk):
        stop = min(start + chunk, int(bounds[-1]))
        counts = np.clip(bounds[1:], start, stop) - np.clip(bounds[:-1], start, stop)
        tokens = prompts.tokens[start:stop]
        first_feature = int(features_before[start])
        tiles, feature_index = chunk_images(tokens, first_feature, image_id, prompts.tiles, per_tile)
        wanted = rows[(rows >= start) & (rows < stop)] - start
        positions = prompts.positions[start:stop]
        with cache.extend(counts, positions.numpy()), logits_at(model, torch.from_numpy(wanted).to(device)):
            out = model(
                input_ids=tokens.to(device)[None],
                positions=positions.to(device)[None],
                pixel_values=None if tiles is None else tiles.to(device),
                packed_seq_params=packed_params(counts.tolist(), device),
                image_feature_index=feature_index.to(device),
            )
        logits.append(out[0])
    return torch.cat(logits)
