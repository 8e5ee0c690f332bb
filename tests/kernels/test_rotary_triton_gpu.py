"""The fused rotary kernel compiled for a CUDA GPU, against the unfused path at InternVL2-2B shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_v2pe.optional_deps import is_available
from megatron_v2pe.v2pe.fused import rotate_qk, uses_fused_rotary
from megatron_v2pe.v2pe.rotary import apply_rotary, inverse_frequencies, rotary_angles
from tests.kernels.helpers import THETA, reference_rotation, split_qkv, v2pe_angles
from tests.unit.test_rotary import _exact_angles, _wrapped_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or not is_available("triton"),
                       reason="needs a CUDA GPU and Triton"),
]

TOKENS, Q_HEADS, KV_HEADS, HEAD_DIM = 4099, 16, 8, 128  # not a multiple of the token block
# float32: GPU cos/sin within a few ulp; bf16: round to nearest, half a step (2^-8 relative).
TOLERANCE = {torch.float32: dict(atol=2e-6, rtol=1e-6), torch.bfloat16: dict(atol=1e-5, rtol=2**-8)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_percent", [1.0, 0.5])
def test_fused_matches_unfused_forward_and_backward(dtype, rotary_percent):
    query, key = split_qkv(TOKENS, 1, Q_HEADS, KV_HEADS, HEAD_DIM, dtype, "cuda")
    angles = v2pe_angles(TOKENS, 1, int(HEAD_DIM * rotary_percent), "cuda", offset=2.0**20)
    query.requires_grad_(True)
    key.requires_grad_(True)
    assert uses_fused_rotary(query)
    q_out, k_out = rotate_qk(query, key, angles)
    for x, out in ((query, q_out), (key, k_out)):
        torch.testing.assert_close(out.double(), reference_rotation(x.detach(), angles), **TOLERANCE[dtype])

    grads = (torch.randn_like(q_out), torch.randn_like(k_out))
    got = torch.autograd.grad((q_out, k_out), (query, key), grads)
    q64, k64 = query.detach().double().requires_grad_(True), key.detach().double().requires_grad_(True)
    expected = torch.autograd.grad((apply_rotary(q64, angles.double()), apply_rotary(k64, angles.double())),
                                   (q64, k64), tuple(g.double() for g in grads))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.double(), e, **TOLERANCE[dtype])


def test_rotation_is_within_1e_6_rad_of_the_exact_angle_up_to_2_pow_22():
    """The GPU's cos/sin keep the rotation as exact as the angles (see interpreted_rotary.py)."""
    rng = np.random.default_rng(0)
    positions = np.concatenate(
        [rng.integers(0, 2**30, size=12) / 256.0, [2**22 - 1 / 256, 2**22, 2**21 + 0.5, 3.25]]
    )
    angles = rotary_angles(torch.from_numpy(positions), inverse_frequencies(HEAD_DIM, THETA)).cuda()
    unit = torch.zeros(len(positions), 1, 1, HEAD_DIM, device="cuda")
    unit[..., : HEAD_DIM // 2] = 1.0
    rotated = rotate_qk(unit, unit, angles)[0][:, 0, 0].double().cpu().numpy()
    measured = np.arctan2(rotated[:, HEAD_DIM // 2 :], rotated[:, : HEAD_DIM // 2]) % (2 * math.pi)
    exact = _exact_angles(positions.tolist(), HEAD_DIM, THETA)
    assert _wrapped_error(measured, exact).max() <= 1e-6
