"""A dist checkpoint written at TP=2, PP=2 exports to the same Hugging Face tensors as at TP=1, for each
language family (tied embeddings included: the last stage's copy is saved as the embedding's replica) and
for an InternViT-6B-style tower whose heads TP 2 pads and a vocabulary TP 2 pads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from megatron_v2pe.convert.checkpoint import hf_to_megatron, megatron_to_hf
from tests.convert.tiny_models import family_config, hf_native_model
from tests.parallel.launch import run_torchrun

pytestmark = pytest.mark.usefixtures("megatron_runtime")


FAMILIES = ("llama", "qwen2", "qwen3")  # InternLM2 as Llama; q/k/v biases and tied; q/k norms and tied
CASES = [*((f, "300m") for f in FAMILIES), ("qwen2", "6b_odd"), ("qwen2_odd_vocab", "300m")]
"""(language family, vision tower): the ``6b_odd`` tower's 5 heads are padded to 6 at TP 2, as is the
odd vocabulary's last row, and their checkpoint tensors stay unpadded."""


def test_tp2_pp2_checkpoint_exports_like_tp1(tmp_path):
    names = [f"{family}-{tower}" for family, tower in CASES]
    for (family, tower), name in zip(CASES, names, strict=True):
        hf_native_model(family=family, tower=tower).save_pretrained(tmp_path / name / "hf")
        directory = tmp_path / name
        hf_to_megatron(directory / "hf", directory / "tp1", "hf", expected=family_config(family, tower))
    run_torchrun(
        "../../convert/workers/reshard.py",
        4,
        tmp_path,
        "--sources",
        *(str(tmp_path / n / "tp1") for n in names),
        "--targets",
        *(str(tmp_path / n / "tp2pp2") for n in names),
    )
    for name in names:
        directory = tmp_path / name
        config = (directory / "tp1" / "vlm_config.json").read_text()
        (directory / "tp2pp2" / "vlm_config.json").write_text(config)
        megatron_to_hf(directory / "tp2pp2", directory / "exported", "hf")
        exported = load_file(directory / "exported" / "model.safetensors")
        source = load_file(directory / "hf" / "model.safetensors")
        assert sorted(exported) == sorted(source), name
        for key, tensor in source.items():
            # doubling is exact: any misplaced piece shows
            assert torch.equal(exported[key], tensor * 2), (name, key)
