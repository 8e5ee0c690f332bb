"""Transformer-layer specs whose self-attention rotates q and k with V2PE angles.

Megatron-Core's own rope path indexes its angle table by the offset of each token inside its packed
sub-sample (and by chunk under context parallelism). V2PE positions are per-token data, already
permuted and sharded with the tokens, so the angles must be applied to the token they belong to, as is.
``V2PESelfAttention`` does exactly that, for the bshd and THD layouts alike, and is slotted into the
local or the Transformer Engine spec; every other submodule stays Megatron-Core's.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_v2pe.model.norms import TorchNorm
from megatron_v2pe.parallel.attention_backends import (
    AttentionBackend,
    local_core_attention,
    resolve_attention_backend,
)
from megatron_v2pe.v2pe.fused import rotate_qk


class V2PESelfAttention(SelfAttention):
    """Self-attention that applies per-token rotary angles [s, b, 1, d] right after the QKV projection.

    The angles arrive as ``rotary_pos_emb`` (the slot Megatron-Core threads through every layer); they
    are taken out of Megatron's rope path and applied here instead, token by token.
    """

    _angles: Optional[Tensor] = None

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
        self._angles = rotary_pos_emb
        try:
            return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs)
        finally:
            self._angles = None

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, *args, **kwargs):
        qkv = super().get_query_key_value_tensors(hidden_states, key_value_states, *args, **kwargs)
        if self._angles is None:
            return qkv
        query, key, *rest = qkv
        return (*rotate_qk(query, key, self._angles), *rest)


def replace_attention(
    spec: ModuleSpec,
    *,
    attention_module: Optional[type] = None,
    core_attention: Optional[type] = None,
    attention_params: Optional[dict] = None,
    layer_module: Optional[type] = None,
) -> ModuleSpec:
    """A copy of a transformer-layer spec with its self-attention (module, core attention or params)
    and optionally the layer class itself replaced; every other submodule is kept."""
    attention = spec.submodules.self_attention
    submodules = attention.submodules
    if core_attention is not None:
        submodules = dataclasses.replace(submodules, core_attention=ModuleSpec(module=core_attention))
    attention = dataclasses.replace(
        attention,
        module=attention_module or attention.module,
        params={**attention.params, **(attention_params or {})},
        submodules=submodules,
    )
    return dataclasses.replace(
        spec,
        module=layer_module or spec.module,
        submodules=dataclasses.replace(spec.submodules, self_attention=attention),
    )


def base_layer_spec(backend: str, normalization: str, qk_layernorm: bool = False) -> ModuleSpec:
    """Megatron-Core's GPT layer spec for a resolved backend: TE modules, or local linears with our
    PyTorch core attention and norms that support sequence parallelism."""
    if backend == "te":
        # TE's norm modules read the normalization kind from the TransformerConfig.
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization=normalization)
    spec = dataclasses.replace(
        spec,
        submodules=dataclasses.replace(spec.submodules, input_layernorm=TorchNorm, pre_mlp_layernorm=TorchNorm),
    )
    spec = replace_attention(spec, core_attention=local_core_attention(backend))
    return with_qk_norm(spec, TorchNorm) if qk_layernorm else spec


def with_qk_norm(spec: ModuleSpec, norm: type) -> ModuleSpec:
    """Per-head q/k norms (Qwen3) of class ``norm``, so that they too run under sequence parallelism."""
    attention = spec.submodules.self_attention
    submodules = dataclasses.replace(attention.submodules, q_layernorm=norm, k_layernorm=norm)
    attention = dataclasses.replace(attention, submodules=submodules)
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=attention))


def final_norm(backend: str) -> type:
    """The norm after the last decoder layer, matching the layer spec of ``backend``."""
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return TorchNorm


def v2pe_layer_spec(
    backend: AttentionBackend = "auto",
    normalization: str = "RMSNorm",
    qk_layernorm: bool = False,
) -> ModuleSpec:
    """A GPT transformer-layer spec with V2PE attention.

    ``te``: Transformer Engine linears and attention. ``torch`` / ``reference``: Megatron-Core's local
    linears with our PyTorch core attention (see ``parallel/attention_backends.py``). ``normalization``
    ('RMSNorm' or 'LayerNorm') must match the TransformerConfig's.
    """
    spec = base_layer_spec(resolve_attention_backend(backend), normalization, qk_layernorm)
    return replace_attention(spec, attention_module=V2PESelfAttention)


def v2pe_decoder_block_spec(
    config: TransformerConfig, backend: AttentionBackend = "auto", vp_stage: Optional[int] = None
) -> TransformerBlockSubmodules:
    """The decoder block of this pipeline stage: its share of V2PE layers and the matching final norm."""
    backend = resolve_attention_backend(backend)
    layer = v2pe_layer_spec(backend, config.normalization, config.qk_layernorm)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage), layer_norm=final_norm(backend)
    )
