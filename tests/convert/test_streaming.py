"""Conversion streams: peak memory stays near one safetensors shard + one layer, not the model.

A random transformers-native model of ~480 MB (16 + 16 layers of width 512, fp32, 64 MiB shards) goes to a
Megatron dist checkpoint and back, each direction in a child process that measures its own peak RSS."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch

from megatron_v2pe.convert.safetensors_io import SafetensorsSource

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).parent / "workers" / "convert_memory.py"
LAYERS, HIDDEN, SHARD = 16, 512, 64 * 2**20


def _run(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(WORKER), *args],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _largest_layer(directory: Path) -> int:
    """Bytes of the largest transformer layer (all its tensors) of a Hugging Face directory."""
    source, layers = SafetensorsSource(directory), defaultdict(int)
    for name, shape in source.shapes().items():
        match = re.match(r"(.*\.layers?\.\d+)\.", name)
        if match:
            layers[match[1]] += shape.numel() * torch.float32.itemsize
    return max(layers.values())


def test_both_directions_stay_within_one_shard_and_one_layer(tmp_path):
    hf, megatron, exported = tmp_path / "hf", tmp_path / "megatron", tmp_path / "exported"
    _run("prepare", str(hf), str(LAYERS), str(HIDDEN), str(SHARD))
    layer = _largest_layer(hf)
    results = {
        "hf-to-megatron": json.loads(
            _run(
                "measure",
                "hf-to-megatron",
                "--hf-layout",
                "hf",
                "--input",
                str(hf),
                "--output",
                str(megatron),
            ).splitlines()[-1]
        ),
        "megatron-to-hf": json.loads(
            _run(
                "measure",
                "megatron-to-hf",
                "--hf-layout",
                "hf",
                "--input",
                str(megatron),
                "--output",
                str(exported),
                "--max-shard-size",
                str(SHARD),
            ).splitlines()[-1]
        ),
    }
    for direction, result in results.items():
        # The 1.5x target itself is measured at InternVL2-2B shapes by benchmarks/convert_memory.py; here a
        # looser bound keeps allocator noise from failing the test while still excluding whole-model loads.
        bound = 2 * (result["largest_shard"] + layer)
        assert result["total"] > 2.5 * bound, "the model must be several times the bound for this to show"
        assert result["growth"] < bound, (direction, result, layer)
    # and the conversion is right: the exported tensors are the originals
    original, back = SafetensorsSource(hf), SafetensorsSource(exported)
    assert sorted(original.files) == sorted(back.files)
    for name in list(original.files)[:: max(1, len(original.files) // 40)]:
        assert torch.equal(original.read(name), back.read(name)), name
