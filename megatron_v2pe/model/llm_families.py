"""The language models of the InternVL releases: which family a config.json names, and what each implies.

- ``internlm2`` (InternLM2ForCausalLM): the base, RMSNorm, SwiGLU, GQA, no biases, untied embeddings;
- ``qwen2`` (Qwen2ForCausalLM, Qwen2.5 too): q, k, v biases; tied embeddings in the small sizes;
- ``qwen3`` (Qwen3ForCausalLM): per-head q/k RMSNorm, a head width of its own; tied in the small sizes;
- ``llama`` (LlamaForCausalLM, Llama-3): as InternLM2 (Llama-3's rope_theta is 500000).

Mixture-of-experts releases (Qwen3-MoE in InternVL3.5-30B-A3B and -241B-A28B, GPT-OSS) are refused:
only dense decoders are built. Every field that would change the computation and that the model does not
implement (RoPE scaling, sliding windows, extra biases, another activation) is refused by name: each
family's fields, and what each one does, are ``internvl_config.LLM_FIELDS``.
"""

from __future__ import annotations

from typing import Any


ARCHITECTURES = {
    "internlm2": "InternLM2ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
}
"""Each family's ``architectures`` entry; its ``model_type`` is the family's name."""
FAMILIES = {**{a: f for f, a in ARCHITECTURES.items()}, **{f: f for f in ARCHITECTURES}}
FAMILY_TRAITS = {
    "internlm2": dict(qkv_bias=False, qk_layernorm=False),
    "qwen2": dict(qkv_bias=True, qk_layernorm=False),
    "qwen3": dict(qkv_bias=False, qk_layernorm=True),
    "llama": dict(qkv_bias=False, qk_layernorm=False),
}
"""What a family implies without a config field saying it (``LanguageConfig`` fields)."""
MIXTURE_OF_EXPERTS = {
    "Qwen3MoeForCausalLM", "qwen3_moe", "Qwen2MoeForCausalLM", "qwen2_moe", "GptOssForCausalLM", "gpt_oss",
    "MixtralForCausalLM", "mixtral",
}  # fmt: skip


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
