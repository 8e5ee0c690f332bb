"""transformers' own ``InternVLForConditionalGeneration``, as ``save_pretrained`` writes it: its text model
is the family's own transformers class (Qwen2, Qwen3, Llama), and Llama for InternLM2.

InternLM2 is Llama with fused weights: its ``wqkv`` splits into ``q_proj``/``k_proj``/``v_proj`` and its
``w1``/``w3`` are ``gate_proj``/``up_proj``, so the exported model loads with plain ``from_pretrained``
(no remote code). Names are the on-disk ones (``language_model.model.*``, ``vision_tower.*``), which
transformers maps onto its module tree when loading.
"""

from __future__ import annotations

from typing import Any

from megatron_v2pe.convert.language_tables import language_rules
from megatron_v2pe.convert.vision_towers import for_tower
from megatron_v2pe.convert.mapping import IDENTITY, Rule, SeparateQKV, TPSplit, layer_rules, rule
from megatron_v2pe.model.internvit_6b import read_vision_variant
from megatron_v2pe.model.internvl_config import read_language
from megatron_v2pe.model.presets import LanguageConfig, VisionConfig, VLMConfig

COLUMN, ROW = TPSplit.COLUMN, TPSplit.ROW


def rules(config: VLMConfig) -> list[Rule]:
    vit = config.vision
    vit_qkv = SeparateQKV(
        vit.num_attention_heads, vit.num_attention_heads, vit.hidden_size // vit.num_attention_heads
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
    vision_layer = for_tower(vision_layer, vit, "attention.q_norm.weight", "attention.k_norm.weight")
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
        *layer_rules("vision", "vision_tower.encoder.layer", "vision_model.decoder.layers", vision_layer),
        *language_rules(config.language, "llama"),
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
            **read_vision_variant(
                vit.get("norm_type", "layer_norm"),
                qkv_bias=vit.get("attention_bias", False),
                qk_normalization=vit.get("use_qk_norm", False),
            ),
        )
    except KeyError as err:
        raise ValueError(f"not a transformers InternVL config.json: missing key {err}") from err
    language = read_language({"model_type": "llama", **llm})
    problems = []
    if not vit.get("use_mean_pooling", True):
        problems.append("vision_config.use_mean_pooling=False adds a final norm InternViT does not have")
    if hf.get("vision_feature_select_strategy", "default") != "default":
        problems.append("vision_feature_select_strategy 'full' keeps the CLS token, which InternVL drops")
    if hf.get("projector_hidden_act", "gelu") != "gelu":
        act = hf.get("projector_hidden_act")
        problems.append(f"projector_hidden_act {act!r}: InternVL's projector is GELU")
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
    from transformers import InternVLConfig, InternVLVisionConfig

    if config.ps_version != "v2":
        raise ValueError("transformers' InternVL shuffles pixels as ps_version v2; this model uses v1")
    vit = config.vision
    vision = InternVLVisionConfig(
        hidden_size=vit.hidden_size,
        num_hidden_layers=vit.num_layers,
        num_attention_heads=vit.num_attention_heads,
        intermediate_size=vit.ffn_hidden_size,
        image_size=vit.image_size,
        patch_size=vit.patch_size,
        layer_norm_eps=vit.layernorm_epsilon,
        layer_scale_init_value=vit.layer_scale_init,
        attention_bias=vit.qkv_bias,
        use_qk_norm=vit.qk_normalization,
        norm_type={"LayerNorm": "layer_norm", "RMSNorm": "rms_norm"}[vit.normalization],
        use_mean_pooling=True,
    )
    hf = InternVLConfig(
        vision_config=vision.to_dict(),
        text_config=text_config(config.language),
        image_token_id=config.img_context_token_id,
        image_seq_length=config.tokens_per_tile,
        downsample_ratio=config.downsample_ratio,
        vision_feature_layer=vit.select_layer,
        tie_word_embeddings=config.language.tie_word_embeddings,
    ).to_dict()
    hf["architectures"] = ["InternVLForConditionalGeneration"]
    return {**(reference or {}), **hf}


TEXT_CONFIG_CLASSES = {"internlm2": "LlamaConfig", "llama": "LlamaConfig", "qwen2": "Qwen2Config",
                       "qwen3": "Qwen3Config"}  # fmt: skip
"""The transformers class of each family's text model (InternLM2 is exported as the Llama it equals)."""


def text_config(lm: LanguageConfig) -> dict[str, Any]:
    import transformers

    fields = dict(
        hidden_size=lm.hidden_size,
        intermediate_size=lm.ffn_hidden_size,
        num_hidden_layers=lm.num_layers,
        num_attention_heads=lm.num_attention_heads,
        num_key_value_heads=lm.num_query_groups,
        head_dim=lm.kv_channels,
        vocab_size=lm.vocab_size,
        rms_norm_eps=lm.layernorm_epsilon,
        max_position_embeddings=lm.max_sequence_length,
        rope_parameters={"rope_type": "default", "rope_theta": lm.rotary_base},
        tie_word_embeddings=lm.tie_word_embeddings,
    )
    if lm.dynamic_ntk_factor is not None:  # the release's dynamic NTK, for δ = 1 inference
        fields["rope_parameters"].update(rope_type="dynamic", factor=lm.dynamic_ntk_factor)
    if lm.family == "qwen2":
        del fields["head_dim"]  # Qwen2's is always hidden_size / heads
    return getattr(transformers, TEXT_CONFIG_CLASSES[lm.family])(**fields).to_dict()
