"""Pixel shuffle against its index formula, and the projector against a float64 reference."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from megatron_v2pe.model.presets import language_transformer_config, tiny
from megatron_v2pe.model.projector import VisionProjector, pixel_shuffle
from tests.model.reference_vit import reference_pixel_shuffle, reference_projector

TINY = tiny()


@pytest.mark.parametrize(("side", "scale"), [(4, 0.5), (6, 1 / 3), (8, 0.25), (32, 0.5)])
def test_pixel_shuffle_matches_the_index_formula(side, scale):
    """Output token (r, c) of the folded grid, channel (i·k + j)·C + ch, is input patch
    (r·k + i, c·k + j), channel ch: InternVL2's 'v2' order. Checked element by element."""
    n, channels, k = 2, 3, round(1 / scale)
    x = torch.arange(n * side * side * channels, dtype=torch.float64).reshape(n, side * side, channels)
    out = pixel_shuffle(x, scale)
    folded = side // k
    assert out.shape == (n, folded * folded, k * k * channels)
    for b, r, c, i, j, ch in itertools.product(*map(range, (n, folded, folded, k, k, channels))):
        source = x[b, (r * k + i) * side + (c * k + j), ch]
        assert out[b, r * folded + c, (i * k + j) * channels + ch] == source


@pytest.mark.parametrize(("side", "scale"), [(4, 0.5), (6, 1 / 3)])
def test_pixel_shuffle_v1_lists_the_folded_grid_column_major(side, scale):
    """ps_version 'v1' (InternVL's configuration default): the same tokens, token (r, c) at c·s + r."""
    n, channels, k = 2, 3, round(1 / scale)
    x = torch.arange(n * side * side * channels, dtype=torch.float64).reshape(n, side * side, channels)
    out = pixel_shuffle(x, scale, "v1")
    folded = side // k
    for b, r, c, i, j, ch in itertools.product(*map(range, (n, folded, folded, k, k, channels))):
        source = x[b, (r * k + i) * side + (c * k + j), ch]
        assert out[b, c * folded + r, (i * k + j) * channels + ch] == source
    assert not torch.equal(out, pixel_shuffle(x, scale, "v2"))
    with pytest.raises(ValueError, match="'v1' or 'v2'"):
        pixel_shuffle(x, scale, "v3")


def test_pixel_shuffle_rejects_grids_it_cannot_fold():
    with pytest.raises(ValueError, match="square"):
        pixel_shuffle(torch.zeros(1, 12, 4), 0.5)
    with pytest.raises(ValueError, match="fold"):
        pixel_shuffle(torch.zeros(1, 9, 4), 0.5)


@pytest.mark.usefixtures("megatron_runtime")
@pytest.mark.parametrize("ps_version", ["v2", "v1"])
def test_projector_matches_float64_reference_tile_major(ps_version):
    torch.manual_seed(0)
    config = dataclasses.replace(TINY, ps_version=ps_version)
    projector = VisionProjector(config, language_transformer_config(config)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in projector.parameters():
            fan_in = param[0].numel() if param.dim() > 1 else 1
            param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(fan_in))
    tiles, patches, width = 3, TINY.vision.num_patches, TINY.vision.hidden_size
    features = torch.randn(tiles, patches, width, generator=gen)
    with torch.no_grad():
        got = projector(features)
        per_tile = [projector(features[t : t + 1]) for t in range(tiles)]
    tokens = reference_pixel_shuffle(features.double(), TINY.shuffle_factor, ps_version)
    expected = reference_projector(projector.state_dict(), tokens.reshape(-1, tokens.shape[-1]))
    assert got.shape == (tiles * TINY.tokens_per_tile, TINY.language.hidden_size)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    # Batched and per-tile runs use matrices of other shapes, so BLAS may pick other kernels: equal to
    # rounding, not bit for bit.
    torch.testing.assert_close(got, torch.cat(per_tile), atol=1e-5, rtol=1e-5)
