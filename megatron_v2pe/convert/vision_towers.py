"""InternViT-6B's tensors against InternViT-300M's, for the vision-layer table of either layout.

Each layout writes the InternViT-300M layer once; ``for_tower`` turns it into the table of the tower the
config describes: RMSNorm has no norm biases, the 6B's qkv projection no bias, and its cross-head q/k
norms (``model/internvit_6b.py``) are one weight of width heads × head_dim each, split across
tensor-parallel ranks with the heads. Its per-head tensors split as ``Padded`` heads: at a TP size not
dividing the heads each rank's piece is padded with zero heads (``model/tp_padding.py``).
"""

from __future__ import annotations

import dataclasses

from megatron_v2pe.convert.mapping import IDENTITY, Padded, Rule, TPSplit, rule
from megatron_v2pe.model.presets import VisionConfig

NORM_BIASES = {"input_layernorm.bias", "pre_mlp_layernorm.bias"}
PER_HEAD = {
    f"self_attention.{name}"
    for name in ("linear_qkv.weight", "linear_qkv.bias", "linear_proj.weight", "q_norm.weight",
                 "k_norm.weight")
}  # fmt: skip


def for_tower(layer: list[Rule], vision: VisionConfig, q_norm: str, k_norm: str) -> list[Rule]:
    """``layer`` (InternViT-300M's rules) for ``vision``; ``q_norm`` / ``k_norm`` are the layout's names."""
    dropped = set()
    if vision.normalization == "RMSNorm":
        dropped |= NORM_BIASES
    if not vision.qkv_bias:
        dropped.add("self_attention.linear_qkv.bias")
    rules = [r for r in layer if r.megatron not in dropped]
    if vision.qk_normalization:
        rules += [
            rule(q_norm, "self_attention.q_norm.weight", IDENTITY, TPSplit.COLUMN),
            rule(k_norm, "self_attention.k_norm.weight", IDENTITY, TPSplit.COLUMN),
        ]
        heads = vision.num_attention_heads
        rules = [
            dataclasses.replace(r, split=Padded(r.split, heads))
            if r.megatron in PER_HEAD else r
            for r in rules
        ]  # fmt: skip
    return rules
