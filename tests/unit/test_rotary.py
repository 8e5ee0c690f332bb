"""V2PE rotary angles and rotation, checked against exact and direct-formula references."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch

from megatron_v2pe.v2pe.rotary import (
    DynamicNTK,
    V2PERotaryEmbedding,
    apply_rotary,
    inverse_frequencies,
    rotary_angles,
    sequence_lengths,
)

HEAD_DIM = 128
THETA = 1e6


def _exact_angles(positions: list[float], head_dim: int, theta: float) -> np.ndarray:
    """angle = p · θ^(-2j/d) mod 2π with 40 significant digits (mpmath), as float64."""
    mpmath.mp.dps = 40
    two_pi = 2 * mpmath.pi
    out = np.empty((len(positions), head_dim // 2))
    for i, p in enumerate(positions):
        for j in range(head_dim // 2):
            angle = mpmath.mpf(p) * mpmath.power(mpmath.mpf(theta), -mpmath.mpf(2 * j) / head_dim)
            out[i, j] = float(angle - two_pi * mpmath.floor(angle / two_pi))
    return out


def _wrapped_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| on the circle."""
    d = np.remainder(a - b, 2 * math.pi)
    return np.minimum(d, 2 * math.pi - d)


def test_angles_match_exact_computation_up_to_2_pow_22():
    rng = np.random.default_rng(0)
    # Dyadic fractional positions (what V2PE produces), spread up to 2^22, including the top end.
    positions = np.concatenate(
        [rng.integers(0, 2**30, size=12) / 256.0, [2**22 - 1 / 256, 2**22, 2**21 + 0.5, 3.25]]
    )
    exact = _exact_angles(positions.tolist(), HEAD_DIM, THETA)

    ours = rotary_angles(torch.from_numpy(positions), inverse_frequencies(HEAD_DIM, THETA))
    assert ours.shape == (len(positions), 1, 1, HEAD_DIM)
    assert ours.dtype == torch.float32
    ours = ours[:, 0, 0, : HEAD_DIM // 2].double().numpy()
    assert _wrapped_error(ours, exact).max() <= 1e-6

    # The naive float32 product (what a float32 rope computes) is far off at these positions.
    naive = torch.from_numpy(positions).float()[:, None] * inverse_frequencies(HEAD_DIM, THETA).float()
    assert _wrapped_error(naive.double().numpy(), exact).max() > 1e-2


def test_angle_layout_is_rotate_half_and_batched():
    positions = torch.tensor([[0.0, 1.0, 2.5], [3.0, 0.25, 7.0]], dtype=torch.float64)
    angles = rotary_angles(positions, inverse_frequencies(8, 10000.0))
    assert angles.shape == (3, 2, 1, 8)  # [s, b, 1, d]
    torch.testing.assert_close(angles[..., :4], angles[..., 4:])
    expected = 2.5 * 10000.0 ** (-np.arange(0, 8, 2) / 8)
    np.testing.assert_allclose(angles[2, 0, 0, :4].numpy(), expected, rtol=1e-6)


def _direct_rotation(x: np.ndarray, positions: np.ndarray, rot_dim: int, theta: float) -> np.ndarray:
    """Rotate channel pairs (i, i + rot_dim/2) by p·θ^(-2i/rot_dim), as complex numbers, in float64."""
    half = rot_dim // 2
    freqs = theta ** (-2.0 * np.arange(half) / rot_dim)
    phase = np.exp(1j * positions[:, None] * freqs)  # [s, half]
    z = (x[..., :half] + 1j * x[..., half:rot_dim]) * phase[:, None, None, :]
    return np.concatenate([z.real, z.imag, x[..., rot_dim:]], axis=-1)


@pytest.mark.parametrize("rotary_percent", [1.0, 0.5])
def test_rotation_matches_direct_formula(rotary_percent):
    torch.manual_seed(0)
    seq, batch, heads, head_dim = 37, 1, 3, 16
    positions = np.cumsum(np.random.default_rng(1).choice([1.0, 0.25, 1 / 256], size=seq)) - 1
    module = V2PERotaryEmbedding(head_dim, rotary_percent=rotary_percent, rotary_base=THETA)
    angles = module(torch.from_numpy(positions))
    for _ in range(2):  # q and k
        x = torch.randn(seq, batch, heads, head_dim)
        expected = _direct_rotation(x.double().numpy(), positions, module.rotary_dim, THETA)
        torch.testing.assert_close(apply_rotary(x, angles).double(), torch.from_numpy(expected),
                                   atol=1e-6, rtol=0)


def test_angles_survive_bf16_module_cast():
    """Float16Module calls .bfloat16() on the model: the float64 frequencies must not be cast."""
    module = V2PERotaryEmbedding(HEAD_DIM).bfloat16()
    assert module.inv_freq.dtype == torch.float64
    pos = torch.tensor([2.0**20 + 1 / 256], dtype=torch.float64)
    exact = _exact_angles([2.0**20 + 1 / 256], HEAD_DIM, THETA)
    assert _wrapped_error(module(pos)[0, 0, 0, : HEAD_DIM // 2].double().numpy(), exact).max() <= 1e-6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kv_channels=16, rotary_percent=0.0), "rotary_percent"),
        (dict(kv_channels=15), "even"),
    ],
)
def test_bad_configuration_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        V2PERotaryEmbedding(**kwargs)


def test_positions_must_be_1d_or_2d():
    with pytest.raises(ValueError, match=r"\[b, s\]"):
        rotary_angles(torch.zeros(1, 2, 3, dtype=torch.float64), inverse_frequencies(8, 1e4))


@pytest.mark.parametrize(("length", "scaled"), [(4096, False), (4097, True), (10000, True)])
def test_dynamic_ntk_against_the_closed_form(length, scaled):
    """InternLM2's dynamic NTK: past the window M the base is θ·(f·L/M − (f − 1))^(d/(d−2)), L the
    sequence length; up to M it is θ. Checked at the last positions of the sequence (prefill) and for
    the one new position of a decoding step."""
    window, factor = 4096, 2.0
    stretch = factor * length / window - (factor - 1)
    base = THETA * stretch ** (HEAD_DIM / (HEAD_DIM - 2)) if scaled else THETA
    rope = V2PERotaryEmbedding(HEAD_DIM, rotary_base=THETA, dynamic_ntk=DynamicNTK(factor, window))
    prefill = rope(torch.arange(length, dtype=torch.float64))[-3:, 0, 0, : HEAD_DIM // 2].double().numpy()
    step = rope(torch.tensor([float(length - 1)]))[0, 0, 0, : HEAD_DIM // 2].double().numpy()
    positions = [float(p) for p in range(length - 3, length)]
    expected = _exact_angles(positions, HEAD_DIM, base)
    assert _wrapped_error(prefill, expected).max() < 1e-6
    assert _wrapped_error(step, expected[-1]).max() < 1e-6
    if scaled:  # the scaling matters: plain RoPE is far off
        plain = _exact_angles(positions, HEAD_DIM, THETA)
        assert _wrapped_error(plain, expected).max() > 1e-2


def test_dynamic_ntk_needs_a_factor_of_at_least_one():
    with pytest.raises(ValueError, match="factor >= 1"):
        DynamicNTK(0.5, 4096)


def test_dynamic_ntk_scales_each_sequence_of_a_pack_by_its_own_length():
    """A pack of a 5000-token sequence (past the window) and a 300-token one: each rotates with its own
    base, from its own length, as it would alone."""
    window, factor, lengths = 4096, 2.0, (5000, 300)
    positions = torch.cat([torch.arange(n, dtype=torch.float64) for n in lengths])[None]
    cu = torch.tensor([0, 5000, 5300], dtype=torch.int32)
    per_token = sequence_lengths(positions, cu)
    assert per_token[0, :5000].eq(5000).all() and per_token[0, 5000:].eq(300).all()
    rope = V2PERotaryEmbedding(HEAD_DIM, rotary_base=THETA, dynamic_ntk=DynamicNTK(factor, window))
    angles = rope(positions, per_token)[:, 0, 0, : HEAD_DIM // 2].double().numpy()
    long_base = THETA * (factor * 5000 / window - (factor - 1)) ** (HEAD_DIM / (HEAD_DIM - 2))
    assert _wrapped_error(angles[4998:5000], _exact_angles([4998.0, 4999.0], HEAD_DIM, long_base)).max() < 1e-6
    assert _wrapped_error(angles[5298:], _exact_angles([298.0, 299.0], HEAD_DIM, THETA)).max() < 1e-6
