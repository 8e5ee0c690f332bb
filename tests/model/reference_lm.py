"""An independent float64 InternLM2-style forward pass, written from the equations, for parity tests.

It reads a Megatron-Core GPTModel state dict (local spec names) and shares no code with the package.
"""

from __future__ import annotations

import numpy as np
import torch


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate(x: torch.Tensor, positions: np.ndarray, theta: float) -> torch.Tensor:
    """Rotate channel pairs (i, i + d/2) of x [s, h, d] by p·θ^(-2i/d), as complex numbers."""
    half = x.shape[-1] // 2
    freqs = theta ** (-2.0 * np.arange(half) / x.shape[-1])
    phase = torch.from_numpy(np.exp(1j * positions[:, None] * freqs))[:, None, :]
    z = torch.complex(x[..., :half], x[..., half:]) * phase
    return torch.cat([z.real, z.imag], dim=-1)


def reference_logits(
    state: dict[str, torch.Tensor],
    token_ids: torch.Tensor,
    positions: np.ndarray,
    *,
    num_layers: int,
    num_heads: int,
    num_groups: int,
    theta: float,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Logits [s, vocab] of one causal sequence, everything in float64."""
    w = {k: v.double() for k, v in state.items() if isinstance(v, torch.Tensor)}
    x = w["embedding.word_embeddings.weight"][token_ids]
    seq, hidden = x.shape
    head_dim = hidden // num_heads
    per_group = num_heads // num_groups
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    for i in range(num_layers):
        p = f"decoder.layers.{i}."
        h = _rms_norm(x, w[p + "input_layernorm.weight"], eps)
        qkv = (h @ w[p + "self_attention.linear_qkv.weight"].T).view(seq, num_groups, per_group + 2, head_dim)
        q = qkv[:, :, :per_group].reshape(seq, num_heads, head_dim)
        k = qkv[:, :, per_group].repeat_interleave(per_group, dim=1)
        v = qkv[:, :, per_group + 1].repeat_interleave(per_group, dim=1)
        q, k = _rotate(q, positions, theta), _rotate(k, positions, theta)
        scores = torch.einsum("shd,thd->hst", q, k) / head_dim**0.5
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out = torch.einsum("hst,thd->shd", attn, v).reshape(seq, hidden)
        x = x + out @ w[p + "self_attention.linear_proj.weight"].T
        h = _rms_norm(x, w[p + "pre_mlp_layernorm.weight"], eps)
        gate, up = (h @ w[p + "mlp.linear_fc1.weight"].T).chunk(2, dim=-1)
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.linear_fc2.weight"].T
    x = _rms_norm(x, w["decoder.final_layernorm.weight"], eps)
    return x @ w["output_layer.weight"].T
