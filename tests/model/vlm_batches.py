"""Small packed image-text batches for model tests, built directly (independently of the data pipeline)."""

from __future__ import annotations

import numpy as np
import torch

from megatron_v2pe.batch import IGNORE_INDEX, PackedBatch
from megatron_v2pe.model.presets import VLMConfig
from megatron_v2pe.v2pe.positions import compute_positions

IMG_START, IMG_END = 1, 2
FIRST_TEXT_ID = 10


def sub_sample(config: VLMConfig, rng: np.random.Generator, layout: list) -> dict:
    """``layout`` is a list of ints (runs of text tokens) and ('image', tiles, δ) tuples."""
    tokens, deltas, tiles = [], [], []
    for part in layout:
        if isinstance(part, int):
            tokens += rng.integers(FIRST_TEXT_ID, config.language.vocab_size, part).tolist()
        else:
            _, n_tiles, delta = part
            tokens += [IMG_START] + [config.img_context_token_id] * (n_tiles * config.tokens_per_tile) + [IMG_END]
            deltas.append(delta)
            tiles.append(n_tiles)
    tokens = np.array(tokens)
    visual = tokens == config.img_context_token_id
    labels = np.append(tokens[1:], IGNORE_INDEX)
    supervised = (labels != IGNORE_INDEX) & (labels != config.img_context_token_id)
    labels[~supervised] = IGNORE_INDEX
    size = config.vision.image_size
    return dict(
        tokens=tokens, labels=labels, positions=compute_positions(visual, np.array(deltas, dtype=float)),
        weights=supervised / np.sqrt(max(1, supervised.sum())),  # the "square" weighting
        pixels=torch.from_numpy(rng.standard_normal((sum(tiles), 3, size, size))).float(),
        tiles=tiles, deltas=deltas,
    )


def _padded(sample: dict, length: int) -> dict:
    """The sample with padding tokens (id 0, no loss, text-like positions) up to ``length``."""
    extra = length - len(sample["tokens"])
    last = sample["positions"][-1]
    return dict(
        sample,
        tokens=np.append(sample["tokens"], np.zeros(extra, dtype=int)),
        labels=np.append(sample["labels"], np.full(extra, IGNORE_INDEX)),
        weights=np.append(sample["weights"], np.zeros(extra)),
        positions=np.append(sample["positions"], last + 1 + np.arange(extra)),
    )


def pack(samples: list[dict], pad_multiple: int = 1, total: int | None = None) -> PackedBatch:
    """Pack sub-samples, each padded to a multiple of ``pad_multiple`` (the last one further, to
    ``total`` tokens if given)."""
    lengths = [len(s["tokens"]) for s in samples]
    padded_lengths = [-(-n // pad_multiple) * pad_multiple for n in lengths]
    if total is not None:
        if total < sum(padded_lengths) or (total - sum(padded_lengths)) % pad_multiple:
            raise ValueError(f"cannot pad {padded_lengths} to {total} tokens")
        padded_lengths[-1] += total - sum(padded_lengths)
    samples = [_padded(s, n) for s, n in zip(samples, padded_lengths)]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    cu_padded = torch.tensor(np.concatenate([[0], np.cumsum(padded_lengths)]), dtype=torch.int32)
    cat = lambda key: np.concatenate([s[key] for s in samples])  # noqa: E731
    return PackedBatch(
        tokens=torch.from_numpy(cat("tokens")).long(),
        labels=torch.from_numpy(cat("labels")).long(),
        loss_weights=torch.from_numpy(cat("weights")).float(),
        positions=torch.from_numpy(cat("positions")),
        cu_seqlens=cu,
        cu_seqlens_padded=cu_padded,
        pixel_values=torch.cat([s["pixels"] for s in samples]),
        tiles_per_image=torch.tensor([t for s in samples for t in s["tiles"]], dtype=torch.long),
        deltas=torch.tensor([d for s in samples for d in s["deltas"]], dtype=torch.float64),
    )


def three_sample_pack(config: VLMConfig, seed: int = 0) -> tuple[PackedBatch, list[PackedBatch]]:
    """A pack of three sub-samples with images at different δ, and each sub-sample packed alone."""
    rng = np.random.default_rng(seed)
    layouts = [
        [5, ("image", 2, 0.25), 7, ("image", 1, 1.0), 4],
        [9, ("image", 1, 1 / 256), 6],
        [3, ("image", 3, 0.5), 11],
    ]
    samples = [sub_sample(config, rng, layout) for layout in layouts]
    return pack(samples), [pack([s]) for s in samples]
