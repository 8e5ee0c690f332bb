"""The ``model:`` section of the training YAML: which architecture, and how it is trained (frozen parts,
activation recompute, fusions), with ``vlm_config`` resolving it to a VLMConfig."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Literal

from megatron_v2pe.model.internvl_config import from_hf_config
from megatron_v2pe.model.presets import VLMConfig, preset, tiny
from megatron_v2pe.parallel.attention_backends import AttentionBackend

logger = logging.getLogger("megatron_v2pe.model")

VOCAB_MULTIPLE = 128  # Megatron-LM's make_vocab_size_divisible_by

RecomputeGranularity = Literal["full", "selective"]
RecomputeMethod = Literal["uniform", "block"]  # block: the first recompute_num_layers
RecomputeModule = Literal["core_attn", "mlp", "layernorm"]  # layernorm: TE layers only


@dataclass
class ModelConfig:
    preset: str = "tiny"  # tiny | internvl2_2b (model/presets.py)
    hf_config: str | None = None  # an InternVL2 config.json (or its directory); replaces the preset
    vocab_size: int | None = None  # tiny only; default: the tokenizer's
    img_context_token_id: int | None = None  # tiny only; default: the tokenizer's <IMG_CONTEXT>
    vision_drop_path_rate: float | None = None  # InternViT stochastic depth; None keeps the preset's
    rotary_base: float | None = None  # the language model's RoPE base; None keeps the preset's (1e6)
    attention_backend: AttentionBackend = "auto"
    freeze_vision: bool = False
    freeze_projector: bool = False
    freeze_language: bool = False
    recompute_granularity: RecomputeGranularity | None = None  # activation checkpointing
    recompute_method: RecomputeMethod = "uniform"
    recompute_num_layers: int = 1
    recompute_modules: list[RecomputeModule] | None = None  # selective: what to recompute; None: core_attn
    # Faster paths that compute the same (model/fusions.py); off until measured faster on the GPU.
    loss_chunk_tokens: int | None = None  # cross entropy over chunks of this many tokens, no full logits
    compiled_norm: bool = False  # torch.compile'd RMSNorm in the local (non-TE) layers
    fused_swiglu: bool = False  # Megatron-Core's fused SwiGLU (TransformerConfig.bias_activation_fusion)

    def recompute_fields(self) -> dict[str, Any]:
        """The TransformerConfig fields of the recompute choice (none without recompute)."""
        if self.recompute_granularity is None:
            return {}
        fields: dict[str, Any] = {"recompute_granularity": self.recompute_granularity}
        if self.recompute_granularity == "full":
            fields.update(
                recompute_method=self.recompute_method, recompute_num_layers=self.recompute_num_layers
            )
        elif self.recompute_modules is not None:
            fields.update(recompute_modules=list(self.recompute_modules))
        return fields


def vlm_config(model: ModelConfig, tokenizer_vocab_size: int, tokenizer_img_context_id: int) -> VLMConfig:
    """The architecture: a preset or an HF config.json with the section's overrides; the tiny preset
    takes the tokenizer's <IMG_CONTEXT> id and vocabulary, padded to a multiple of 128 as Megatron-LM's
    make_vocab_size_divisible_by pads: as in Megatron-LM those extra ids are part of the tiny model's own
    vocabulary (trained, never masked), so any TP size up to 128 splits it unpadded. A release's
    vocabulary is its tokenizer's; the model pads it to what the TP size splits and masks the padding
    (``language_model.V2PEGPTModel``)."""
    if model.hf_config:
        vlm = from_hf_config(model.hf_config, img_context_token_id=model.img_context_token_id)
    elif model.preset == "tiny":
        padded = -(-tokenizer_vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        vlm = tiny(vocab_size=padded, img_context_token_id=tokenizer_img_context_id)
    else:
        vlm = preset(model.preset)
    language = {"vocab_size": model.vocab_size, "rotary_base": model.rotary_base}
    vlm = dataclasses.replace(
        vlm,
        language=dataclasses.replace(vlm.language, **{k: v for k, v in language.items() if v is not None}),
        img_context_token_id=_unless_none(model.img_context_token_id, vlm.img_context_token_id),
        vision=dataclasses.replace(
            vlm.vision, drop_path_rate=_unless_none(model.vision_drop_path_rate, vlm.vision.drop_path_rate)
        ),
    )
    if vlm.language.dynamic_ntk_factor is not None:
        logger.info("training with plain RoPE: the config's dynamic NTK scaling is dropped, as V2PE does")
        vlm = dataclasses.replace(vlm, language=dataclasses.replace(vlm.language, dynamic_ntk_factor=None))
    return vlm


def _unless_none(value: Any, default: Any) -> Any:
    return default if value is None else value
