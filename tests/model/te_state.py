"""Weights of a local-spec model as the Transformer Engine spec names them (TE fuses each norm into the
linear after it), from the local spec's own ``sharded_state_dict_keys_map``."""

from __future__ import annotations

from megatron_v2pe.model.layer_specs import v2pe_layer_spec


def te_state_dict(local_state: dict) -> dict:
    renames = v2pe_layer_spec("reference").submodules.sharded_state_dict_keys_map
    state = {}
    for key, value in local_state.items():
        for local, fused in renames.items():
            key = key.replace(local, fused)
        state[key] = value
    return state


def load_into_te(te_model, local_model) -> None:
    """Load ``local_model``'s weights into ``te_model``; every weight must find its place."""
    missing, unexpected = te_model.load_state_dict(te_state_dict(local_model.state_dict()), strict=False)
    assert not unexpected and not [k for k in missing if not k.endswith("_extra_state")], (missing, unexpected)
