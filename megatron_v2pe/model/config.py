"""Transformer configurations of the InternLM2 family (the language model of InternVL2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


def common_transformer_fields(params_dtype: torch.dtype) -> dict:
    """What every transformer of the VLM shares: no dropout (InternVL2 trains without), one precision,
    weights initialised on the CPU when there is no GPU."""
    return dict(
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=not torch.cuda.is_available(),
    )


def internlm2_transformer_config(
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int,
    ffn_hidden_size: int,
    *,
    layernorm_epsilon: float = 1e-5,
    params_dtype: torch.dtype = torch.float32,
    **overrides,
) -> TransformerConfig:
    """InternLM2 blocks: RMSNorm, SwiGLU MLP, grouped-query attention, no biases, no dropout.

    ``overrides`` go straight to TransformerConfig (parallel sizes, recompute, precision, ...).
    """
    fields = dict(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        num_query_groups=num_query_groups,
        ffn_hidden_size=ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=layernorm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        **common_transformer_fields(params_dtype),
    )
    fields.update(overrides)
    return TransformerConfig(**fields)
