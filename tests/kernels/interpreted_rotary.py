"""The fused rotary kernel against the unfused PyTorch path, run on CPU tensors by the Triton interpreter.

Not collected by the main pytest run (the name does not start with ``test_``): ``test_rotary_triton.py``
runs this file in a subprocess with TRITON_INTERPRET=1, which Triton reads when a kernel is decorated,
that is, when ``megatron_v2pe.kernels.rotary_triton`` is first imported.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from megatron_v2pe.kernels.rotary_triton import BLOCK_TOKENS, fused_rotary_qk, rotate_qk_once
from megatron_v2pe.v2pe.rotary import apply_rotary, inverse_frequencies, rotary_angles
from tests.kernels.helpers import THETA, reference_rotation, split_qkv, v2pe_angles
from tests.unit.test_rotary import _exact_angles, _wrapped_error

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs under TRITON_INTERPRET=1 only (see test_rotary_triton.py)", allow_module_level=True)

SEQ, BATCH, Q_HEADS, KV_HEADS, HEAD_DIM = 45, 2, 4, 2, 32  # 90 tokens: not a multiple of BLOCK_TOKENS
# bf16: one step (2^-7 relative), since the interpreter truncates float32 -> bf16 where a GPU rounds to
# nearest (half a step; the CUDA test checks that bound).
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-6), torch.bfloat16: dict(atol=1e-5, rtol=2**-7)}


def _inputs(dtype, rot_dim=HEAD_DIM, offset=0.0):
    query, key = split_qkv(SEQ, BATCH, Q_HEADS, KV_HEADS, HEAD_DIM, dtype, "cpu")
    return query, key, v2pe_angles(SEQ, BATCH, rot_dim, "cpu", offset=offset)


def test_shapes_cover_a_partial_token_block():
    assert (SEQ * BATCH) % BLOCK_TOKENS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_percent", [1.0, 0.5])
def test_forward_matches_unfused(dtype, rotary_percent):
    query, key, angles = _inputs(dtype, rot_dim=int(HEAD_DIM * rotary_percent), offset=2.0**20)
    q_out, k_out = fused_rotary_qk(query, key, angles)
    assert q_out.shape == query.shape and k_out.shape == key.shape
    assert q_out.dtype == dtype and k_out.dtype == dtype
    for x, out in ((query, q_out), (key, k_out)):
        torch.testing.assert_close(out.double(), reference_rotation(x, angles), **TOLERANCE[dtype])
        # The unfused path rounds cos, sin and each product to bf16: within a few bf16 steps of ours.
        torch.testing.assert_close(out, apply_rotary(x, angles), atol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                                   rtol=2e-2 if dtype == torch.bfloat16 else 1e-5)
        rot_dim = angles.shape[-1]
        assert torch.equal(out[..., rot_dim:], x[..., rot_dim:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_unfused_autograd(dtype):
    query, key, angles = _inputs(dtype, rot_dim=HEAD_DIM // 2)
    query.requires_grad_(True)
    key.requires_grad_(True)
    generator = torch.Generator().manual_seed(5)
    # Upstream gradients with their own odd strides.
    grad_q = torch.randn(BATCH, SEQ, Q_HEADS, HEAD_DIM, generator=generator).to(dtype).transpose(0, 1)
    grad_k = torch.randn(SEQ, BATCH, HEAD_DIM, KV_HEADS, generator=generator).to(dtype).transpose(2, 3)
    got = torch.autograd.grad(fused_rotary_qk(query, key, angles), (query, key), (grad_q, grad_k))

    q64, k64 = query.detach().double().requires_grad_(True), key.detach().double().requires_grad_(True)
    outputs = (apply_rotary(q64, angles.double()), apply_rotary(k64, angles.double()))
    expected = torch.autograd.grad(outputs, (q64, k64), (grad_q.double(), grad_k.double()))
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), e, **TOLERANCE[dtype])


def test_angles_with_unequal_halves_forward_and_backward():
    """rotary_angles repeats the d/2 angles twice, but the kernel reads all d, as apply_rotary does: any
    angles give the unfused result and its autograd gradient."""
    query, key, _ = _inputs(torch.float32)
    angles = torch.rand(SEQ, BATCH, 1, HEAD_DIM, generator=torch.Generator().manual_seed(2)) * (2 * math.pi)
    query.requires_grad_(True)
    key.requires_grad_(True)
    q_out, k_out = fused_rotary_qk(query, key, angles)
    torch.testing.assert_close(q_out.double(), reference_rotation(query.detach(), angles), atol=1e-5, rtol=1e-6)
    grads = (torch.randn_like(q_out), torch.randn_like(k_out))
    got = torch.autograd.grad((q_out, k_out), (query, key), grads)
    expected = torch.autograd.grad((apply_rotary(query, angles), apply_rotary(key, angles)), (query, key), grads)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_transpose_undoes_the_rotation():
    query, key, angles = _inputs(torch.float32)
    back_q, back_k = rotate_qk_once(*fused_rotary_qk(query, key, angles), angles, transpose=True)
    torch.testing.assert_close(back_q, query, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(back_k, key, atol=1e-5, rtol=1e-5)


def test_angles_broadcast_over_batch():
    query, key, _ = _inputs(torch.float32)
    angles = v2pe_angles(SEQ, 1, HEAD_DIM, "cpu")
    expanded = angles.expand(-1, BATCH, -1, -1)
    for x, out in zip((query, key), fused_rotary_qk(query, key, angles), strict=True):
        torch.testing.assert_close(out.double(), reference_rotation(x, expanded), **TOLERANCE[torch.float32])


def test_rotation_is_within_1e_6_rad_of_the_exact_angle_up_to_2_pow_22():
    """The kernel's rotation of (1, 0) pairs, read back as an angle, against a 40-digit computation: the
    same positions and bound as tests/unit/test_rotary.py's check of the angles themselves."""
    rng = np.random.default_rng(0)
    positions = np.concatenate(
        [rng.integers(0, 2**30, size=12) / 256.0, [2**22 - 1 / 256, 2**22, 2**21 + 0.5, 3.25]]
    )
    head_dim = 128
    angles = rotary_angles(torch.from_numpy(positions), inverse_frequencies(head_dim, THETA))
    unit = torch.zeros(len(positions), 1, 1, head_dim)
    unit[..., : head_dim // 2] = 1.0
    rotated, _ = fused_rotary_qk(unit, unit, angles)
    rotated = rotated[:, 0, 0].double().numpy()
    measured = np.arctan2(rotated[:, head_dim // 2 :], rotated[:, : head_dim // 2]) % (2 * math.pi)
    exact = _exact_angles(positions.tolist(), head_dim, THETA)
    assert _wrapped_error(measured, exact).max() <= 1e-6


@pytest.mark.usefixtures("megatron_runtime")
def test_v2pe_model_with_fused_rotary_matches_unfused(monkeypatch):
    """The tiny V2PE language model, packed THD with fractional positions: logits and every gradient are
    the same whether V2PESelfAttention rotates through the kernel or through the PyTorch path."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_v2pe.kernels import rotary_triton
    from megatron_v2pe.model.config import internlm2_transformer_config
    from megatron_v2pe.model.language_model import V2PEGPTModel
    from megatron_v2pe.model.layer_specs import v2pe_layer_spec
    from megatron_v2pe.v2pe import fused

    torch.manual_seed(7)
    model = V2PEGPTModel(internlm2_transformer_config(2, 64, 4, 2, 160), v2pe_layer_spec("reference"), 96, 4096,
                         rotary_base=THETA, share_embeddings_and_output_weights=False)
    cu = torch.tensor([0, 40, 64], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=40, max_seqlen_kv=40)
    ids = torch.randint(0, 96, (1, 64), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(40) * 0.25, torch.arange(24) / 256.0]).to(torch.float64)[None] + 2.0**20

    kernel_calls = []
    monkeypatch.setattr(rotary_triton, "fused_rotary_qk",
                        lambda *args: kernel_calls.append(1) or rotary_triton.FusedRotaryQK.apply(*args))

    def run(use_fused: bool):
        monkeypatch.setattr(fused, "uses_fused_rotary", lambda query: use_fused)
        model.zero_grad()
        logits = model(ids, None, positions=positions, packed_seq_params=packed)
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fused_logits, fused_grads = run(True)
    assert len(kernel_calls) == 2  # one per layer
    logits, grads = run(False)
    torch.testing.assert_close(fused_logits, logits, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-5, rtol=1e-4,
                                   msg=lambda message, name=name: f"{name}: {message}")
