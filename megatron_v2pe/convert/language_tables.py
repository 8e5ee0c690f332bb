"""The language-model half of the conversion tables, one per way a family names its tensors.

Both Hugging Face layouts keep the language model under ``language_model.``, named as its own
transformers class names it: the remote-code releases as the LLM was published (InternLM2's fused
``attention.wqkv`` and ``feed_forward.w1/w3``, or Qwen2 / Qwen3 / Llama's ``self_attn.q_proj`` ...), the
transformers-native layout as its text model (``LlamaForCausalLM`` for the InternLM2 releases, the
family's own class otherwise). Qwen2 adds the q/k/v biases to the Llama table, Qwen3 the per-head q/k
norms; tied embeddings have no output-layer rule (Megatron and transformers hold one tensor). The embedding and
output layer split their vocabulary rows ``Padded``: at a TP size not dividing the vocabulary, each rank's
piece is padded with zero rows (``model/tp_padding.py``).

InternLM2's ``wqkv`` is already fused per KV group as [q x heads/kv_heads | k | v], Megatron's own
layout, so it maps unchanged; separate q/k/v are regrouped per query group.
"""

from __future__ import annotations

from typing import Literal

from megatron_v2pe.convert.mapping import (
    IDENTITY, Concat, Padded, Rule, SeparateQKV, TPSplit, layer_rules, rule,
)  # fmt: skip
from megatron_v2pe.model.presets import LanguageConfig

COLUMN, ROW = TPSplit.COLUMN, TPSplit.ROW
Naming = Literal["internlm2", "llama"]

INTERNLM2_LAYER = [
    rule("attention_norm.weight", "input_layernorm.weight"),
    rule("attention.wqkv.weight", "self_attention.linear_qkv.weight", IDENTITY, COLUMN),
    rule("attention.wo.weight", "self_attention.linear_proj.weight", IDENTITY, ROW),
    rule("ffn_norm.weight", "pre_mlp_layernorm.weight"),
    rule(("feed_forward.w1.weight", "feed_forward.w3.weight"), "mlp.linear_fc1.weight", Concat(2),
         TPSplit.GATED_COLUMN),
    rule("feed_forward.w2.weight", "mlp.linear_fc2.weight", IDENTITY, ROW),
]  # fmt: skip

INTERNLM2_OUTSIDE_LAYERS = ("model.tok_embeddings.weight", "model.norm.weight", "output.weight")
LLAMA_OUTSIDE_LAYERS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def _q_k_v(kind: str) -> tuple[str, ...]:
    return tuple(f"self_attn.{p}_proj.{kind}" for p in "qkv")


def llama_layer(lm: LanguageConfig) -> list[Rule]:
    """Llama's layer; with Qwen2's q/k/v biases and Qwen3's q/k norms where the config has them."""
    qkv = SeparateQKV(lm.num_attention_heads, lm.num_query_groups, lm.kv_channels)
    rules = [
        rule("input_layernorm.weight", "input_layernorm.weight"),
        rule(_q_k_v("weight"), "self_attention.linear_qkv.weight", qkv, COLUMN),
        rule("self_attn.o_proj.weight", "self_attention.linear_proj.weight", IDENTITY, ROW),
        rule("post_attention_layernorm.weight", "pre_mlp_layernorm.weight"),
        rule(("mlp.gate_proj.weight", "mlp.up_proj.weight"), "mlp.linear_fc1.weight", Concat(2),
             TPSplit.GATED_COLUMN),
        rule("mlp.down_proj.weight", "mlp.linear_fc2.weight", IDENTITY, ROW),
    ]  # fmt: skip
    if lm.qkv_bias:
        rules.append(rule(_q_k_v("bias"), "self_attention.linear_qkv.bias", qkv, COLUMN))
    if lm.qk_layernorm:
        rules += [
            rule("self_attn.q_norm.weight", "self_attention.q_layernorm.weight"),
            rule("self_attn.k_norm.weight", "self_attention.k_layernorm.weight"),
        ]
    return rules


def language_rules(lm: LanguageConfig, naming: Naming) -> list[Rule]:
    """Every rule of the language model, Hugging Face names under ``language_model.``."""
    embedding, norm, output = INTERNLM2_OUTSIDE_LAYERS if naming == "internlm2" else LLAMA_OUTSIDE_LAYERS
    layer = INTERNLM2_LAYER if naming == "internlm2" else llama_layer(lm)
    vocabulary = Padded(COLUMN, lm.vocab_size)  # rows padded to a multiple of TP on the last rank
    rules = [
        rule(f"language_model.{embedding}", "language_model.embedding.word_embeddings.weight", IDENTITY,
             vocabulary),
        rule(f"language_model.{norm}", "language_model.decoder.final_layernorm.weight"),
    ]  # fmt: skip
    if not lm.tie_word_embeddings:
        rules.append(
            rule(f"language_model.{output}", "language_model.output_layer.weight", IDENTITY, vocabulary)
        )
    return [
        *rules,
        *layer_rules("language", "language_model.model.layers", "language_model.decoder.layers", layer),
    ]
