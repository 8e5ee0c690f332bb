"""Hugging Face <-> Megatron checkpoint conversion: one declarative table per Hugging Face layout.

``LAYOUTS`` names the layouts the command line offers: ``internvl2`` (OpenGVLab's release, remote code)
and ``hf`` (transformers' native ``InternVLForConditionalGeneration``).
"""

from __future__ import annotations

from megatron_v2pe.convert.layouts import LAYOUTS, Layout

__all__ = ["LAYOUTS", "Layout"]
