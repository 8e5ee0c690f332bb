"""What InternViT-6B (InternViT-6B-448px-V1-5 / V2_5) changes in the InternViT layer.

Against InternViT-300M: RMSNorm instead of LayerNorm (``VisionConfig.normalization``), no bias on the qkv
projection (the output projection and the MLP keep theirs), and q and k each RMS-normalised over *all*
heads together (width heads × head_dim, InternViT's ``q_norm`` / ``k_norm``), not per head as Megatron's
``q_layernorm`` is. Under tensor parallelism each rank holds its heads' share of that width, so the sum
of squares is all-reduced across the tensor-parallel group (in both directions: autograd's
``all_reduce``) and each rank keeps its slice of the norm weight (split like a column-parallel output).

The norms are attributes ``q_norm`` / ``k_norm`` of the attention module, not Megatron's
``q_layernorm`` slots: Megatron all-reduces every ``q_layernorm`` gradient across tensor-parallel ranks
when the (language) config has ``qk_layernorm`` (Qwen3), which would sum the slices of different ranks.

At a TP size that does not divide the 25 heads, the tower is built with zero heads padded up to a
multiple of it (``tp_padding``; ``vision_transformer_config`` pads). The norms then divide the
all-reduced sum of squares by the real width, ``hidden_size`` (InternViT's heads span exactly the hidden
width), not by the padded one; the padded queries and keys add nothing to the sum.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed.nn.functional as dist_fn
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from torch import Tensor

from megatron_v2pe.model.tp_padding import TPPadding, unpadded_sharded_tensor, zero_padding
from megatron_v2pe.model.layer_specs import replace_attention


class CrossHeadRMSNorm(torch.nn.Module):
    """RMSNorm of [s, b, heads, head_dim] over heads × head_dim of every head (all tensor-parallel ranks)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.real_width = config.hidden_size  # the padded heads' zeros are not averaged in
        local = config.num_attention_heads * config.kv_channels // config.tensor_model_parallel_size
        self.weight = torch.nn.Parameter(torch.ones(local, dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)
        self.eps = config.layernorm_epsilon
        self.parallel = config.tensor_model_parallel_size > 1

    def forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(-2).float()
        sum_of_squares = flat.pow(2).sum(-1, keepdim=True)
        if self.parallel:
            group = parallel_state.get_tensor_model_parallel_group()
            sum_of_squares = dist_fn.all_reduce(sum_of_squares, group=group)
        normed = flat * torch.rsqrt(sum_of_squares / self.real_width + self.eps)
        return (self.weight * normed.to(x.dtype)).view(x.shape)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Any = None) -> dict:
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0}, sharded_offsets)


PADDED_BY_HEAD = {  # parameter -> the dimension its heads lie side by side along
    "linear_qkv.weight": 0,
    "linear_qkv.bias": 0,
    "linear_proj.weight": 1,
    "q_norm.weight": 0,
    "k_norm.weight": 0,
}


class CrossHeadQKNormAttention(SelfAttention):
    """Self-attention whose q and k are normalised by ``CrossHeadRMSNorm`` right after the projection;
    with padded heads (more heads than ``hidden_size / kv_channels``) those are zero and checkpointed
    as the unpadded tensors (``tp_padding``)."""

    def __init__(self, config: TransformerConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.q_norm = CrossHeadRMSNorm(config)
        self.k_norm = CrossHeadRMSNorm(config)
        real_heads = config.hidden_size // config.kv_channels
        self.padding = None
        if config.num_attention_heads != real_heads:
            self.padding = TPPadding(
                real_heads, config.num_attention_heads, config.tensor_model_parallel_size,
                parallel_state.get_tensor_model_parallel_rank(),
            )  # fmt: skip
            params = dict(self.named_parameters())
            for name, dim in PADDED_BY_HEAD.items():
                if name in params:
                    zero_padding(params[name], dim, self.padding)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Any = None) -> dict:
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.padding is not None:
            for name, dim in PADDED_BY_HEAD.items():
                if prefix + name in state:
                    state[prefix + name] = unpadded_sharded_tensor(state[prefix + name], dim, self.padding)
        return state

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, *args, **kwargs):
        qkv = super().get_query_key_value_tensors(hidden_states, key_value_states, *args, **kwargs)
        query, key, *rest = qkv
        return (self.q_norm(query), self.k_norm(key), *rest)


def without_bias(linear: type) -> type:
    """``linear`` built without a bias whatever it is asked for (Megatron gives the qkv projection one
    whenever ``add_bias_linear`` is set, which the output projection and MLP need)."""

    def __init__(self, *args, bias: bool = False, **kwargs):
        linear.__init__(self, *args, bias=False, **kwargs)

    return type(f"{linear.__name__}WithoutBias", (linear,), {"__init__": __init__})


def internvit_6b_spec(spec: ModuleSpec, *, qkv_bias: bool, qk_normalization: bool) -> ModuleSpec:
    """The InternViT layer spec ``spec`` with the qkv bias dropped and / or cross-head q/k norms."""
    if not qkv_bias:
        attention = spec.submodules.self_attention
        linear_qkv = attention.submodules.linear_qkv
        if isinstance(linear_qkv, ModuleSpec):
            linear_qkv = dataclasses.replace(linear_qkv, module=without_bias(linear_qkv.module))
        else:
            linear_qkv = without_bias(linear_qkv)
        attention = dataclasses.replace(
            attention, submodules=dataclasses.replace(attention.submodules, linear_qkv=linear_qkv)
        )
        submodules = dataclasses.replace(spec.submodules, self_attention=attention)
        spec = dataclasses.replace(spec, submodules=submodules)
    if qk_normalization:
        spec = replace_attention(spec, attention_module=CrossHeadQKNormAttention)
    return spec


NORMALIZATIONS = {"layer_norm": "LayerNorm", "rms_norm": "RMSNorm"}


def vision_normalization(norm_type: str) -> str:
    """The ``VisionConfig.normalization`` of InternViT's ``norm_type``."""
    if norm_type not in NORMALIZATIONS:
        raise ValueError(f"{norm_type!r} is not one of {sorted(NORMALIZATIONS)}")
    return NORMALIZATIONS[norm_type]


def read_vision_variant(norm_type: str, qkv_bias: bool, qk_normalization: bool) -> dict[str, Any]:
    """The ``VisionConfig`` fields of a tower's norm type, qkv bias and q/k normalisation."""
    try:
        normalization = vision_normalization(norm_type)
    except ValueError as err:
        raise ValueError(f"vision_config.norm_type {err}") from None
    return dict(normalization=normalization, qkv_bias=bool(qkv_bias), qk_normalization=bool(qk_normalization))
