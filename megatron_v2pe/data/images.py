"""InternVL dynamic tiling: an image becomes a grid of square tiles plus a thumbnail.

The grid is the (columns, rows) with at most ``max_tiles`` cells whose aspect ratio is closest to the
image's; the image is resized to fill it (bicubic) and cut in row-major order. When the grid has more
than one cell, the whole image resized to one tile is appended as a thumbnail. Every tile becomes
``tokens_per_tile`` ``<IMG_CONTEXT>`` slots, so the tile count fixes the image's token count.

How many grid tiles each image of a sample may use is the *tile budget*: ``per_sample`` (InternVL's main
recipe, its ``dynamic_max_patch=True``) lets each of n images have ``max(1, max_tiles // n)``;
``per_image`` (the V2PE recipe, ``dynamic_max_patch=False``) lets every image have ``max_tiles`` whatever
the number of images.

Tiles stay uint8 (HWC) until a pack is assembled: a quarter of the memory of float32 while they wait in
the packing buffer. ``normalize_tiles`` then applies ImageNet normalisation, as InternVL's ToTensor +
Normalize do.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from megatron_v2pe.model.presets import TILE_BUDGETS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TilingConfig:
    """tile_size comes from the vision tower (448 for InternViT-300M-448px)."""

    tile_size: int = 448
    max_tiles: int = 6
    min_tiles: int = 1
    use_thumbnail: bool = True

    def __post_init__(self) -> None:
        if self.tile_size < 1 or not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(
                f"need tile_size >= 1 and 1 <= min_tiles <= max_tiles, got tile_size={self.tile_size}, "
                f"min_tiles={self.min_tiles}, max_tiles={self.max_tiles}"
            )


def tiling_for_images(config: TilingConfig, num_images: int, budget: str) -> TilingConfig:
    """The tiling each of a sample's ``num_images`` images gets under a tile budget (TILE_BUDGETS)."""
    if budget == "per_image":
        return config
    if budget != "per_sample":
        raise ValueError(f"unknown tile budget {budget!r}; choose one of {TILE_BUDGETS}")
    share = max(1, config.max_tiles // max(num_images, 1))
    return dataclasses.replace(config, max_tiles=share, min_tiles=min(config.min_tiles, share))


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """(columns, rows) with min_tiles <= cells <= max_tiles, fewest cells first. Built exactly as InternVL
    builds it (a set sorted by area), so that grids of equal area are tried in the same order."""
    grids = {
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    }
    return sorted(grids, key=lambda grid: grid[0] * grid[1])


def choose_grid(width: int, height: int, config: TilingConfig) -> tuple[int, int]:
    """The grid whose aspect ratio is closest to width/height; on a tie, the larger grid wins when the
    image has more than half its pixel count (InternVL's rule)."""
    aspect_ratio = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(config.min_tiles, config.max_tiles):
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * config.tile_size**2 * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(width: int, height: int, config: TilingConfig) -> int:
    """Tiles an image of this size becomes, thumbnail included."""
    cols, rows = choose_grid(width, height, config)
    cells = cols * rows
    return cells + 1 if config.use_thumbnail and cells > 1 else cells


def tile_image(image: Image.Image, config: TilingConfig) -> np.ndarray:
    """uint8 tiles [T, tile_size, tile_size, 3] of an RGB image, grid cells in row-major order, then the
    thumbnail."""
    size = config.tile_size
    cols, rows = choose_grid(image.width, image.height, config)
    grid = np.asarray(image.resize((cols * size, rows * size), Image.Resampling.BICUBIC))
    tiles = (
        grid.reshape(rows, size, cols, size, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, size, size, 3)
    )
    if config.use_thumbnail and rows * cols > 1:
        thumbnail = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC))
        tiles = np.concatenate([tiles, thumbnail[None]])
    return np.ascontiguousarray(tiles)


def normalize_tiles(tiles: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [T, 3, H, W] of uint8 [T, H, W, 3] tiles: x / 255, then (x - mean) / std per channel.
    With `out`, written there without any temporary (packs assemble their pixels in place)."""
    t, h, w, _ = tiles.shape
    out = torch.empty(t, 3, h, w) if out is None else out
    out.copy_(torch.from_numpy(tiles).permute(0, 3, 1, 2))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return out.div_(255).sub_(mean).div_(std)


def decode_image(data: bytes) -> Image.Image:
    """An RGB image from encoded bytes; ValueError (with the decoder's reason) if they do not decode."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise ValueError(f"cannot decode image ({type(err).__name__}: {err})") from err


def encode_png(image: Image.Image) -> bytes:
    """Lossless bytes of an image (for images whose pixels must survive exactly)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
