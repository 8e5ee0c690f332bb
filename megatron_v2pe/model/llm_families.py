"""The language models of the InternVL releases, recognised from config.json, read into a LanguageConfig.

- ``internlm2`` (InternLM2ForCausalLM): the base, RMSNorm, SwiGLU, GQA, no biases, untied embeddings;
- ``qwen2`` (Qwen2ForCausalLM, Qwen2.5 too): q, k, v biases; tied embeddings in the small sizes;
- ``qwen3`` (Qwen3ForCausalLM): per-head q/k RMSNorm, a head width of its own; tied in the small sizes;
- ``llama`` (LlamaForCausalLM, Llama-3): as InternLM2 (Llama-3's rope_theta is 500000).

Mixture-of-experts releases (Qwen3-MoE in InternVL3.5-30B-A3B and -241B-A28B, GPT-OSS) are refused:
only dense decoders are built. Every field that would change the computation and that the model does not
implement (RoPE scaling, sliding windows, extra biases, another activation) is refused by name.
"""

from __future__ import annotations

from typing import Any

from megatron_v2pe.model.presets import LanguageConfig

FAMILIES = {
    "InternLM2ForCausalLM": "internlm2",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
    "internlm2": "internlm2",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "llama": "llama",
}
MIXTURE_OF_EXPERTS = {
    "Qwen3MoeForCausalLM", "qwen3_moe", "Qwen2MoeForCausalLM", "qwen2_moe", "GptOssForCausalLM", "gpt_oss",
    "MixtralForCausalLM", "mixtral",
}  # fmt: skip


PLAIN_INSIDE_THE_WINDOW = ("default", "dynamic")
"""RoPE kinds equal to plain RoPE at every position below ``max_position_embeddings``: dynamic NTK (the
InternVL3 releases' Qwen2.5 say ``{"rope_type": "dynamic", "factor": 2.0}``) rescales only longer
inputs, which V2PE keeps inside the window; it is read as InternLM2's ``rope_scaling`` is."""


def llm_family(llm: dict[str, Any]) -> str:
    """The family of an ``llm_config`` / ``text_config``; InternVL2's InternLM2 when it names none."""
    names = [*(llm.get("architectures") or []), llm.get("model_type")]
    moe = [n for n in names if n in MIXTURE_OF_EXPERTS]
    if moe:
        raise ValueError(
            f"llm_config names {moe[0]!r}, a mixture-of-experts language model (InternVL3.5-30B-A3B, "
            "InternVL3.5-241B-A28B, GPT-OSS): not supported yet, only the dense releases are"
        )
    known = [FAMILIES[n] for n in names if n in FAMILIES]
    if known:
        return known[0]
    if any(names):
        raise ValueError(
            f"llm_config architectures/model_type {[n for n in names if n]} is not a supported language "
            f"model; supported: {sorted(k for k in FAMILIES if k[0].isupper())}"
        )
    return "internlm2"


def rope_theta(llm: dict[str, Any], default: float) -> float:
    """transformers 5 keeps it in ``rope_parameters``, older configs (the releases) at the top level."""
    return (llm.get("rope_parameters") or {}).get("rope_theta", llm.get("rope_theta", default))


def _problems(llm: dict[str, Any], family: str) -> list[str]:
    """Fields whose value changes the computation in a way the model does not implement."""
    scaling = llm.get("rope_scaling") or llm.get("rope_parameters") or {}
    problems = []
    if scaling.get("rope_type", scaling.get("type", "default")) not in PLAIN_INSIDE_THE_WINDOW:
        problems.append(
            f"llm_config.rope_scaling {scaling}: V2PE positions use plain RoPE and {family} RoPE "
            "scaling is not implemented; remove the field to train at the base frequencies"
        )
    if llm.get("hidden_act", "silu") != "silu":
        problems.append(f"llm_config.hidden_act {llm['hidden_act']!r}: the SwiGLU MLP uses 'silu'")
    if llm.get("use_sliding_window"):
        problems.append("llm_config.use_sliding_window=True: only full attention is implemented")
    if llm.get("attention_bias") or llm.get("mlp_bias"):
        problems.append(
            "llm_config.attention_bias / mlp_bias=True: biases on the output or MLP projections are not "
            f"part of the {family} decoder built here"
        )
    return problems


def read_language_config(llm: dict[str, Any], family: str) -> LanguageConfig:
    """A Qwen2 / Qwen3 / Llama ``llm_config`` (or transformers ``text_config``) as a ``LanguageConfig``."""
    problems = _problems(llm, family)
    if problems:
        raise ValueError("unsupported language model: " + "; ".join(problems))
    try:
        hidden, heads = llm["hidden_size"], llm["num_attention_heads"]
        head_dim = llm.get("head_dim") or hidden // heads
        return LanguageConfig(
            num_layers=llm["num_hidden_layers"],
            hidden_size=hidden,
            num_attention_heads=heads,
            num_query_groups=llm.get("num_key_value_heads") or heads,
            ffn_hidden_size=llm["intermediate_size"],
            vocab_size=llm["vocab_size"],
            rotary_base=rope_theta(llm, 10000.0),
            layernorm_epsilon=llm.get("rms_norm_eps", 1e-6),
            max_sequence_length=llm.get("max_position_embeddings", 32768),
            qkv_bias=family == "qwen2",
            qk_layernorm=family == "qwen3",
            head_dim=None if head_dim == hidden // heads else head_dim,
            tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)),
            family=family,
        )
    except KeyError as err:
        raise ValueError(f"llm_config of the {family} language model lacks {err}") from err
