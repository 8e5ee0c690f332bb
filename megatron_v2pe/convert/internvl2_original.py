"""InternVL as OpenGVLab publishes it (remote-code ``InternVLChatModel``: InternViT + ``mlp1`` + the LLM
under ``language_model.``, named as its family publishes it: ``language_tables``).

InternViT's ``attn.qkv`` is [q | k | v] over all heads and is regrouped per head.
``mlp1`` is ``Sequential(LayerNorm, Linear, GELU, Linear)``: indices 0, 1 and 3 hold weights.
"""

from __future__ import annotations

from typing import Any

from megatron_v2pe.convert.language_tables import language_rules
from megatron_v2pe.convert.mapping import IDENTITY, Rule, StackedQKV, TPSplit, layer_rules, rule
from megatron_v2pe.convert.vision_towers import for_tower
from megatron_v2pe.model.architecture import config_differences
from megatron_v2pe.model.internvl_config import from_hf_config
from megatron_v2pe.model.presets import VLMConfig

COLUMN, ROW = TPSplit.COLUMN, TPSplit.ROW


VISION_OUTSIDE_LAYERS = [
    rule("vision_model.embeddings.class_embedding", "vision_model.embeddings.class_embedding"),
    rule("vision_model.embeddings.position_embedding", "vision_model.embeddings.position_embedding"),
    rule("vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.patch_embedding.weight"),
    rule("vision_model.embeddings.patch_embedding.bias", "vision_model.embeddings.patch_embedding.bias"),
]
PROJECTOR = [
    rule("mlp1.0.weight", "vision_projection.layer_norm.weight"),
    rule("mlp1.0.bias", "vision_projection.layer_norm.bias"),
    rule("mlp1.1.weight", "vision_projection.linear_fc1.weight", IDENTITY, COLUMN),
    rule("mlp1.1.bias", "vision_projection.linear_fc1.bias", IDENTITY, COLUMN),
    rule("mlp1.3.weight", "vision_projection.linear_fc2.weight", IDENTITY, ROW),
    rule("mlp1.3.bias", "vision_projection.linear_fc2.bias"),
]


def vision_layer(config: VLMConfig) -> list[Rule]:
    vit = config.vision
    vit_qkv = StackedQKV(vit.num_attention_heads, vit.hidden_size // vit.num_attention_heads)
    internvit_300m = [
        rule("ls1", "ls1"),
        rule("ls2", "ls2"),
        rule("norm1.weight", "input_layernorm.weight"),
        rule("norm1.bias", "input_layernorm.bias"),
        rule("attn.qkv.weight", "self_attention.linear_qkv.weight", vit_qkv, COLUMN),
        rule("attn.qkv.bias", "self_attention.linear_qkv.bias", vit_qkv, COLUMN),
        rule("attn.proj.weight", "self_attention.linear_proj.weight", IDENTITY, ROW),
        rule("attn.proj.bias", "self_attention.linear_proj.bias"),
        rule("norm2.weight", "pre_mlp_layernorm.weight"),
        rule("norm2.bias", "pre_mlp_layernorm.bias"),
        rule("mlp.fc1.weight", "mlp.linear_fc1.weight", IDENTITY, COLUMN),
        rule("mlp.fc1.bias", "mlp.linear_fc1.bias", IDENTITY, COLUMN),
        rule("mlp.fc2.weight", "mlp.linear_fc2.weight", IDENTITY, ROW),
        rule("mlp.fc2.bias", "mlp.linear_fc2.bias"),
    ]
    return for_tower(internvit_300m, vit, "attn.q_norm.weight", "attn.k_norm.weight")


def naming(config: VLMConfig) -> str:
    """InternLM2 releases keep InternLM2's fused names; Qwen2, Qwen3 and Llama ones are Llama-named."""
    return "internlm2" if config.language.family == "internlm2" else "llama"


def rules(config: VLMConfig) -> list[Rule]:
    return [
        *VISION_OUTSIDE_LAYERS,
        *PROJECTOR,
        *layer_rules(
            "vision", "vision_model.encoder.layers", "vision_model.decoder.layers", vision_layer(config)
        ),
        *language_rules(config.language, naming(config)),
    ]


def read_config(hf: dict[str, Any], img_context_token_id: int | None = None) -> VLMConfig:
    """The architecture of an InternVL2 ``config.json`` (its `<IMG_CONTEXT>` id lives in the tokenizer:
    InternVL2-2B's unless given)."""
    return from_hf_config(hf, img_context_token_id)


def write_config(config: VLMConfig, reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """The released model's ``config.json`` (``reference``), checked against ``config``: the InternVL2
    layout runs on OpenGVLab's remote code, whose config fields only that release defines."""
    if reference is None:
        raise ValueError(
            "exporting to the InternVL2 layout needs the released model directory (--reference): its "
            "config.json and remote code are reused"
        )
    released = read_config(reference, config.img_context_token_id)
    differences = config_differences(released, config)
    if naming(released) != naming(config):
        differences.append(
            f"language_model tensors are named as {released.language.family} in the release and as "
            f"{config.language.family} here: set language.family in vlm_config.json to "
            f"{released.language.family!r}"
        )
    if differences:
        raise ValueError("the reference config.json does not describe this model: " + "; ".join(differences))
    return dict(reference)
