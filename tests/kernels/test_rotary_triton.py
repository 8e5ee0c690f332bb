"""The fused rotary kernel: its interpreter checks (run in a subprocess), the path choice, input errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_v2pe.optional_deps import is_available
from megatron_v2pe.v2pe.fused import rotate_qk, uses_fused_rotary
from megatron_v2pe.v2pe.rotary import apply_rotary
from tests.kernels.helpers import split_qkv, v2pe_angles

needs_triton = pytest.mark.skipif(not is_available("triton"), reason="Triton is not importable here")
REPO = Path(__file__).resolve().parents[2]


@needs_triton
def test_kernel_under_triton_interpreter():
    """Runs interpreted_rotary.py in a fresh interpreter with TRITON_INTERPRET=1: Triton reads the variable
    when a kernel is decorated, so it must be set before the kernel module is first imported, which
    this process cannot promise (another test may have imported it already)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "python_files=interpreted_*.py",
               str(Path(__file__).with_name("interpreted_rotary.py"))]
    result = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"interpreter checks failed:\n{result.stdout}\n{result.stderr}"
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout


def test_cpu_tensors_take_the_unfused_path():
    query, key = split_qkv(8, 2, 4, 2, 16, torch.float32, "cpu")
    angles = v2pe_angles(8, 2, 16, "cpu")
    assert not uses_fused_rotary(query)
    q_out, k_out = rotate_qk(query, key, angles)
    assert torch.equal(q_out, apply_rotary(query, angles)) and torch.equal(k_out, apply_rotary(key, angles))


def _bad_inputs():
    q, k = torch.zeros(4, 1, 2, 8), torch.zeros(4, 1, 1, 8)
    angles = torch.zeros(4, 1, 1, 8)
    return [
        ((q[0], k, angles), ValueError, r"query \[s, b, hq, hd\]"),
        ((q, torch.zeros(4, 1, 1, 6), angles), ValueError, "does not match query"),
        ((q, k, torch.zeros(3, 1, 1, 8)), ValueError, r"angles must be \[s, b or 1, 1, d\]"),
        ((q, k, torch.zeros(4, 1, 1, 10)), ValueError, "must be even and in"),
        ((q, k, torch.zeros(4, 1, 1, 5)), ValueError, "must be even and in"),
        ((q, k.bfloat16(), angles), TypeError, "share a float32, bfloat16 or float16 dtype"),
        ((q.double(), k.double(), angles), TypeError, "share a float32, bfloat16 or float16 dtype"),
        ((q, k, angles.double()), TypeError, "angles must be float32"),
    ]


@needs_triton
@pytest.mark.parametrize("args, error, message", _bad_inputs())
def test_bad_inputs_raise_clear_errors(args, error, message):
    from megatron_v2pe.kernels.rotary_triton import rotate_qk_once

    with pytest.raises(error, match=message):
        rotate_qk_once(*args)


@needs_triton
def test_angles_that_require_grad_are_refused():
    from megatron_v2pe.kernels.rotary_triton import fused_rotary_qk

    q = torch.zeros(4, 1, 2, 8)
    with pytest.raises(ValueError, match="no gradient for the angles"):
        fused_rotary_qk(q, q, torch.zeros(4, 1, 1, 8, requires_grad=True))
