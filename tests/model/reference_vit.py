"""An independent float64 InternViT + pixel shuffle + projector forward pass, written from the equations,
for parity tests. It reads the state dicts of the package's modules (local spec names) and shares no code
with the package.
"""

from __future__ import annotations

import math

import torch


def _double(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in state.items() if isinstance(v, torch.Tensor)}


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _patchify(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """[n, 3, S, S] -> [n, N, 3·p·p]: patches row-major, each flattened as (channel, row, column)."""
    n, ch, size, _ = pixels.shape
    side = size // patch
    x = pixels.reshape(n, ch, side, patch, side, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, side * side, ch * patch * patch)


def reference_vit_features(
    state: dict[str, torch.Tensor],
    pixels: torch.Tensor,
    *,
    num_layers: int,
    num_heads: int,
    patch_size: int,
    eps: float = 1e-6,
) -> torch.Tensor:
    """InternViT patch features [n, N, H] (CLS dropped), float64.

    x0 = [cls; W_patch · patch + b] + pos; per layer
    x += ls1 ⊙ proj(softmax(q kᵀ/√d) v) on LN1(x) (bidirectional); x += ls2 ⊙ fc2(gelu(fc1(LN2(x)))).
    """
    w = _double(state)
    conv = w["embeddings.patch_embedding.weight"]
    patches = _patchify(pixels.double(), patch_size) @ conv.reshape(conv.shape[0], -1).T
    patches = patches + w["embeddings.patch_embedding.bias"]
    n, num_patches, hidden = patches.shape
    cls = w["embeddings.class_embedding"].expand(n, 1, hidden)
    x = torch.cat([cls, patches], dim=1) + w["embeddings.position_embedding"]
    seq, head_dim = num_patches + 1, hidden // num_heads
    for i in range(num_layers):
        p = f"decoder.layers.{i}."
        h = _layer_norm(x, w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"], eps)
        qkv = h @ w[p + "self_attention.linear_qkv.weight"].T + w[p + "self_attention.linear_qkv.bias"]
        # Megatron-Core's fused QKV output is grouped per head: [head][q | k | v][head_dim].
        q, k, v = qkv.view(n, seq, num_heads, 3, head_dim).unbind(3)
        attn = (torch.einsum("nshd,nthd->nhst", q, k) / math.sqrt(head_dim)).softmax(-1)
        out = torch.einsum("nhst,nthd->nshd", attn, v).reshape(n, seq, hidden)
        out = out @ w[p + "self_attention.linear_proj.weight"].T + w[p + "self_attention.linear_proj.bias"]
        x = x + w[p + "ls1"] * out
        h = _layer_norm(x, w[p + "pre_mlp_layernorm.weight"], w[p + "pre_mlp_layernorm.bias"], eps)
        h = _gelu(h @ w[p + "mlp.linear_fc1.weight"].T + w[p + "mlp.linear_fc1.bias"])
        x = x + w[p + "ls2"] * (h @ w[p + "mlp.linear_fc2.weight"].T + w[p + "mlp.linear_fc2.bias"])
    return x[:, 1:]


def reference_pixel_shuffle(features: torch.Tensor, k: int, version: str = "v2") -> torch.Tensor:
    """Space-to-depth on the row-major patch grid: token (r, c) of the folded grid holds patches
    (r·k + i, c·k + j), channels ordered (i, j, C); [n, N, C] -> [n, N/k², k²·C]. Tokens are listed
    row-major ('v2') or column-major ('v1', InternVL's transposed grid)."""
    n, num_patches, channels = features.shape
    side = math.isqrt(num_patches)
    x = features.reshape(n, side // k, k, side // k, k, channels)  # [n, r, i, c, j, C]
    order = {"v2": (0, 1, 3, 2, 4, 5), "v1": (0, 3, 1, 2, 4, 5)}[version]
    return x.permute(*order).reshape(n, num_patches // (k * k), k * k * channels)


def reference_projector(
    state: dict[str, torch.Tensor], tokens: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """InternVL2's mlp1 on [..., k²·C]: fc2(gelu(fc1(LN(x))))."""
    w = _double(state)
    h = _layer_norm(tokens.double(), w["layer_norm.weight"], w["layer_norm.bias"], eps)
    h = _gelu(h @ w["linear_fc1.weight"].T + w["linear_fc1.bias"])
    return h @ w["linear_fc2.weight"].T + w["linear_fc2.bias"]


def reference_image_embeddings(
    vit_state: dict[str, torch.Tensor],
    projector_state: dict[str, torch.Tensor],
    pixels: torch.Tensor,
    *,
    num_layers: int,
    num_heads: int,
    patch_size: int,
    shuffle: int,
    ps_version: str = "v2",
) -> torch.Tensor:
    """[tiles, 3, S, S] -> [tiles · tokens_per_tile, D]: what fills the <IMG_CONTEXT> slots, tile-major;
    ``num_layers`` ViT layers are run (InternVL's select_layer picks how many)."""
    features = reference_vit_features(vit_state, pixels, num_layers=num_layers, num_heads=num_heads,
                                      patch_size=patch_size)
    tokens = reference_pixel_shuffle(features, shuffle, ps_version)
    return reference_projector(projector_state, tokens.reshape(-1, tokens.shape[-1]))
