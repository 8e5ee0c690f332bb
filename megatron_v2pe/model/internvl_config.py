"""InternVL's ``config.json``, field by field: every field is used, refused, or known to be inert.

``FIELDS`` is the whole contract, one entry per field of ``InternVLChatConfig`` and of its
``vision_config`` (InternViT) and ``llm_config`` (InternLM2): ``Use`` reads the value into ``VLMConfig``
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
    target: str  # "vision.x", "language.x", "image_format.x" or a VLMConfig field
    default: Any = REQUIRED  # the target's value when the field is absent
    read: Callable[[Any], Any] | None = None  # field value -> target value; raises ValueError to refuse


@dataclass(frozen=True)
class Require:
    accepted: tuple
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


VISION_FIELDS: dict[str, Rule] = {
    "architectures": Require((["InternVisionModel"],), "only InternViT is implemented",
                             default=["InternVisionModel"]),
    "attention_dropout": Require((0.0,), "the vision tower runs without dropout", default=0.0),
    "dropout": Require((0.0,), "the vision tower runs without dropout", default=0.0),
    "drop_path_rate": Use("vision.drop_path_rate", 0.0),
    "hidden_act": Require(("gelu",), "InternViT-300M's MLP is GELU", default="gelu"),
    "hidden_size": Use("vision.hidden_size"),
    "image_size": Use("vision.image_size"),
    "initializer_factor": Use("vision.layer_scale_init", 0.1),
    "initializer_range": Inert("initialisation of new weights; converted weights are loaded"),
    "intermediate_size": Use("vision.ffn_hidden_size"),
    "layer_norm_eps": Use("vision.layernorm_epsilon", 1e-6),
    "model_type": Require(("intern_vit_6b",), "only InternViT is implemented", default="intern_vit_6b"),
    "norm_type": Require(("layer_norm",), "InternViT-300M uses LayerNorm (RMSNorm is InternViT-6B's)",
                         default="rms_norm"),
    "num_attention_heads": Use("vision.num_attention_heads"),
    "num_channels": Require((3,), "tiles are RGB", default=3),
    "num_hidden_layers": Use("vision.num_layers"),
    "patch_size": Use("vision.patch_size"),
    "pruned_heads": NO_PRUNING,
    "qk_normalization": Require((False,), "InternViT-300M has no QK norm (InternViT-6B's is not implemented)",
                                default=True),
    "qkv_bias": Require((True,), "InternViT-300M's qkv has a bias", default=False),
    "tie_word_embeddings": Inert("a ViT has no word embeddings"),
    "torch_dtype": DTYPE,
    "use_flash_attn": Inert("attention kernel choice; here model.attention_backend"),
}  # fmt: skip

LLM_FIELDS: dict[str, Rule] = {
    "architectures": Require((["InternLM2ForCausalLM"],), "only the InternLM2 language model is implemented"),
    "attn_implementation": Inert("attention kernel choice; here model.attention_backend"),
    "auto_map": REMOTE_CODE,
    "bias": Require((False,), "InternLM2-chat's linears have no bias", default=True),
    "hidden_act": Require(("silu",), "InternLM2's MLP is SwiGLU", default="silu"),
    "hidden_size": Use("language.hidden_size"),
    "initializer_range": Inert("initialisation of new weights; converted weights are loaded"),
    "intermediate_size": Use("language.ffn_hidden_size"),
    "max_position_embeddings": Use("language.max_sequence_length", 2048),
    "model_type": Require(("internlm2",), "only the InternLM2 language model is implemented",
                          default="internlm2"),
    "num_attention_heads": Use("language.num_attention_heads"),
    "num_hidden_layers": Use("language.num_layers"),
    "num_key_value_heads": Use("language.num_query_groups", SKIP, _unless_none),
    "pretraining_tp": Inert("splits InternLM2's matmuls into slices with the same result"),
    "pruned_heads": NO_PRUNING,
    "rms_norm_eps": Use("language.layernorm_epsilon", 1e-6),
    "rope_scaling": Use("language.dynamic_ntk_factor", None, _rope_scaling),
    "rope_theta": Use("language.rotary_base", 10000.0),
    "tie_word_embeddings": Require((False,), "InternLM2 has untied word embeddings", default=False),
    "torch_dtype": DTYPE,
    "use_cache": Inert("generation bookkeeping; the evaluation has its own KV cache"),
    "vocab_size": Use("language.vocab_size"),
}  # fmt: skip

TOP_FIELDS: dict[str, Rule] = {
    "_commit_hash": Inert("hub bookkeeping"),
    "_name_or_path": Use("name", "hf"),
    "architectures": Require((["InternVLChatModel"],), "this is the InternVL2 remote-code layout",
                             default=["InternVLChatModel"]),
    "auto_map": REMOTE_CODE,
    "downsample_ratio": Use("downsample_ratio", 0.5),
    "dynamic_image_size": Use("image_format.dynamic_image_size", False),
    "dynamic_max_patch": Use("image_format.tile_budget", "per_sample", _tile_budget),
    "force_image_size": Use("vision.image_size", SKIP, _unless_none),
    "max_dynamic_patch": Use("image_format.max_tiles", 6),
    "min_dynamic_patch": Use("image_format.min_tiles", 1),
    "model_type": Require(("internvl_chat",), "this is the InternVL2 remote-code layout",
                          default="internvl_chat"),
    "pad2square": Require((False,), "padding images to squares is not implemented", default=False),
    "ps_version": Use("ps_version", "v1"),
    "select_layer": Use("vision.select_layer", -1),
    "template": Use("template"),
    "torch_dtype": DTYPE,
    "transformers_version": GENERIC,
    "use_backbone_lora": Require((0,), "LoRA adapters are not converted; merge them first", default=0),
    "use_llm_lora": Require((0,), "LoRA adapters are not converted; merge them first", default=0),
    "use_thumbnail": Use("image_format.use_thumbnail", False),
}  # fmt: skip

SECTIONS: dict[str, dict[str, Rule]] = {
    "vision_config": {**dict.fromkeys(GENERIC_FIELDS, GENERIC), **VISION_FIELDS},
    "llm_config": {**dict.fromkeys(GENERIC_FIELDS, GENERIC), **LLM_FIELDS},
    "": TOP_FIELDS,  # last: force_image_size overrides vision_config.image_size
}
"""The rules of each part of config.json, in the order they are applied."""


def _apply(rule: Rule, path: str, data: Mapping[str, Any], values: dict[str, dict[str, Any]]) -> list[str]:
    """Apply one field's rule: store a used value in ``values``; the problems it has, if any."""
    name = path.rsplit(".", 1)[-1]
    if isinstance(rule, Require):
        value = data.get(name, rule.default)
        return [] if value in rule.accepted else [f"{path} is {value!r}: {rule.why}"]
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
    if value is SKIP:
        return []
    part, _, field = rule.target.rpartition(".")
    if field in values[part] and values[part][field] != value:  # two fields for one setting disagree
        return [f"{path} is {value!r} but {rule.target} is {values[part][field]!r} by another field"]
    values[part][field] = value
    return []


def read_fields(hf: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The used values by VLMConfig part; ValueError listing every unknown or refused field."""
    values: dict[str, dict[str, Any]] = {"": {}, "vision": {}, "language": {}, "image_format": {}}
    problems = []
    for section, rules in SECTIONS.items():
        data = hf.get(section) if section else hf
        if not isinstance(data, Mapping):
            problems.append(f"missing key '{section}'")
            continue
        known = rules.keys() | (set() if section else set(SECTIONS))
        prefix = f"{section}." if section else ""
        problems += [f"{prefix}{k} is not a field this converter knows" for k in data if k not in known]
        for name, rule in rules.items():
            problems += _apply(rule, prefix + name, data, values)
    if problems:
        raise ValueError(
            "unsupported InternVL2 variant in config.json: " + "; ".join(problems)
            + " (docs/hf_config.md lists every field and what is supported)"
        )
    language = values["language"]
    if "num_attention_heads" in language:
        language.setdefault("num_query_groups", language["num_attention_heads"])
    return values


def from_hf_config(
    source: str | Path | Mapping[str, Any], img_context_token_id: int | None = None
) -> VLMConfig:
    """The VLMConfig of an InternVL2 ``config.json`` (a path, a model directory, or the dict); its
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
        raise ValueError(f"unsupported InternVL2 variant in config.json: {err}") from None
