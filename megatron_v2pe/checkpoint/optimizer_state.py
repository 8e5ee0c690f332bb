"""Restoring the optimizer and the LR schedule into a run whose optimizer settings may have changed."""

from __future__ import annotations

import logging
from typing import Any

from megatron.core.optimizer.optimizer import param_group_identifier_keys

from megatron_v2pe.checkpoint.log import say

_SCHEDULE_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")  # per-group values the LR scheduler sets


def announce_schedule(scheduler, saved: dict[str, Any]) -> None:
    """Say which LR / weight-decay schedule the resumed run follows when config and checkpoint differ."""
    configured = scheduler.state_dict()
    differ = [k for k in configured if k != "num_steps" and k in saved and configured[k] != saved[k]]
    if not differ:
        return
    both = ", ".join(f"{k} {saved[k]} (config: {configured[k]})" for k in differ)
    if scheduler.override_opt_param_scheduler:
        say(logging.INFO, "LR schedule from the config (checkpoint.override_opt_param_scheduler), not "
            "the checkpoint's: %s; it continues at step %d", both, saved["num_steps"])
    else:
        say(logging.WARNING, "LR schedule from the checkpoint, not the config: %s; set "
            "checkpoint.override_opt_param_scheduler=true to follow the config's", both)


def saved_param_groups(optimizer_state: dict[str, Any]) -> list[dict[str, Any]]:
    """The parameter groups of a loaded (possibly chained) optimizer state."""
    states = optimizer_state if isinstance(optimizer_state, list) else [optimizer_state]
    return [g for s in states for g in s.get("optimizer", {}).get("param_groups", [])]


def align_param_groups(saved: list[dict], current: list[dict], use_current: bool) -> None:
    """Megatron pairs saved and current parameter groups by their settings, the LR schedule's values
    among them (so a new optimizer.lr finds no group). Pair them by the rest, and give both the
    schedule values of the side that is used."""

    def identity(group: dict) -> tuple:
        return tuple(group.get(k) for k in param_group_identifier_keys if k not in _SCHEDULE_KEYS)

    by_identity = {identity(g): g for g in current}
    for group in saved:
        match = by_identity.get(identity(group))
        if match is not None:
            source, target = (match, group) if use_current else (group, match)
            target.update({k: source[k] for k in _SCHEDULE_KEYS if k in source})
