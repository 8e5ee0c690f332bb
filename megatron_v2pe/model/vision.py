"""InternViT (the vision tower of InternVL2) on Megatron-Core transformer layers.

InternViT is a pre-norm ViT whose layers differ from Megatron-Core's in two places, both on the residual
branches: a learned per-channel *layer scale* (``ls1``, ``ls2``) multiplies each branch output, and
*drop path* (stochastic depth) drops a whole branch per tile during training, at a rate that grows
linearly with depth. ``InternViTLayer`` adds both through the bias-dropout-add slot Megatron-Core calls
after each branch; everything else (norms, attention, MLP, tensor parallelism) is Megatron-Core's.

Attention is bidirectional: the specs built here set ``AttnMaskType.no_mask`` for every backend. There is
no final norm: InternViT-300M's ``InternVisionModel`` has none (HF's ``InternVLVisionModel`` neither, with
``use_mean_pooling=True``), and InternVL2 feeds the output of layer ``select_layer`` (the last, -1, for
every InternVL2 release) straight to pixel shuffle.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core.models.common.vision_module.vision_module import VisionModule
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from torch import Tensor

from megatron_v2pe.model.internvit_6b import internvit_6b_spec
from megatron_v2pe.model.layer_specs import base_layer_spec, replace_attention
from megatron_v2pe.model.presets import VisionConfig
from megatron_v2pe.parallel.attention_backends import AttentionBackend, resolve_attention_backend


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth on a residual branch x [s, b, h]: zero each tile's (b) branch with probability
    ``rate`` and scale the kept ones by 1 / (1 - rate), so the expectation is unchanged.

    The mask comes from the default generator, which is seeded alike on the ranks of a tensor-parallel
    group: their activations are replicated, so their masks must be too (the vision tower does not run
    under sequence parallelism, where Megatron forks its per-rank tracker).
    """
    if not training or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = x.new_empty(1, x.shape[1], 1).bernoulli_(keep).div_(keep)
    return x * mask


class InternViTLayer(TransformerLayer):
    """A Megatron-Core transformer layer with InternViT's residual branches:
    ``x + drop_path(ls1 * attn(norm1(x)))`` then ``x + drop_path(ls2 * mlp(norm2(x)))``.

    ``drop_path_rate`` is the rate of the last layer; layer i of L uses rate · i / (L - 1), like
    InternViT's ``torch.linspace(0, drop_path_rate, L)``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: TransformerLayerSubmodules,
        layer_number: int = 1,
        *,
        layer_scale_init: float = 0.1,
        drop_path_rate: float = 0.0,
        **kwargs,
    ):
        super().__init__(config, submodules, layer_number, **kwargs)
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.ls1 = torch.nn.Parameter(self._layer_scale(layer_scale_init))
        self.ls2 = torch.nn.Parameter(self._layer_scale(layer_scale_init))
        depth = (self.layer_number - 1) / max(config.num_layers - 1, 1)
        self.drop_path_rate = drop_path_rate * depth
        # Megatron-Core calls bda(training, fused)(output_with_bias, residual, dropout_prob) after each
        # branch; these take the place of the spec's plain bias-dropout-add.
        self.self_attn_bda = functools.partial(self._scaled_residual_add, "ls1")
        self.mlp_bda = functools.partial(self._scaled_residual_add, "ls2")

    def _layer_scale(self, value: float) -> Tensor:
        return torch.full((self.config.hidden_size,), value, dtype=self.config.params_dtype)

    def _scaled_residual_add(self, scale: str, training: bool, _fused: bool) -> Callable[..., Tensor]:
        return functools.partial(self._add_branch, getattr(self, scale), training)

    def _add_branch(
        self,
        scale: Tensor,
        training: bool,
        output_with_bias: tuple[Tensor, Optional[Tensor]],
        residual: Tensor,
        dropout_prob: float,
    ) -> Tensor:
        out, bias = output_with_bias
        if bias is not None:
            out = out + bias
        out = F.dropout(out, p=dropout_prob, training=training).to(residual.dtype)
        return residual + drop_path(out * scale, self.drop_path_rate, training)


def vision_layer_spec(backend: AttentionBackend = "auto", vision: VisionConfig | None = None) -> ModuleSpec:
    """An ``InternViTLayer`` spec with bidirectional (no-mask) attention for any attention backend, for the
    tower ``vision`` (InternViT-300M by default; InternViT-6B's differences: ``internvit_6b``). The
    TransformerConfig's normalization must be the tower's (``vision_transformer_config`` sets it)."""
    norm, qkv_bias, qk_norm = ("LayerNorm", True, False) if vision is None else (
        vision.normalization, vision.qkv_bias, vision.qk_normalization
    )
    spec = base_layer_spec(resolve_attention_backend(backend), normalization=norm)
    spec = replace_attention(
        spec, attention_params={"attn_mask_type": AttnMaskType.no_mask}, layer_module=InternViTLayer
    )
    return internvit_6b_spec(spec, qkv_bias=qkv_bias, qk_normalization=qk_norm)


class InternViTEmbeddings(MegatronModule):
    """Patch embedding (a strided Conv2d with bias), a learned CLS token and learned absolute positions
    [1, 1 + N, H] (CLS first), with InternViT's parameter names and layout."""

    def __init__(self, vision: VisionConfig, config: TransformerConfig):
        super().__init__(config=config)
        self.image_size = vision.image_size
        hidden, dtype = config.hidden_size, config.params_dtype
        self.patch_embedding = torch.nn.Conv2d(
            3, hidden, kernel_size=vision.patch_size, stride=vision.patch_size, bias=True, dtype=dtype
        )
        self.class_embedding = torch.nn.Parameter(torch.empty(1, 1, hidden, dtype=dtype))
        positions = 1 + vision.num_patches
        self.position_embedding = torch.nn.Parameter(torch.empty(1, positions, hidden, dtype=dtype))
        if config.perform_initialization:
            config.init_method(self.class_embedding)
            config.init_method(self.position_embedding)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [tiles, 3, image_size, image_size] -> [1 + N, tiles, H] (Megatron's [s, b, h])."""
        if tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"expected {self.image_size}x{self.image_size} tiles, got {tuple(pixel_values.shape)}; "
                "tiles are resized to the vision tower's image_size by the data pipeline"
            )
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # [tiles, N, H], patches in row-major order
        cls = self.class_embedding.expand(patches.shape[0], -1, -1)
        embeddings = torch.cat([cls, patches], dim=1) + self.position_embedding
        return embeddings.transpose(0, 1).contiguous()


class InternViTModel(VisionModule):
    """InternViT: embeddings -> ``InternViTLayer`` blocks (no final norm) -> patch features, CLS dropped.

    Args:
        vision: the architecture (``VLMConfig.vision``); its ``layer_scale_init`` and ``drop_path_rate``
            are handed to every layer of ``layer_spec``, which only chooses the modules.
        config: the vision TransformerConfig (``vision_transformer_config``), parallelism and precision.
        layer_spec: ``vision_layer_spec(backend)``.

    Features are the output of ``vision.feature_layers`` layers (``select_layer``). Layers past it stay in
    the model, so that checkpoints keep every weight of the release, but are frozen: like InternVL,
    which reads ``hidden_states[select_layer]``, they still run and never learn.
    """

    def __init__(
        self,
        vision: VisionConfig,
        config: TransformerConfig,
        layer_spec: ModuleSpec,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if config.sequence_parallel or config.context_parallel_size != 1:
            raise ValueError(
                "the vision tower runs whole tiles on every rank of its tensor-parallel group: build its "
                "TransformerConfig with sequence_parallel=False and context_parallel_size=1"
            )
        self.embeddings = InternViTEmbeddings(vision, config)
        layer_spec = dataclasses.replace(
            layer_spec,
            params={
                **layer_spec.params,
                "layer_scale_init": vision.layer_scale_init,
                "drop_path_rate": vision.drop_path_rate,
            },
        )
        self.decoder = TransformerBlock(
            config=config, spec=layer_spec, post_layer_norm=False, pg_collection=pg_collection
        )
        self.feature_layers = vision.feature_layers
        for layer in self.decoder.layers[self.feature_layers :]:
            layer.requires_grad_(False)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [tiles, 3, image_size, image_size] -> patch features [tiles, N, H], the layout
        ``VisionProjector`` takes (patches in row-major order within a tile)."""
        embeddings = self.embeddings(pixel_values)
        if self.feature_layers == len(self.decoder.layers):
            hidden = self.decoder(embeddings, attention_mask=None)
        else:  # Megatron-Core's own way to read a layer's output (layers are numbered from 0)
            _, (hidden,) = self.decoder(
                embeddings, attention_mask=None, extract_layer_indices={self.feature_layers - 1}
            )
        return hidden[1:].transpose(0, 1)
