"""Every parallel layout gives the single-process loss and gradients of the tiny VLM (torchrun, gloo).

Packed batches with images, fractional V2PE positions and sub-samples shorter than 2·CP; see
workers/vlm_layouts.py for how gradients are compared across layouts.
"""

from __future__ import annotations

import pytest

from tests.convert.tiny_models import ODD_VOCAB
from tests.parallel.launch import run_torchrun

TWO_RANKS = ["tp2", "sp", "pp2", "pp2_vpp2", "cp2", "dp2_distopt"]
FOUR_RANKS = ["cp4", "tp2_cp2", "pp2_cp2"]
TIED = ["pp2", "pp2_vpp2", "tp2", "sp"]
"""Qwen3's language model (tied embeddings, per-head q/k norms) on the InternViT-6B-style tower with 5
heads: under PP the last stage's output layer is a copy of the first stage's embedding, kept equal by
Megatron's embedding-group reductions; under TP the tower's 5 heads are padded to 6 with zero heads (the
weights loaded from and saved to the unpadded checkpoint tensors), and its cross-head q/k norms
all-reduce their sum of squares and divide it by the real width. Its vocabulary of ``ODD_VOCAB`` ids is
padded by TP 2 with a zero row (the tied embedding's, masked in the logits), as is that of the fused
launch (the untied output layer's, masked in the chunked loss)."""
FUSED = ["tp2", "sp", "cp2"]  # where the chunked loss and the compiled norm see other shards


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_torchrun("vlm_layouts.py", 2, tmp_path_factory.mktemp("vlm2"), "--layouts", ",".join(TWO_RANKS))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return run_torchrun("vlm_layouts.py", 4, tmp_path_factory.mktemp("vlm4"), "--layouts", ",".join(FOUR_RANKS))


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return run_torchrun(
        "vlm_layouts.py", 2, tmp_path_factory.mktemp("tied"), "--layouts", ",".join(TIED),
        "--family", "qwen3", "--tower", "6b_odd", "--vocab", str(ODD_VOCAB),
    )  # fmt: skip


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    return run_torchrun("vlm_layouts.py", 2, tmp_path_factory.mktemp("vlm_fused"), "--layouts", ",".join(FUSED),
                        "--fused", "--vocab", str(ODD_VOCAB))


def _check(results, layout):
    got = results["layouts"][layout]
    assert results["reference_loss"] > 1.0
    assert got["loss"] == pytest.approx(results["reference_loss"], abs=1e-5)
    assert got["params_compared"] > 60
    assert got["max_grad"] > 1e-2  # the gradients compared are far from zero
    assert got["max_grad_error"] <= 1e-5, got["worst_param"]
    if got["vision_cp_error"] is not None:
        assert got["vision_cp_error"] <= 1e-6
    assert got["padding_nonzero"] == 0  # padded vocabulary rows: zero gradients, weights still zero


@pytest.mark.parametrize("layout", TWO_RANKS)
def test_two_rank_layout(two_ranks, layout):
    _check(two_ranks, layout)


@pytest.mark.parametrize("layout", FOUR_RANKS)
def test_four_rank_layout(four_ranks, layout):
    _check(four_ranks, layout)


@pytest.mark.parametrize("layout", TIED)
def test_tied_embeddings_layout(tied, layout):
    _check(tied, layout)


@pytest.mark.parametrize("layout", FUSED)
def test_fused_paths_equal_the_plain_path_in_the_layout(fused, layout):
    """Chunked loss, compiled RMSNorm and fused SwiGLU: the same loss and gradients as the plain path of
    the same layout to 1e-6 (and the plain path gives the single-process ones)."""
    _check(fused, layout)
    got = fused["layouts"][layout]
    assert got["fused_loss_error"] <= 1e-6
    assert got["fused_grad_error"] <= 1e-6, got["fused_worst"]
