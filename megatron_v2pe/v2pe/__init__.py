"""V2PE: per-token positions with a fractional visual increment, and the rotary embedding they drive."""

from megatron_v2pe.v2pe.positions import (
    DELTA_CANDIDATES,
    AutoDelta,
    DeltaPolicy,
    FixedDelta,
    RandomDelta,
    UnitDelta,
    build_positions,
    compute_positions,
    parse_delta_policy,
    visual_runs,
)
from megatron_v2pe.v2pe.rotary import V2PERotaryEmbedding, apply_rotary, rotary_angles

__all__ = [
    "DELTA_CANDIDATES",
    "AutoDelta",
    "DeltaPolicy",
    "FixedDelta",
    "RandomDelta",
    "UnitDelta",
    "V2PERotaryEmbedding",
    "apply_rotary",
    "build_positions",
    "compute_positions",
    "parse_delta_policy",
    "rotary_angles",
    "visual_runs",
]
