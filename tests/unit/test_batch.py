"""PackedBatch layout: sub-samples padded to a multiple, and a pack lengthened for pipeline stages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_v2pe.batch import IGNORE_INDEX, PackedBatch, SubSample
from megatron_v2pe.v2pe.positions import FixedDelta

IMG, PAD, I = 7, 0, IGNORE_INDEX


def two_sub_samples(**overrides) -> PackedBatch:
    """[text, image of two slots, text, text] and [text, text], padded to multiples of 4, δ = 1/2."""
    arguments = dict(
        pixel_values=torch.zeros(1, 3, 2, 2),
        tiles_per_image=torch.tensor([1]),
        pad_multiple=4,
        pad_token_id=PAD,
        img_context_id=IMG,
        delta_policy=FixedDelta(0.5),
        rng=None,
    )
    sequences = [
        SubSample(np.array([11, IMG, IMG, 12, 13]), np.array([I, I, 12, 13, I]), np.array([0, 0, 1, 1, 0.0])),
        SubSample(np.array([14, 15]), np.array([15, I]), np.array([1, 0.0])),
    ]
    return PackedBatch.from_sequences(sequences, **(arguments | overrides))


def test_from_sequences_pads_each_sub_sample_to_the_multiple():
    batch = two_sub_samples()
    assert batch.tokens.tolist() == [11, IMG, IMG, 12, 13, PAD, PAD, PAD, 14, 15, PAD, PAD]
    assert batch.labels.tolist() == [I, I, 12, 13, I, I, I, I, 15, I, I, I]
    assert batch.loss_weights.tolist() == [0, 0, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0]
    # text +1, visual +δ; restarting at 0 per sub-sample; padding continues as text
    assert batch.positions.tolist() == [0, 0.5, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3]
    assert batch.cu_seqlens.tolist() == [0, 5, 7]
    assert batch.cu_seqlens_padded.tolist() == [0, 8, 12]
    assert batch.deltas.tolist() == [0.5]
    assert (batch.tokens.dtype, batch.loss_weights.dtype, batch.positions.dtype) == (
        torch.int64, torch.float32, torch.float64
    )


def test_padding_with_the_image_token_is_refused():
    with pytest.raises(ValueError, match="padding must be a text token"):
        two_sub_samples(pad_token_id=IMG)


def test_padded_to_extends_the_last_sub_sample():
    batch = two_sub_samples().padded_to(16, PAD)
    assert batch.tokens.tolist()[12:] == [PAD] * 4
    assert batch.labels.tolist()[12:] == [I] * 4
    assert batch.loss_weights.tolist()[12:] == [0] * 4
    assert batch.positions.tolist()[8:] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert batch.cu_seqlens.tolist() == [0, 5, 7]
    assert batch.cu_seqlens_padded.tolist() == [0, 8, 16]


def test_padded_to_its_own_length_is_the_same_pack_and_shorter_is_refused():
    batch = two_sub_samples()
    assert batch.padded_to(12, PAD) is batch
    with pytest.raises(ValueError, match="cannot pad a pack of 12 tokens to 10"):
        batch.padded_to(10, PAD)
