"""InternVL's ``config.json``, field by field: every field is used, refused, or known to be inert.

``VISION_FIELDS``, ``LLM_FIELDS`` (one table per language family: ``llm_families`` recognises it) and
``TOP_FIELDS`` are the whole contract, one entry per field of ``InternVLChatConfig`` and of its
``vision_config`` (InternViT) and ``llm_config``: ``Use`` reads the value into ``VLMConfig``
(an absent field takes the configuration class's default, as the release's own code would), ``Require``
refuses any value but the ones implemented here, ``Inert`` names metadata that changes neither the
weights, nor the forward pass, nor the data format, and says why. A field in none of them is refused:
an unknown field may change the model. docs/hf_config.md is this table for readers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_v2pe.model.internvit_6b import vision_normalization
from megatron_v2pe.model.llm_families import ARCHITECTURES, FAMILY_TRAITS, llm_family
from megatron_v2pe.model.presets import (
    INTERNVL2_2B_IMG_CONTEXT_ID,
    ImageFormat,
    LanguageConfig,
    VisionConfig,
    VLMConfig,
)

REQUIRED = object()
"""``Use.default`` of a field that must be present."""
SKIP = object()
"""What ``Use.read`` returns to leave the target at its default."""


@dataclass(frozen=True)
class Use:
    target: str | tuple[str, ...]  # "vision.x", "language.x", "image_format.x", a VLMConfig field, or
    # several of them, ``read`` then returning one value (or SKIP) for each
    default: Any = REQUIRED  # the target's value when the field is absent
    read: Callable[[Any], Any] | None = None  # field value -> target value; raises ValueError to refuse


@dataclass(frozen=True)
class Require:
    accepted: tuple | Callable[[Any], bool]  # the accepted values, or a test of the value
    why: str
    default: Any = None  # the value an absent field has (the configuration class's default)


@dataclass(frozen=True)
class Inert:
    why: str


Rule = Use | Require | Inert

GENERIC = Inert("transformers' generic field: generation defaults or serialization bookkeeping")
GENERIC_FIELDS = (
    "_name_or_path", "add_cross_attention", "bad_words_ids", "begin_suppress_tokens", "bos_token_id",
    "chunk_size_feed_forward", "cross_attention_hidden_size", "decoder_start_token_id", "diversity_penalty",
    "do_sample", "early_stopping", "encoder_no_repeat_ngram_size", "eos_token_id",
    "exponential_decay_length_penalty", "finetuning_task", "forced_bos_token_id", "forced_eos_token_id",
    "id2label", "is_decoder", "is_encoder_decoder", "label2id", "length_penalty", "max_length", "min_length",
    "no_repeat_ngram_size", "num_beam_groups", "num_beams", "num_return_sequences", "output_attentions",
    "output_hidden_states", "output_scores", "pad_token_id", "prefix", "problem_type",
    "remove_invalid_values", "repetition_penalty", "return_dict", "return_dict_in_generate", "sep_token_id",
    "suppress_tokens", "task_specific_params", "temperature", "tf_legacy_loss", "tie_encoder_decoder",
    "tokenizer_class", "top_k", "top_p", "torchscript", "transformers_version", "typical_p", "use_bfloat16",
)  # fmt: skip
"""Written into every nested config by transformers; token ids among them come from the tokenizer."""

DTYPE = Inert("storage precision; the converter reads each tensor's own dtype")
NO_PRUNING = Require(({},), "pruned attention heads are not implemented", default={})
REMOTE_CODE = Inert("which remote-code classes load the release")
INITIALIZER = Inert("initialisation of new weights; converted weights are loaded")


def _rope_scaling(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, Mapping) and value.get("type", value.get("rope_type")) == "dynamic":
        unknown = set(value) - {"type", "rope_type", "factor"}
        if unknown:
            raise ValueError(f"has keys {sorted(unknown)} besides type and factor")
        return float(value["factor"])
    raise ValueError(f"{value!r}: only dynamic NTK ({{'type': 'dynamic', 'factor': f}}) is implemented")


def _unless_none(value: Any) -> Any:
    return SKIP if value is None else value


def _tile_budget(value: Any) -> str:
    return "per_sample" if value else "per_image"


VIT_MOE_FIELDS = (
    "capacity_factor", "eval_capacity_factor", "laux_allreduce", "moe_coeff_ratio", "moe_intermediate_size",
    "moe_output_scale", "noisy_gate_policy", "num_experts", "num_routed_experts", "num_shared_experts",
    "shared_expert_intermediate_size", "use_residual", "use_rts", "use_weighted_residual",
)  # fmt: skip
"""InternViT's mixture-of-experts settings, which InternVL2.5 and 3 configs carry with ``use_moe`` false."""

VISION_FIELDS: dict[str, Rule] = {
    "auto_map": REMOTE_CODE,
    "architectures": Require((["InternVisionModel"],), "only InternViT is implemented",
                             default=["InternVisionModel"]),
    "attention_dropout": Require((0.0,), "the vision tower runs without dropout", default=0.0),
    "dropout": Require((0.0,), "the vision tower runs without dropout", default=0.0),
    "drop_path_rate": Use("vision.drop_path_rate", 0.0),
    "hidden_act": Require(("gelu",), "InternViT's MLP is GELU", default="gelu"),
    "hidden_size": Use("vision.hidden_size"),
    "image_size": Use("vision.image_size"),
    "initializer_factor": Use("vision.layer_scale_init", 0.1),
    "initializer_range": INITIALIZER,
    "intermediate_size": Use("vision.ffn_hidden_size"),
    "layer_norm_eps": Use("vision.layernorm_epsilon", 1e-6),
    "model_type": Require(("intern_vit_6b",), "only InternViT is implemented", default="intern_vit_6b"),
    "norm_type": Use("vision.normalization", "RMSNorm", vision_normalization),
    "num_attention_heads": Use("vision.num_attention_heads"),
    "num_channels": Require((3,), "tiles are RGB", default=3),
    "num_hidden_layers": Use("vision.num_layers"),
    "patch_size": Use("vision.patch_size"),
    "pruned_heads": NO_PRUNING,
    "qk_normalization": Use("vision.qk_normalization", True, bool),
    "qkv_bias": Use("vision.qkv_bias", False, bool),
    "use_moe": Require((False,), "mixture-of-experts ViTs are not implemented", default=False),
    "tie_word_embeddings": Inert("a ViT has no word embeddings"),
    "torch_dtype": DTYPE,
    "use_flash_attn": Inert("attention kernel choice; here model.attention_backend"),
    **dict.fromkeys(VIT_MOE_FIELDS, Inert("read only when use_moe is true, which is refused")),
}  # fmt: skip


def _rope_parameters(value: Any) -> tuple:
    """transformers 5's ``rope_parameters``: (rope_theta, dynamic NTK factor)."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{value!r} is not a mapping")
    scaling = {k: v for k, v in value.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type"))
    plain = set(scaling) <= {"rope_type", "type"} and kind == "default"
    return value.get("rope_theta", SKIP), SKIP if plain else _rope_scaling(scaling)


def _full_attention(value: Any) -> bool:
    return all(kind == "full_attention" for kind in value or ())


NO_SLIDING = Inert("read only when use_sliding_window is true, which is refused")

LLM_COMMON: dict[str, Rule] = {
    "attention_dropout": Require((0.0,), "the language model runs without attention dropout", default=0.0),
    "attn_implementation": Inert("attention kernel choice; here model.attention_backend"),
    "auto_map": REMOTE_CODE,
    "dtype": DTYPE,
    "hidden_act": Require(("silu",), "the MLP is SwiGLU", default="silu"),
    "hidden_size": Use("language.hidden_size"),
    "initializer_range": INITIALIZER,
    "intermediate_size": Use("language.ffn_hidden_size"),
    "max_position_embeddings": Use("language.max_sequence_length", 2048),
    "num_attention_heads": Use("language.num_attention_heads"),
    "num_hidden_layers": Use("language.num_layers"),
    "num_key_value_heads": Use("language.num_query_groups", SKIP, _unless_none),
    "pruned_heads": NO_PRUNING,
    "rms_norm_eps": Use("language.layernorm_epsilon", 1e-6),
    "rope_parameters": Use(("language.rotary_base", "language.dynamic_ntk_factor"), SKIP, _rope_parameters),
    "rope_scaling": Use("language.dynamic_ntk_factor", SKIP, _rope_scaling),
    "rope_theta": Use("language.rotary_base", SKIP),
    "tie_word_embeddings": Use("language.tie_word_embeddings", False),
    "torch_dtype": DTYPE,
    "use_cache": Inert("generation bookkeeping; the evaluation has its own KV cache"),
    "vocab_size": Use("language.vocab_size"),
}  # fmt: skip
"""The fields every language family shares (InternLM2, Qwen2, Qwen3 and Llama configuration classes)."""

QWEN_FIELDS: dict[str, Rule] = {
    "layer_types": Require(_full_attention, "only full attention is implemented (no sliding-window layers)"),
    "max_window_layers": NO_SLIDING,
    "moe_config": Require((None,), "mixture-of-experts language models are not supported yet"),
    "sliding_window": NO_SLIDING,
    "use_sliding_window": Require((False,), "only full attention is implemented", default=False),
}  # fmt: skip
"""Qwen2's and Qwen3's own fields: attention windows, and InternVL's ``moe_config`` placeholder."""

NO_EXTRA_BIASES = Require((False,), "the output and MLP projections have no bias", default=False)


def _family_fields(family: str, extra: dict[str, Rule]) -> dict[str, Rule]:
    architecture = ARCHITECTURES[family]
    return {
        **LLM_COMMON,
        "architectures": Require(([architecture], None), f"the {family} language model is {architecture}",
                                 default=[architecture]),
        "model_type": Require((family,), f"the {family} language model's model_type", default=family),
        **extra,
    }  # fmt: skip


LLM_FIELDS: dict[str, dict[str, Rule]] = {
    "internlm2": _family_fields("internlm2", {
        "bias": Require((False,), "InternLM2-chat's linears have no bias", default=True),
        "pretraining_tp": Inert("splits InternLM2's matmuls into slices with the same result"),
        "tie_word_embeddings": Require((False,), "InternLM2 has untied word embeddings", default=False),
    }),
    "qwen2": _family_fields("qwen2", {
        **QWEN_FIELDS,
        "max_position_embeddings": Use("language.max_sequence_length", 32768),
    }),
    "qwen3": _family_fields("qwen3", {
        **QWEN_FIELDS,
        "attention_bias": NO_EXTRA_BIASES,
        "head_dim": Use("language.head_dim", SKIP, _unless_none),
        "max_position_embeddings": Use("language.max_sequence_length", 32768),
    }),
    "llama": _family_fields("llama", {
        "attention_bias": NO_EXTRA_BIASES,
        "head_dim": Use("language.head_dim", SKIP, _unless_none),
        "mlp_bias": NO_EXTRA_BIASES,
        "pretraining_tp": Inert("splits Llama's matmuls into slices with the same result"),
    }),
}  # fmt: skip
"""The ``llm_config`` rules of each language family (``llm_families`` recognises the family)."""

TOP_FIELDS: dict[str, Rule] = {
    "_commit_hash": Inert("hub bookkeeping"),
    "_name_or_path": Use("name", "hf"),
    "architectures": Require((["InternVLChatModel"],), "this is the InternVL2 remote-code layout",
                             default=["InternVLChatModel"]),
    "auto_map": REMOTE_CODE,
    "downsample_ratio": Use("downsample_ratio", 0.5),
    "hidden_size": Use("language.hidden_size", SKIP),  # InternVLChatConfig copies llm_config's
    "dynamic_image_size": Use("image_format.dynamic_image_size", False),
    "dynamic_max_patch": Use("image_format.tile_budget", "per_sample", _tile_budget),
    "force_image_size": Use("vision.image_size", SKIP, _unless_none),
    "image_fold": Require((None,), "folding images into several crops is not implemented", default=None),
    "max_dynamic_patch": Use("image_format.max_tiles", 6),
    "min_dynamic_patch": Use("image_format.min_tiles", 1),
    "model_type": Require(("internvl_chat",), "this is the InternVL2 remote-code layout",
                          default="internvl_chat"),
    "output_attentions": GENERIC,
    "pad2square": Require((False,), "padding images to squares is not implemented", default=False),
    "ps_version": Use("ps_version", "v1"),
    "select_layer": Use("vision.select_layer", -1),
    "system_message": Require((None,), "training takes the template's default system message, as "
                              "InternVL's does; remove the field, or give the text as the records' system "
                              "turn", default=None),
    "template": Use("template"),
    "tie_word_embeddings": Require((False,), "InternVLChatModel ties nothing itself: llm_config's "
                                   "tie_word_embeddings decides", default=False),
    "torch_dtype": DTYPE,
    "transformers_version": GENERIC,
    "use_backbone_lora": Require((0,), "LoRA adapters are not converted; merge them first", default=0),
    "use_llm_lora": Require((0,), "LoRA adapters are not converted; merge them first", default=0),
    "use_thumbnail": Use("image_format.use_thumbnail", False),
}  # fmt: skip

VISION_RULES = {**dict.fromkeys(GENERIC_FIELDS, GENERIC), **VISION_FIELDS}


def llm_rules(family: str) -> dict[str, Rule]:
    return {**dict.fromkeys(GENERIC_FIELDS, GENERIC), **LLM_FIELDS[family]}


def _apply(rule: Rule, path: str, data: Mapping[str, Any], values: dict[str, dict[str, Any]]) -> list[str]:
    """Apply one field's rule: store a used value in ``values``; the problems it has, if any."""
    name = path.rsplit(".", 1)[-1]
    if isinstance(rule, Require):
        value = data.get(name, rule.default)
        accepted = rule.accepted(value) if callable(rule.accepted) else value in rule.accepted
        return [] if accepted else [f"{path} is {value!r}: {rule.why}"]
    if isinstance(rule, Inert):
        return []
    if name not in data:
        if rule.default is REQUIRED:
            return [f"missing key '{path}'"]
        value = rule.default
    else:
        try:
            value = rule.read(data[name]) if rule.read else data[name]
        except (ValueError, TypeError, KeyError) as err:
            return [f"{path} {err}"]
    if isinstance(rule.target, str):
        return _store(path, rule.target, value, values)
    if value is SKIP:
        return []
    return [p for target, v in zip(rule.target, value, strict=True) for p in _store(path, target, v, values)]


def _store(path: str, target: str, value: Any, values: dict[str, dict[str, Any]]) -> list[str]:
    if value is SKIP:
        return []
    part, _, field = target.rpartition(".")
    if field in values[part] and values[part][field] != value:  # two fields for one setting disagree
        return [f"{path} is {value!r} but {target} is {values[part][field]!r} by another field"]
    values[part][field] = value
    return []


def _read_section(
    section: str, data: Any, rules: dict[str, Rule], values: dict[str, dict[str, Any]], known: set[str]
) -> list[str]:
    """Apply the rules of one part of config.json (``section`` "" is the top level); its problems."""
    if not isinstance(data, Mapping):
        return [f"missing key '{section}'"]
    prefix = f"{section}." if section else ""
    unknown = [k for k in data if k not in rules.keys() | known]
    problems = [f"{prefix}{k} is not a field this converter knows" for k in unknown]
    for name, rule in rules.items():
        problems += _apply(rule, prefix + name, data, values)
    return problems


def _language_rules(llm: Any) -> tuple[str, dict[str, Rule]]:
    family = llm_family(llm if isinstance(llm, Mapping) else {})
    return family, llm_rules(family)


def read_fields(hf: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The used values by VLMConfig part; ValueError listing every unknown or refused field."""
    values: dict[str, dict[str, Any]] = {"": {}, "vision": {}, "language": {}, "image_format": {}}
    problems = _read_section("vision_config", hf.get("vision_config"), VISION_RULES, values, set())
    try:
        family, rules = _language_rules(hf.get("llm_config"))
        problems += _read_section("llm_config", hf.get("llm_config"), rules, values, set())
    except ValueError as err:  # a mixture of experts or an unknown language model
        family, problems = None, [*problems, str(err)]
    # last: force_image_size overrides vision_config.image_size
    problems += _read_section("", hf, TOP_FIELDS, values, {"vision_config", "llm_config"})
    if problems:
        raise ValueError(
            "unsupported InternVL variant in config.json: " + "; ".join(problems)
            + " (docs/hf_config.md lists every field and what is supported)"
        )
    values["language"] = _language_values(values["language"], family)
    return values


def _language_values(language: dict[str, Any], family: str) -> dict[str, Any]:
    """Defaults that depend on other fields, and what the family itself implies (``llm_families``)."""
    language = {"rotary_base": 10000.0, **language, **FAMILY_TRAITS[family], "family": family}
    if "num_attention_heads" in language:
        language.setdefault("num_query_groups", language["num_attention_heads"])
        if language.get("head_dim") == language.get("hidden_size", 0) // language["num_attention_heads"]:
            del language["head_dim"]  # the usual width: stored as None
    return language


def read_language(llm: Mapping[str, Any], section: str = "text_config") -> LanguageConfig:
    """The language model of a transformers ``text_config`` (the ``-hf`` layout), by the same rules as
    InternVL's ``llm_config``."""
    values: dict[str, dict[str, Any]] = {"language": {}}
    family, rules = _language_rules(llm)
    problems = _read_section(section, llm, rules, values, set())
    if problems:
        raise ValueError("unsupported language model: " + "; ".join(problems))
    return LanguageConfig(**_language_values(values["language"], family))


def from_hf_config(
    source: str | Path | Mapping[str, Any], img_context_token_id: int | None = None
) -> VLMConfig:
    """The VLMConfig of an InternVL ``config.json`` (a path, a model directory, or the dict); its
    ``<IMG_CONTEXT>`` id lives in the tokenizer: InternVL2-2B's unless given."""
    if isinstance(source, Mapping):
        hf = source
    else:
        path = Path(source)
        hf = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    values = read_fields(hf)
    if img_context_token_id is None:
        img_context_token_id = INTERNVL2_2B_IMG_CONTEXT_ID
    try:
        return VLMConfig(
            vision=VisionConfig(**values["vision"]),
            language=LanguageConfig(**values["language"]),
            image_format=ImageFormat(**values["image_format"]),
            img_context_token_id=img_context_token_id,
            **values[""],
        )
    except ValueError as err:
        raise ValueError(f"unsupported InternVL variant in config.json: {err}") from None
