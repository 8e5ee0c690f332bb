"""transformers' own ``InternVLForConditionalGeneration`` (Llama text model), as ``save_pretrained``
writes it.

InternLM2 is Llama with fused weights: its ``wqkv`` splits into ``q_proj``/``k_proj``/``v_proj`` and its
``w1``/``w3`` are ``gate_proj``/``up_proj``, so the exported model loads with plain ``from_pretrained``
(no remote code). Names are the on-disk ones (``language_model.model.*``, ``vision_tower.*``), which
transformers maps onto its module tree when loading.
"""

from __future__ import annotations

from typing import Any

from megatron_v2pe.convert.mapping import IDENTITY, Concat, Rule, SeparateQKV, TPSplit, layer_rules, rule
from megatron_v2pe.model.presets import LanguageConfig, VisionConfig, VLMConfig

COLUMN, ROW = TPSplit.COLUMN, TPSplit.ROW


def rules(config: VLMConfig) -> list[Rule]:
    vit, lm = config.vision, config.language
    vit_qkv = SeparateQKV(
        vit.num_attention_heads, vit.num_attention_heads, vit.hidden_size // vit.num_attention_heads
    )
    lm_qkv = SeparateQKV(
        lm.num_attention_heads, lm.num_query_groups, lm.hidden_size // lm.num_attention_heads
    )
    qkv = lambda kind: tuple(f"attention.{p}_proj.{kind}" for p in "qkv")
    vision_layer = [
        rule("lambda_1", "ls1"),
        rule("lambda_2", "ls2"),
        rule("layernorm_before.weight", "input_layernorm.weight"),
        rule("layernorm_before.bias", "input_layernorm.bias"),
        rule(qkv("weight"), "self_attention.linear_qkv.weight", vit_qkv, COLUMN),
        rule(qkv("bias"), "self_attention.linear_qkv.bias", vit_qkv, COLUMN),
        rule("attention.projection_layer.weight", "self_attention.linear_proj.weight", IDENTITY, ROW),
        rule("attention.projection_layer.bias", "self_attention.linear_proj.bias"),
        rule("layernorm_after.weight", "pre_mlp_layernorm.weight"),
        rule("layernorm_after.bias", "pre_mlp_layernorm.bias"),
        rule("mlp.fc1.weight", "mlp.linear_fc1.weight", IDENTITY, COLUMN),
        rule("mlp.fc1.bias", "mlp.linear_fc1.bias", IDENTITY, COLUMN),
        rule("mlp.fc2.weight", "mlp.linear_fc2.weight", IDENTITY, ROW),
        rule("mlp.fc2.bias", "mlp.linear_fc2.bias"),
    ]
    language_layer = [
        rule("input_layernorm.weight", "input_layernorm.weight"),
        rule(
            tuple(f"self_attn.{p}_proj.weight" for p in "qkv"),
            "self_attention.linear_qkv.weight",
            lm_qkv,
            COLUMN,
        ),
        rule("self_attn.o_proj.weight", "self_attention.linear_proj.weight", IDENTITY, ROW),
        rule("post_attention_layernorm.weight", "pre_mlp_layernorm.weight"),
        rule(
            ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
            "mlp.linear_fc1.weight",
            Concat(2),
            TPSplit.GATED_COLUMN,
        ),
        rule("mlp.down_proj.weight", "mlp.linear_fc2.weight", IDENTITY, ROW),
    ]
    return [
        rule("vision_tower.embeddings.cls_token", "vision_model.embeddings.class_embedding"),
        rule("vision_tower.embeddings.position_embeddings", "vision_model.embeddings.position_embedding"),
        rule(
            "vision_tower.embeddings.patch_embeddings.projection.weight",
            "vision_model.embeddings.patch_embedding.weight",
        ),
        rule(
            "vision_tower.embeddings.patch_embeddings.projection.bias",
            "vision_model.embeddings.patch_embedding.bias",
        ),
        rule("multi_modal_projector.layer_norm.weight", "vision_projection.layer_norm.weight"),
        rule("multi_modal_projector.layer_norm.bias", "vision_projection.layer_norm.bias"),
        rule(
            "multi_modal_projector.linear_1.weight", "vision_projection.linear_fc1.weight", IDENTITY, COLUMN
        ),
        rule("multi_modal_projector.linear_1.bias", "vision_projection.linear_fc1.bias", IDENTITY, COLUMN),
        rule("multi_modal_projector.linear_2.weight", "vision_projection.linear_fc2.weight", IDENTITY, ROW),
        rule("multi_modal_projector.linear_2.bias", "vision_projection.linear_fc2.bias"),
        rule(
            "language_model.model.embed_tokens.weight",
            "language_model.embedding.word_embeddings.weight",
            IDENTITY,
            COLUMN,
        ),
        rule("language_model.model.norm.weight", "language_model.decoder.final_layernorm.weight"),
        rule("language_model.lm_head.weight", "language_model.output_layer.weight", IDENTITY, COLUMN),
        *layer_rules("vision", "vision_tower.encoder.layer", "vision_model.decoder.layers", vision_layer),
        *layer_rules(
            "language", "language_model.model.layers", "language_model.decoder.layers", language_layer
        ),
    ]


def read_config(hf: dict[str, Any], img_context_token_id: int | None = None) -> VLMConfig:
    """The architecture of a transformers-native InternVL ``config.json``."""
    try:
        vit, llm = hf["vision_config"], hf["text_config"]
        size = lambda v: v[0] if isinstance(v, list | tuple) else v
        vision = VisionConfig(
            num_layers=vit["num_hidden_layers"],
            hidden_size=vit["hidden_size"],
            num_attention_heads=vit["num_attention_heads"],
            ffn_hidden_size=vit["intermediate_size"],
            image_size=size(vit["image_size"]),
            patch_size=size(vit["patch_size"]),
            layernorm_epsilon=vit.get("layer_norm_eps", 1e-6),
            layer_scale_init=vit.get("layer_scale_init_value", 0.1),
            select_layer=hf.get("vision_feature_layer", -1),
        )
        rope = llm.get("rope_parameters") or {}
        language = LanguageConfig(
            num_layers=llm["num_hidden_layers"],
            hidden_size=llm["hidden_size"],
            num_attention_heads=llm["num_attention_heads"],
            num_query_groups=llm.get("num_key_value_heads") or llm["num_attention_heads"],
            ffn_hidden_size=llm["intermediate_size"],
            vocab_size=llm["vocab_size"],
            rotary_base=rope.get("rope_theta", llm.get("rope_theta", 1e6)),
            layernorm_epsilon=llm.get("rms_norm_eps", 1e-5),
            max_sequence_length=llm.get("max_position_embeddings", 32768),
        )
    except KeyError as err:
        raise ValueError(f"not a transformers InternVL config.json: missing key {err}") from err
    problems = []
    if llm.get("model_type") != "llama":
        problems.append(f"text_config.model_type is {llm.get('model_type')!r}, expected 'llama'")
    if (
        not vit.get("attention_bias")
        or vit.get("use_qk_norm")
        or vit.get("norm_type", "layer_norm") != "layer_norm"
    ):
        problems.append(
            "vision_config must have attention_bias=True, use_qk_norm=False, norm_type='layer_norm'"
        )
    if not vit.get("use_mean_pooling", True):
        problems.append("vision_config.use_mean_pooling=False adds a final norm InternViT does not have")
    if llm.get("tie_word_embeddings") or hf.get("tie_word_embeddings"):
        problems.append("tied word embeddings: InternLM2's input and output embeddings are separate")
    if hf.get("vision_feature_select_strategy", "default") != "default":
        problems.append("vision_feature_select_strategy 'full' keeps the CLS token, which InternVL drops")
    if hf.get("projector_hidden_act", "gelu") != "gelu":
        problems.append(f"projector_hidden_act {hf.get('projector_hidden_act')!r}: InternVL's projector is GELU")
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type {rope.get('rope_type')!r}: V2PE uses plain RoPE")
    if problems:
        raise ValueError("unsupported transformers InternVL variant: " + "; ".join(problems))
    return VLMConfig(
        vision=vision,
        language=language,
        img_context_token_id=(hf["image_token_id"] if img_context_token_id is None else img_context_token_id),
        downsample_ratio=hf.get("downsample_ratio", 0.5),
        name=hf.get("_name_or_path", "hf"),
    )


def write_config(config: VLMConfig, reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``config.json`` that ``InternVLForConditionalGeneration.from_pretrained`` reads; fields of
    ``reference`` that do not describe the architecture (e.g. token ids) are kept."""
    from transformers import InternVLConfig, InternVLVisionConfig, LlamaConfig

    if config.ps_version != "v2":
        raise ValueError("transformers' InternVL shuffles pixels as ps_version v2; this model uses v1")
    vit, lm = config.vision, config.language
    text = LlamaConfig(
        hidden_size=lm.hidden_size,
        intermediate_size=lm.ffn_hidden_size,
        num_hidden_layers=lm.num_layers,
        num_attention_heads=lm.num_attention_heads,
        num_key_value_heads=lm.num_query_groups,
        head_dim=lm.hidden_size // lm.num_attention_heads,
        vocab_size=lm.vocab_size,
        rms_norm_eps=lm.layernorm_epsilon,
        max_position_embeddings=lm.max_sequence_length,
        rope_parameters={"rope_type": "default", "rope_theta": lm.rotary_base},
        tie_word_embeddings=False,
    )
    vision = InternVLVisionConfig(
        hidden_size=vit.hidden_size,
        num_hidden_layers=vit.num_layers,
        num_attention_heads=vit.num_attention_heads,
        intermediate_size=vit.ffn_hidden_size,
        image_size=vit.image_size,
        patch_size=vit.patch_size,
        layer_norm_eps=vit.layernorm_epsilon,
        layer_scale_init_value=vit.layer_scale_init,
        attention_bias=True,
        use_mean_pooling=True,
    )
    hf = InternVLConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=config.img_context_token_id,
        image_seq_length=config.tokens_per_tile,
        downsample_ratio=config.downsample_ratio,
        vision_feature_layer=vit.select_layer,
        tie_word_embeddings=False,
    ).to_dict()
    hf["architectures"] = ["InternVLForConditionalGeneration"]
    return {**(reference or {}), **hf}
