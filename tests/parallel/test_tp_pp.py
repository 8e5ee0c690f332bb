"""TP=2 and PP=2 (torchrun, gloo) give the single-process loss, for stock rope and for V2PE."""

from __future__ import annotations

import pytest

from tests.parallel.launch import run_torchrun


@pytest.fixture(scope="module")
def losses(tmp_path_factory):
    return run_torchrun("gpt_layouts.py", 2, tmp_path_factory.mktemp("gpt_layouts"))


@pytest.mark.parametrize("kind", ["stock", "v2pe"])
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_layout_matches_single_process_loss(losses, kind, layout):
    reference = losses[kind]["1x1"]
    assert reference > 1.0  # an untrained model over 128 tokens: about ln(128) = 4.85
    assert losses[kind][layout] == pytest.approx(reference, abs=1e-5, rel=1e-6)
