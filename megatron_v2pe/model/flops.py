"""Model FLOPs of the VLM, for throughput and MFU reporting.

Counts matrix multiplications only (2 FLOPs per multiply-add), as MFU conventionally does. Training
costs 3x the forward pass (backward = 2x forward). Attention is counted as it is computed: causal within
each packed sub-sample for the language model (Σ L_j²/2 query-key pairs, not (Σ L_j)²), bidirectional
over the patches of each tile for the vision tower. Frozen modules are counted as if trained, the usual
convention, so MFU stays comparable across freezing choices.
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_v2pe.model.presets import VLMConfig

H100_BF16_DENSE_PEAK = 989e12
"""H100 SXM dense bf16 peak, FLOP/s."""


def language_forward_flops(config: VLMConfig, seqlens: Sequence[int]) -> float:
    lm = config.language
    tokens = sum(seqlens)
    q_size = lm.num_attention_heads * lm.kv_channels  # hidden_size unless the head width is its own
    kv_size = 2 * lm.num_query_groups * lm.kv_channels
    per_token = (
        lm.hidden_size * (q_size + kv_size)  # qkv
        + q_size * lm.hidden_size  # output projection
        + 3 * lm.hidden_size * lm.ffn_hidden_size  # SwiGLU: gate, up, down
    )
    causal_pairs = sum(n * (n + 1) / 2 for n in seqlens)
    attention = 2 * q_size * causal_pairs  # q·k and attn·v, all heads
    logits = lm.hidden_size * lm.vocab_size * tokens
    return 2 * (lm.num_layers * (per_token * tokens + attention) + logits)


def vision_forward_flops(config: VLMConfig, num_tiles: int) -> float:
    vit = config.vision
    seq = vit.num_patches + 1  # with the CLS token
    per_token = 4 * vit.hidden_size**2 + 2 * vit.hidden_size * vit.ffn_hidden_size
    attention = 2 * vit.hidden_size * seq * seq
    patch_embed = 3 * vit.patch_size**2 * vit.hidden_size * vit.num_patches
    per_tile = vit.num_layers * (per_token * seq + attention) + patch_embed
    return 2 * per_tile * num_tiles


def projector_forward_flops(config: VLMConfig, num_tiles: int) -> float:
    hidden = config.language.hidden_size
    per_token = config.projector_input_size * hidden + hidden * hidden
    return 2 * per_token * config.tokens_per_tile * num_tiles


def training_flops_per_pack(config: VLMConfig, seqlens: Sequence[int], num_tiles: int) -> float:
    """Forward + backward FLOPs of one packed micro-batch with sub-sample lengths ``seqlens``."""
    forward = (
        language_forward_flops(config, seqlens)
        + vision_forward_flops(config, num_tiles)
        + projector_forward_flops(config, num_tiles)
    )
    return 3 * forward


def mfu(flops_per_second_per_gpu: float, peak: float = H100_BF16_DENSE_PEAK) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's dense peak."""
    return flops_per_second_per_gpu / peak
