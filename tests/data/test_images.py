"""InternVL dynamic tiling and normalisation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_v2pe.data.images import (
    TilingConfig,
    choose_grid,
    decode_image,
    normalize_tiles,
    num_tiles,
    tile_image,
    tiling_for_images,
)


@pytest.mark.parametrize(
    ("width", "height", "max_tiles", "grid", "tiles"),
    [
        (448, 448, 6, (1, 1), 1),  # one cell: no thumbnail
        (896, 448, 6, (2, 1), 3),  # 2 cells + thumbnail
        (1000, 300, 6, (3, 1), 4),  # ratio 3.33: (3,1) is 0.33 away, (4,1) 0.67
        (300, 1000, 6, (1, 3), 4),
        (1000, 1000, 4, (2, 2), 5),  # (1,1) and (2,2) tie; the image is larger than half of 2x2 tiles
        (448, 448, 4, (1, 1), 1),  # same tie, but 448^2 is not more than half of 4 tiles
        (5000, 100, 6, (6, 1), 7),  # capped by max_tiles
        (5000, 100, 1, (1, 1), 1),
    ],
)
def test_grid_and_tile_count(width, height, max_tiles, grid, tiles):
    config = TilingConfig(tile_size=448, max_tiles=max_tiles)
    assert choose_grid(width, height, config) == grid
    assert num_tiles(width, height, config) == tiles


def test_tiles_are_cut_row_major_then_thumbnail():
    size = 56
    image = Image.new("RGB", (2 * size, 2 * size))
    colors = [
        (255, 0, 0),
        (0, 255, 0),
        (0, 0, 255),
        (255, 255, 0),
    ]  # top-left, top-right, bottom-left, bottom-right
    for k, color in enumerate(colors):
        image.paste(color, ((k % 2) * size, (k // 2) * size, (k % 2 + 1) * size, (k // 2 + 1) * size))
    tiles = tile_image(image, TilingConfig(tile_size=size, max_tiles=4))
    assert tiles.shape == (5, size, size, 3) and tiles.dtype == np.uint8
    for k, color in enumerate(colors):
        assert (tiles[k] == color).all()
    assert tuple(tiles[4, 5, 5]) == colors[0] and tuple(tiles[4, -5, -5]) == colors[3]  # thumbnail corners
    assert tile_image(image, TilingConfig(tile_size=size, max_tiles=4, use_thumbnail=False)).shape[0] == 4


def test_imagenet_normalisation():
    tiles = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    tiles[0, 0, 0] = (255, 128, 0)
    x = normalize_tiles(tiles)
    assert x.shape == (1, 3, 2, 2) and x.dtype == torch.float32
    expected = [(1.0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0.0 - 0.406) / 0.225]
    assert torch.allclose(x[0, :, 0, 0], torch.tensor(expected), atol=1e-6)


def test_decode_image_converts_to_rgb_and_reports_garbage():
    buffer = io.BytesIO()
    Image.new("RGBA", (3, 2), (1, 2, 3, 4)).save(buffer, format="PNG")
    image = decode_image(buffer.getvalue())
    assert image.mode == "RGB" and image.size == (3, 2)
    with pytest.raises(ValueError, match="cannot decode image"):
        decode_image(b"\x89PNG not really")
    with pytest.raises(ValueError, match="cannot decode image"):
        decode_image(buffer.getvalue()[:40])  # truncated


# Worked out by hand with InternVL's rule (the closest aspect ratio among grids of at most the budget's
# cells; on a tie the later, larger grid wins when the image has more than half its pixels). Budget 12
# (max_dynamic_patch); per_sample gives each of n images max(1, 12 // n).
@pytest.mark.parametrize(
    ("width", "height", "images", "per_image", "per_sample"),
    [
        (1344, 896, 1, ((3, 2), 7), ((3, 2), 7)),  # ratio 1.5 exactly
        (1344, 896, 4, ((3, 2), 7), ((2, 1), 3)),  # budget 3: (1,1) and (2,1) both 0.5 away; larger wins
        (1344, 896, 13, ((3, 2), 7), ((1, 1), 1)),  # budget max(1, 0): one tile, no thumbnail
        (1000, 1000, 2, ((3, 3), 10), ((2, 2), 5)),  # ties (1,1), (2,2), (3,3): 1e6 px > half of 9 tiles
        (2000, 1000, 2, ((4, 2), 9), ((2, 1), 3)),  # (4,2) ties (2,1) and 2e6 px > half of 8 tiles
        (800, 200, 5, ((4, 1), 5), ((2, 1), 3)),  # budget 2: (2,1) is 2 away, (1,1) 3
        (300, 1000, 3, ((1, 3), 4), ((1, 3), 4)),  # (2,6) ties (1,3) but 3e5 px < half of 12 tiles
        (448, 448, 13, ((1, 1), 1), ((1, 1), 1)),
    ],
)
def test_tile_budgets_against_a_hand_computed_table(width, height, images, per_image, per_sample):
    config = TilingConfig(tile_size=448, max_tiles=12)
    for budget, (grid, tiles) in (("per_image", per_image), ("per_sample", per_sample)):
        tiling = tiling_for_images(config, images, budget)
        assert (choose_grid(width, height, tiling), num_tiles(width, height, tiling)) == (grid, tiles), budget


def test_unknown_tile_budget_is_refused():
    with pytest.raises(ValueError, match="per_image"):
        tiling_for_images(TilingConfig(), 2, "shared")
