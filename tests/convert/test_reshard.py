"""A dist checkpoint written at TP=2, PP=2 exports to the same Hugging Face tensors as at TP=1."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from megatron_v2pe.convert.checkpoint import hf_to_megatron, megatron_to_hf
from megatron_v2pe.model.presets import tiny
from tests.convert.tiny_models import hf_native_model
from tests.parallel.launch import run_torchrun

pytestmark = pytest.mark.usefixtures("megatron_runtime")


def test_tp2_pp2_checkpoint_exports_like_tp1(tmp_path):
    hf_native_model().save_pretrained(tmp_path / "hf")
    hf_to_megatron(tmp_path / "hf", tmp_path / "tp1", "hf", expected=tiny())
    run_torchrun(
        "../../convert/workers/reshard.py",
        4,
        tmp_path,
        "--source",
        str(tmp_path / "tp1"),
        "--target",
        str(tmp_path / "tp2pp2"),
    )
    (tmp_path / "tp2pp2" / "vlm_config.json").write_text((tmp_path / "tp1" / "vlm_config.json").read_text())
    megatron_to_hf(tmp_path / "tp2pp2", tmp_path / "exported", "hf")
    exported, source = (
        load_file(tmp_path / "exported" / "model.safetensors"),
        load_file(tmp_path / "hf" / "model.safetensors"),
    )
    assert sorted(exported) == sorted(source)
    for name, tensor in source.items():
        assert torch.equal(exported[name], tensor * 2), name  # doubling is exact: any misplaced piece shows
