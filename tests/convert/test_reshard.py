"""A dist checkpoint written at TP=2, PP=2 exports to the same Hugging Face tensors as at TP=1, for each
language family (tied embeddings included: the last stage's copy is saved as the embedding's replica)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from megatron_v2pe.convert.checkpoint import hf_to_megatron, megatron_to_hf
from tests.convert.tiny_models import family_config, hf_native_model
from tests.parallel.launch import run_torchrun

pytestmark = pytest.mark.usefixtures("megatron_runtime")


FAMILIES = ("llama", "qwen2", "qwen3")  # InternLM2 as Llama; q/k/v biases and tied; q/k norms and tied


def test_tp2_pp2_checkpoint_exports_like_tp1(tmp_path):
    for family in FAMILIES:
        hf_native_model(family=family).save_pretrained(tmp_path / family / "hf")
        directory = tmp_path / family
        hf_to_megatron(directory / "hf", directory / "tp1", "hf", expected=family_config(family))
    run_torchrun(
        "../../convert/workers/reshard.py",
        4,
        tmp_path,
        "--sources",
        *(str(tmp_path / f / "tp1") for f in FAMILIES),
        "--targets",
        *(str(tmp_path / f / "tp2pp2") for f in FAMILIES),
    )
    for family in FAMILIES:
        directory = tmp_path / family
        config = (directory / "tp1" / "vlm_config.json").read_text()
        (directory / "tp2pp2" / "vlm_config.json").write_text(config)
        megatron_to_hf(directory / "tp2pp2", directory / "exported", "hf")
        exported = load_file(directory / "exported" / "model.safetensors")
        source = load_file(directory / "hf" / "model.safetensors")
        assert sorted(exported) == sorted(source), family
        for name, tensor in source.items():
            # doubling is exact: any misplaced piece shows
            assert torch.equal(exported[name], tensor * 2), (family, name)
