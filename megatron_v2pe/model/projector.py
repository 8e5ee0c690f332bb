"""From InternViT patch features to language-model embeddings: pixel shuffle, then InternVL2's ``mlp1``.

Pixel shuffle folds each k x k block of neighbouring patches (k = 1 / downsample_ratio) into one token of
k² · C channels; the MLP maps it to the language model's hidden size. The output is in the order the VLM
writes into ``<IMG_CONTEXT>`` slots: tile by tile, and within a tile row-major over the shuffled grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_v2pe.model.presets import VLMConfig

PROJECTOR_LAYERNORM_EPS = 1e-5
"""InternVL2's ``mlp1`` uses ``nn.LayerNorm`` with its default eps (the ViT's norms use 1e-6)."""


def pixel_shuffle(x: Tensor, scale: float, version: str = "v2") -> Tensor:
    """[n, N, C] patch features (row-major h x w grid, h = w = √N) -> [n, N·scale², C/scale²].

    InternVL2's ``pixel_shuffle``, step for step, so that pretrained projector weights see the channel
    order they were trained with: output token (r, c) of the (h·scale) x (w·scale) grid holds the patches
    (r·k + i, c·k + j) for i, j < k = 1/scale, channels ordered (i, j, C). ``version='v2'`` lists the
    tokens row-major (r then c); ``'v1'`` (the configuration class's default) leaves the grid transposed
    and lists them column-major (c then r).
    """
    n, num_patches, channels = x.shape
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"pixel_shuffle needs a square grid of patches, got {num_patches}")
    k = round(1 / scale)
    if side % k:
        raise ValueError(f"a grid of {side}x{side} patches does not fold by {k}x{k}")
    x = x.reshape(n, side, side, channels)
    x = x.reshape(n, side, side // k, channels * k)  # fold k neighbours along a row into channels
    x = x.permute(0, 2, 1, 3).reshape(n, side // k, side // k, channels * k * k)  # ... and k rows
    if version == "v2":
        x = x.permute(0, 2, 1, 3)  # back to the rows-then-columns orientation of the patch grid
    elif version != "v1":
        raise ValueError(f"pixel shuffle version must be 'v1' or 'v2', got {version!r}")
    return x.reshape(n, num_patches // (k * k), channels * k * k)


class VisionProjector(MegatronModule):
    """Pixel shuffle + InternVL2's ``mlp1``: LayerNorm(k²·C) -> Linear(k²·C -> D) -> GELU ->
    Linear(D -> D), D the language model's hidden size; the linears are tensor parallel (column, then row).

    Args:
        vlm: the architecture (vision hidden size, downsample ratio, language hidden size).
        config: the TransformerConfig the linears run under: the language model's parallelism and
            precision, without sequence parallelism (image tokens are not split across ranks here).
    """

    def __init__(self, vlm: VLMConfig, config: TransformerConfig):
        super().__init__(config=config)
        if config.sequence_parallel:
            raise ValueError("build the projector's TransformerConfig with sequence_parallel=False")
        self.downsample_ratio = vlm.downsample_ratio
        self.ps_version = vlm.ps_version
        width, hidden = vlm.projector_input_size, vlm.language.hidden_size
        self.layer_norm = torch.nn.LayerNorm(width, eps=PROJECTOR_LAYERNORM_EPS, dtype=config.params_dtype)
        self.linear_fc1 = tensor_parallel.ColumnParallelLinear(
            width, hidden, config=config, init_method=config.init_method, bias=True, gather_output=False
        )
        self.linear_fc2 = tensor_parallel.RowParallelLinear(
            hidden, hidden, config=config, init_method=config.output_layer_init_method, bias=True,
            input_is_parallel=True, skip_bias_add=False,
        )

    def forward(self, vit_features: Tensor) -> Tensor:
        """[tiles, N, C] (``InternViTModel``'s output) -> [tiles · tokens_per_tile, D], tile-major."""
        tokens = pixel_shuffle(vit_features, self.downsample_ratio, self.ps_version)
        tokens = tokens.reshape(-1, tokens.shape[-1])
        hidden, _ = self.linear_fc1(self.layer_norm(tokens))
        hidden, _ = self.linear_fc2(F.gelu(hidden))
        return hidden
