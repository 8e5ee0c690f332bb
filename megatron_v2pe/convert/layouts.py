"""The Hugging Face layouts a checkpoint converts to and from: table, and config.json read/write."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megatron_v2pe.convert import internvl2_original, internvl_hf_native
from megatron_v2pe.convert.mapping import Rule
from megatron_v2pe.model.presets import VLMConfig


@dataclass(frozen=True)
class Layout:
    name: str
    rules: Callable[[VLMConfig], list[Rule]]
    read_config: Callable[[dict[str, Any], int | None], VLMConfig]
    """config.json -> architecture; the int is an `<IMG_CONTEXT>` id to use instead of the config's."""
    write_config: Callable[[VLMConfig, dict[str, Any] | None], dict[str, Any]]
    """architecture + a reference config.json (kept where it does not describe the architecture)."""
    reference_files: tuple[str, ...] = ()
    """Files of the reference directory an export needs besides weights and tokenizer (remote code)."""


LAYOUTS: dict[str, Layout] = {
    "internvl2": Layout(
        "internvl2",
        internvl2_original.rules,
        internvl2_original.read_config,
        internvl2_original.write_config,
        reference_files=("*.py",),
    ),
    "hf": Layout(
        "hf", internvl_hf_native.rules, internvl_hf_native.read_config, internvl_hf_native.write_config
    ),
}
