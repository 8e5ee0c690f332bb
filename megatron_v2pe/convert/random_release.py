"""A Hugging Face release with random weights, for measuring conversion at the released shapes without
downloading one: every tensor the layout's table names, N(0, 0.02), written shard by shard (one shard in
memory at a time), with the layout's config.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_v2pe.checkpoint.model_only import build_model
from megatron_v2pe.convert.checkpoint import table, weights
from megatron_v2pe.convert.layouts import LAYOUTS
from megatron_v2pe.convert.mapping import expected_hf_shapes
from megatron_v2pe.convert.safetensors_io import ShardedWriter
from megatron_v2pe.model.presets import VLMConfig


def write_random_release(
    config: VLMConfig,
    directory: Path,
    shard_bytes: int,
    dtype: torch.dtype,
    layout: str = "hf",
    seed: int = 0,
) -> None:
    """Write it to ``directory`` (created; must not exist). ``megatron_v2pe.parallel.initialize`` must
    have run (the shapes come from the model, built on the meta device)."""
    hf_layout = LAYOUTS[layout]
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in weights(build_model(config, dtype)).items()}
    directory.mkdir(parents=True)
    writer = ShardedWriter(directory, shard_bytes)
    generator = torch.Generator().manual_seed(seed)
    for name, shape in expected_hf_shapes(table(hf_layout, config), shapes).items():
        writer.add(name, (torch.randn(shape, generator=generator) * 0.02).to(dtype))
    writer.close()
    (directory / "config.json").write_text(json.dumps(hf_layout.write_config(config, None)))
    (directory / "tokenizer_config.json").write_text("{}")
