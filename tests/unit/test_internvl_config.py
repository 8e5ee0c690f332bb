"""InternVL's config.json, walked field by field: every field is used (changing it changes the model
config) or refused (changing it is an error naming it), but for the inert fields listed here by hand;
and docs/hf_config.md lists every field. Three releases are walked: InternVL2-2B (InternLM2), InternVL3-1B
(Qwen2.5, as published) and an InternVL3.5-style config whose language model is Qwen3-0.6B."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_v2pe.eval.loading import rope_for_policy
from megatron_v2pe.model.architecture import config_differences
from megatron_v2pe.model.internvl_config import from_hf_config
from megatron_v2pe.model.presets import QWEN_IMG_CONTEXT_ID, internvl2_2b, internvl2_5_1b
from megatron_v2pe.v2pe.rotary import DynamicNTK

GENERIC = {  # what transformers 4.37 writes into every nested PretrainedConfig
    "add_cross_attention": False, "bad_words_ids": None, "begin_suppress_tokens": None,
    "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None, "decoder_start_token_id": None,
    "diversity_penalty": 0.0, "do_sample": False, "early_stopping": False, "encoder_no_repeat_ngram_size": 0,
    "exponential_decay_length_penalty": None, "finetuning_task": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "is_decoder": False,
    "is_encoder_decoder": False, "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "length_penalty": 1.0,
    "max_length": 20, "min_length": 0, "no_repeat_ngram_size": 0, "num_beam_groups": 1, "num_beams": 1,
    "num_return_sequences": 1, "output_attentions": False, "output_hidden_states": False,
    "output_scores": False, "prefix": None, "problem_type": None, "pruned_heads": {},
    "remove_invalid_values": False, "repetition_penalty": 1.0, "return_dict": True,
    "return_dict_in_generate": False, "sep_token_id": None, "suppress_tokens": None,
    "task_specific_params": None, "temperature": 1.0, "tf_legacy_loss": False, "tie_encoder_decoder": False,
    "tokenizer_class": None, "top_k": 50, "top_p": 1.0, "torch_dtype": "bfloat16", "torchscript": False,
    "transformers_version": "4.37.2", "typical_p": 1.0, "use_bfloat16": True,
}  # fmt: skip

INTERNVL2_2B = {  # OpenGVLab/InternVL2-2B's config.json, every field as released
    "_commit_hash": None,
    "_name_or_path": "OpenGVLab/InternVL2-2B",
    "architectures": ["InternVLChatModel"],
    "auto_map": {
        "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
        "AutoModel": "modeling_internvl_chat.InternVLChatModel",
        "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
    },
    "downsample_ratio": 0.5,
    "dynamic_image_size": True,
    "force_image_size": 448,
    "llm_config": {
        **GENERIC,
        "_name_or_path": "internlm/internlm2-chat-1_8b",
        "architectures": ["InternLM2ForCausalLM"],
        "attn_implementation": "flash_attention_2",
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
        },
        "bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 8192,
        "max_position_embeddings": 32768,
        "model_type": "internlm2",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "num_key_value_heads": 8,
        "pad_token_id": 2,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 2.0, "type": "dynamic"},
        "rope_theta": 1000000,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": 92553,
    },
    "max_dynamic_patch": 12,
    "min_dynamic_patch": 1,
    "model_type": "internvl_chat",
    "ps_version": "v2",
    "select_layer": -1,
    "template": "internlm2-chat",
    "torch_dtype": "bfloat16",
    "transformers_version": None,
    "use_backbone_lora": 0,
    "use_llm_lora": 0,
    "use_thumbnail": True,
    "vision_config": {
        **GENERIC,
        "_name_or_path": "",
        "architectures": ["InternVisionModel"],
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "drop_path_rate": 0.0,
        "dropout": 0.0,
        "eos_token_id": None,
        "hidden_act": "gelu",
        "hidden_size": 1024,
        "image_size": 448,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 4096,
        "layer_norm_eps": 1e-06,
        "model_type": "intern_vit_6b",
        "norm_type": "layer_norm",
        "num_attention_heads": 16,
        "num_channels": 3,
        "num_hidden_layers": 24,
        "pad_token_id": None,
        "patch_size": 14,
        "qk_normalization": False,
        "qkv_bias": True,
        "tie_word_embeddings": True,
        "use_flash_attn": True,
    },
}

QWEN_TOP = {  # the top level of InternVL3-1B's config.json, every field as published
    "architectures": ["InternVLChatModel"],
    "auto_map": INTERNVL2_2B["auto_map"],
    "downsample_ratio": 0.5, "dynamic_image_size": True, "force_image_size": 448, "hidden_size": 896,
    "image_fold": None, "max_dynamic_patch": 12, "min_dynamic_patch": 1, "model_type": "internvl_chat",
    "output_attentions": False, "pad2square": False, "ps_version": "v2", "select_layer": -1,
    "system_message": None, "template": "internvl2_5", "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": None, "use_backbone_lora": 0, "use_llm_lora": 0, "use_thumbnail": True,
}  # fmt: skip

INTERNVIT_300M_V2_5 = {  # InternVL3-1B's vision_config: InternViT's MoE settings ride along, use_moe false
    **GENERIC,
    "_name_or_path": "OpenGVLab/InternViT-6B-448px-V1-5", "architectures": ["InternVisionModel"],
    "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_intern_vit.InternVisionConfig",
                 "AutoModel": "modeling_intern_vit.InternVisionModel"},
    "capacity_factor": 1.2, "drop_path_rate": 0.1, "dropout": 0.0, "eval_capacity_factor": 1.4,
    "hidden_act": "gelu", "hidden_size": 1024, "image_size": 448, "initializer_factor": 0.1,
    "initializer_range": 1e-10, "intermediate_size": 4096, "laux_allreduce": "all_nodes",
    "layer_norm_eps": 1e-06, "model_type": "intern_vit_6b", "moe_coeff_ratio": 0.5,
    "moe_intermediate_size": 768,
    "moe_output_scale": 4.0, "noisy_gate_policy": "RSample_before", "norm_type": "layer_norm",
    "num_attention_heads": 16, "num_channels": 3, "num_experts": 8, "num_hidden_layers": 24,
    "num_routed_experts": 4, "num_shared_experts": 4, "patch_size": 14, "qk_normalization": False,
    "qkv_bias": True, "shared_expert_intermediate_size": 3072, "use_flash_attn": False, "use_moe": False,
    "use_residual": True, "use_rts": False, "use_weighted_residual": False,
}  # fmt: skip

INTERNVL3_1B = {
    **QWEN_TOP,
    "_name_or_path": "OpenGVLab/InternVL3-1B",
    "llm_config": {
        **GENERIC,
        "_name_or_path": "./pretrained/Qwen2.5-32B-Instruct", "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu",
        "hidden_size": 896, "initializer_range": 0.02, "intermediate_size": 4864,
        "layer_types": ["full_attention"] * 24, "max_position_embeddings": 32768, "max_window_layers": 70,
        "model_type": "qwen2", "moe_config": None, "num_attention_heads": 14, "num_hidden_layers": 24,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"}, "rope_theta": 1000000.0,
        "sliding_window": None, "tie_word_embeddings": False, "use_cache": False, "use_sliding_window": False,
        "vocab_size": 151674,
    },
    "vision_config": INTERNVIT_300M_V2_5,
}  # fmt: skip

QWEN3_RELEASE = {  # InternVL3.5-style: the same top level and tower, Qwen3-0.6B's config (transformers 4.51)
    **QWEN_TOP,
    "_name_or_path": "internvl3_5-style-qwen3",
    "hidden_size": 1024,
    "llm_config": {
        **GENERIC,
        "_name_or_path": "Qwen/Qwen3-0.6B", "architectures": ["Qwen3ForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
        "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
        "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
        "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
    },
    "vision_config": INTERNVIT_300M_V2_5,
}  # fmt: skip

RELEASES = {"internvl2_2b": INTERNVL2_2B, "internvl3_1b": INTERNVL3_1B, "qwen3": QWEN3_RELEASE}
IMG_CONTEXT = {"internvl2_2b": None, "internvl3_1b": QWEN_IMG_CONTEXT_ID, "qwen3": QWEN_IMG_CONTEXT_ID}
"""Each release's ``<IMG_CONTEXT>`` id (its tokenizer's; None: InternVL2-2B's)."""

INERT = {  # fields that change neither the weights, nor the forward pass, nor the data format
    *(f"{part}.{name}" for part in ("llm_config", "vision_config") for name in GENERIC),
    "_commit_hash", "auto_map", "torch_dtype", "transformers_version",
    "llm_config._name_or_path", "llm_config.attn_implementation", "llm_config.auto_map",
    "llm_config.bos_token_id", "llm_config.eos_token_id", "llm_config.pad_token_id",
    "llm_config.initializer_range", "llm_config.pretraining_tp", "llm_config.use_cache",
    "vision_config._name_or_path", "vision_config.bos_token_id", "vision_config.eos_token_id",
    "vision_config.pad_token_id", "vision_config.initializer_range", "vision_config.tie_word_embeddings",
    "vision_config.use_flash_attn", "vision_config.auto_map", "output_attentions",
    "llm_config.max_window_layers", "llm_config.sliding_window",
    *(f"vision_config.{name}" for name in (  # InternViT's MoE settings: read only with use_moe (refused)
        "capacity_factor", "eval_capacity_factor", "laux_allreduce", "moe_coeff_ratio",
        "moe_intermediate_size", "moe_output_scale", "noisy_gate_policy", "num_experts", "num_routed_experts",
        "num_shared_experts", "shared_expert_intermediate_size", "use_residual", "use_rts",
        "use_weighted_residual",
    )),
}  # fmt: skip
INERT -= {"llm_config.pruned_heads", "vision_config.pruned_heads"}  # pruning changes the weights: refused


def _leaves(config: dict, prefix: str = "") -> list[str]:
    paths = []
    for key, value in config.items():
        if key in ("vision_config", "llm_config"):
            paths += _leaves(value, f"{key}.")
        else:
            paths.append(prefix + key)
    return paths


def _changed(value):
    """Another value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "_other"
    if isinstance(value, list):
        return [v + "_other" for v in value]
    if isinstance(value, dict):
        return {**value, "other": 1.5}
    return "other"


def _with(config: dict, path: str, value) -> dict:
    changed = copy.deepcopy(config)
    *sections, name = path.split(".")
    target = changed
    for section in sections:
        target = target[section]
    target[name] = value
    return changed


def _outcome(config: dict, img_context_token_id: int | None = None):
    try:
        return from_hf_config(config, img_context_token_id)
    except ValueError as err:
        return err


def test_the_release_reads_as_internvl2_2b():
    config = from_hf_config(INTERNVL2_2B)
    expected = internvl2_2b()
    # initializer_factor (1.0) is the layer scales' initial value: the preset's 0.1 is InternViT's default
    assert dataclasses.replace(config.vision, layer_scale_init=0.1) == expected.vision
    assert (config.ps_version, config.template, config.language) == ("v2", "internlm2-chat", config.language)
    assert config.language.dynamic_ntk == DynamicNTK(2.0, 32768)
    assert config.image_format == expected.image_format  # 12 tiles, thumbnail, InternVL's per-sample budget


def test_the_qwen_releases_read_as_their_presets():
    config = from_hf_config(INTERNVL3_1B, QWEN_IMG_CONTEXT_ID)  # InternVL2.5-1B's architecture
    assert config_differences(config, internvl2_5_1b()) == []
    assert config.language.dynamic_ntk == DynamicNTK(2.0, 32768) and config.template == "internvl2_5"
    qwen3 = from_hf_config(QWEN3_RELEASE, QWEN_IMG_CONTEXT_ID).language
    assert (qwen3.family, qwen3.qk_layernorm, qwen3.qkv_bias, qwen3.head_dim) == ("qwen3", True, False, 128)
    assert qwen3.tie_word_embeddings and qwen3.dynamic_ntk is None and qwen3.max_sequence_length == 40960


@pytest.mark.parametrize(
    ("release", "path"), [(name, path) for name, hf in RELEASES.items() for path in _leaves(hf)]
)
def test_every_field_is_used_or_refused_unless_inert(release, path):
    hf = RELEASES[release]
    released = _outcome(hf, IMG_CONTEXT[release])
    assert not isinstance(released, ValueError), released
    *_, name = path.split(".")
    outcome = _outcome(_with(hf, path, _changed(_get(hf, path))), IMG_CONTEXT[release])
    if path in INERT:
        assert outcome == released and outcome.name == released.name, f"{path} is inert but changed the model"
    elif isinstance(outcome, ValueError):
        assert name in str(outcome), f"refusing {path} without naming it: {outcome}"
    else:
        assert outcome != released or outcome.name != released.name, f"{path} is neither used nor refused"


def test_refused_values_and_unknown_fields_are_named():
    cases = {
        "ps_version": "v3",
        "llm_config.rope_scaling": {"type": "linear", "factor": 2.0},
        "vision_config.norm_type": "batch_norm",
        "vision_config.use_moe": True,
        "use_llm_lora": 8,
        "brand_new_field": 1,
        "llm_config.brand_new_field": 1,
    }
    for path, value in cases.items():
        with pytest.raises(ValueError, match=re.escape(path.split(".")[-1])):
            from_hf_config(_with(INTERNVL2_2B, path, value))
    absent = copy.deepcopy(INTERNVL2_2B)
    del absent["ps_version"]
    assert from_hf_config(absent).ps_version == "v1"  # absent fields take InternVLChatConfig's defaults
    for name in ("norm_type", "qkv_bias", "qk_normalization"):
        del absent["vision_config"][name]
    vit = from_hf_config(absent).vision  # ... and InternVisionConfig's: InternViT-6B's
    assert (vit.normalization, vit.qkv_bias, vit.qk_normalization) == ("RMSNorm", False, True)
    with pytest.raises(ValueError, match="force_image_size is 224 but vision.image_size is 448"):
        from_hf_config(_with(INTERNVL2_2B, "force_image_size", 224))


def test_qwen_fields_are_refused_by_name():
    cases = {
        "llm_config.use_sliding_window": True,
        "llm_config.rope_scaling": {"rope_type": "yarn", "factor": 4.0},
        "llm_config.layer_types": ["sliding_attention"] * 24,
        "system_message": "You are a helpful assistant.",
    }
    for path, value in cases.items():
        with pytest.raises(ValueError, match=re.escape(path.split(".")[-1])):
            from_hf_config(_with(INTERNVL3_1B, path, value), QWEN_IMG_CONTEXT_ID)
    with pytest.raises(ValueError, match="'Qwen3MoeForCausalLM', a mixture-of-experts"):
        from_hf_config(_with(INTERNVL3_1B, "llm_config.architectures", ["Qwen3MoeForCausalLM"]))


def test_the_docs_table_lists_every_field():
    table = (Path(__file__).parents[2] / "docs" / "hf_config.md").read_text()
    listed = set(re.findall(r"`([a-z_][a-z0-9_.]*)`", table))
    paths = {p for hf in RELEASES.values() for p in _leaves(hf)}
    missing = sorted(p for p in paths if p not in listed and p.split(".")[-1] not in listed)
    assert not missing, f"docs/hf_config.md does not list {missing}"


def test_dynamic_ntk_only_at_unit_delta():
    rotary = SimpleNamespace(dynamic_ntk=DynamicNTK(2.0, 32768))
    model = SimpleNamespace(language_model=SimpleNamespace(rotary_pos_emb=rotary))
    assert rope_for_policy(model, "none") is None and rope_for_policy(model, "fixed:1") is None
    assert rotary.dynamic_ntk is not None
    assert "plain RoPE" in rope_for_policy(model, "fixed:0.25") and rotary.dynamic_ntk is None


def _get(config: dict, path: str):
    for part in path.split("."):
        config = config[part]
    return config


def test_json_round_trip_of_the_fixture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(INTERNVL2_2B))
    assert from_hf_config(tmp_path) == from_hf_config(INTERNVL2_2B)
