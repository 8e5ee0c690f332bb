"""InternVL2 as OpenGVLab publishes it (remote-code ``InternVLChatModel``: InternViT + ``mlp1`` + InternLM2).

InternLM2's ``wqkv`` is already fused per KV group as [q x heads/kv_heads | k | v], Megatron's own layout,
so it maps unchanged; InternViT's ``attn.qkv`` is [q | k | v] over all heads and is regrouped per head.
``mlp1`` is ``Sequential(LayerNorm, Linear, GELU, Linear)``: indices 0, 1 and 3 hold weights.
"""

from __future__ import annotations

from typing import Any

from megatron_v2pe.convert.checks import config_differences
from megatron_v2pe.convert.mapping import IDENTITY, Concat, Rule, StackedQKV, TPSplit, layer_rules, rule
from megatron_v2pe.model.internvl_config import from_hf_config
from megatron_v2pe.model.presets import VLMConfig

COLUMN, ROW = TPSplit.COLUMN, TPSplit.ROW


def rules(config: VLMConfig) -> list[Rule]:
    vit = config.vision
    vit_qkv = StackedQKV(vit.num_attention_heads, vit.hidden_size // vit.num_attention_heads)
    vision_layer = [
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
    language_layer = [
        rule("attention_norm.weight", "input_layernorm.weight"),
        rule("attention.wqkv.weight", "self_attention.linear_qkv.weight", IDENTITY, COLUMN),
        rule("attention.wo.weight", "self_attention.linear_proj.weight", IDENTITY, ROW),
        rule("ffn_norm.weight", "pre_mlp_layernorm.weight"),
        rule(
            ("feed_forward.w1.weight", "feed_forward.w3.weight"),
            "mlp.linear_fc1.weight",
            Concat(2),
            TPSplit.GATED_COLUMN,
        ),
        rule("feed_forward.w2.weight", "mlp.linear_fc2.weight", IDENTITY, ROW),
    ]
    return [
        rule("vision_model.embeddings.class_embedding", "vision_model.embeddings.class_embedding"),
        rule("vision_model.embeddings.position_embedding", "vision_model.embeddings.position_embedding"),
        rule(
            "vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.patch_embedding.weight"
        ),
        rule("vision_model.embeddings.patch_embedding.bias", "vision_model.embeddings.patch_embedding.bias"),
        rule("mlp1.0.weight", "vision_projection.layer_norm.weight"),
        rule("mlp1.0.bias", "vision_projection.layer_norm.bias"),
        rule("mlp1.1.weight", "vision_projection.linear_fc1.weight", IDENTITY, COLUMN),
        rule("mlp1.1.bias", "vision_projection.linear_fc1.bias", IDENTITY, COLUMN),
        rule("mlp1.3.weight", "vision_projection.linear_fc2.weight", IDENTITY, ROW),
        rule("mlp1.3.bias", "vision_projection.linear_fc2.bias"),
        rule(
            "language_model.model.tok_embeddings.weight",
            "language_model.embedding.word_embeddings.weight",
            IDENTITY,
            COLUMN,
        ),
        rule("language_model.model.norm.weight", "language_model.decoder.final_layernorm.weight"),
        rule("language_model.output.weight", "language_model.output_layer.weight", IDENTITY, COLUMN),
        *layer_rules("vision", "vision_model.encoder.layers", "vision_model.decoder.layers", vision_layer),
        *layer_rules(
            "language", "language_model.model.layers", "language_model.decoder.layers", language_layer
        ),
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
    differences = config_differences(read_config(reference, config.img_context_token_id), config)
    if differences:
        raise ValueError("the reference config.json does not describe this model: " + "; ".join(differences))
    return dict(reference)
