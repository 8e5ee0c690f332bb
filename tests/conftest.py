"""Shared fixtures: one single-process Megatron runtime per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def megatron_runtime():
    """torch.distributed (world size 1) and Megatron's parallel state, for tests that build models."""
    from megatron_v2pe.parallel import initialize

    initialize(seed=1234)
    yield
