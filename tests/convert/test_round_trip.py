"""Hugging Face -> Megatron dist checkpoint -> Hugging Face through the command line: bit-identical."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_v2pe.convert.cli import main
from megatron_v2pe.convert.safetensors_io import SafetensorsSource
from tests.convert.tiny_models import CONFIG, hf_native_model, internvl2_state_dict, write_internvl2

pytestmark = pytest.mark.usefixtures("megatron_runtime")

IMG = ["--img-context-token-id", str(CONFIG.img_context_token_id)]


def _tensors(directory) -> dict[str, torch.Tensor]:
    source = SafetensorsSource(directory)
    return {name: source.read(name) for name in source.files}


def _assert_identical(found: dict, expected: dict) -> None:
    assert sorted(found) == sorted(expected)
    for name, tensor in expected.items():
        assert found[name].dtype == tensor.dtype and torch.equal(found[name], tensor), name


def test_internvl2_layout_round_trip_is_bit_identical(tmp_path):
    tensors = internvl2_state_dict()
    source = write_internvl2(tmp_path / "release", tensors)
    megatron, exported = tmp_path / "megatron", tmp_path / "exported"
    assert (
        main(
            [
                "hf-to-megatron",
                "--hf-layout",
                "internvl2",
                "--input",
                str(source),
                "--output",
                str(megatron),
                "--preset",
                "tiny",
                *IMG,
            ]
        )
        == 0
    )
    assert (megatron / "metadata.json").is_file() and (
        megatron / "tokenizer" / "tokenizer_config.json"
    ).is_file()
    assert (
        main(
            [
                "megatron-to-hf",
                "--hf-layout",
                "internvl2",
                "--input",
                str(megatron),
                "--output",
                str(exported),
                "--reference",
                str(source),
                "--max-shard-size",
                "40KiB",
                "--delta-policy",
                "fixed:1/4",
            ]
        )
        == 0
    )
    _assert_identical(_tensors(exported), tensors)
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # several shards, each named in the index
    config = json.loads((exported / "config.json").read_text())
    assert config["v2pe"]["delta_policy"] == "fixed:0.25" and config["v2pe"]["tokens_per_tile"] == 4
    assert config["llm_config"] == json.loads((source / "config.json").read_text())["llm_config"]
    assert (exported / "tokenizer_config.json").is_file() and (
        exported / "modeling_internvl_chat.py"
    ).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "exported",
        "megatron",
        "release",
    ]  # no staging left


def test_hf_native_round_trip_is_bit_identical_and_loads_with_from_pretrained(tmp_path):
    from transformers import InternVLForConditionalGeneration

    source, megatron, exported = tmp_path / "hf", tmp_path / "megatron", tmp_path / "exported"
    hf_native_model().save_pretrained(source)
    assert (
        main(
            [
                "hf-to-megatron",
                "--hf-layout",
                "hf",
                "--input",
                str(source),
                "--output",
                str(megatron),
                "--preset",
                "tiny",
            ]
        )
        == 0
    )
    assert (
        main(["megatron-to-hf", "--hf-layout", "hf", "--input", str(megatron), "--output", str(exported)])
        == 0
    )
    _assert_identical(load_file(exported / "model.safetensors"), load_file(source / "model.safetensors"))
    reloaded, info = InternVLForConditionalGeneration.from_pretrained(exported, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    assert reloaded.config.v2pe["delta_policy"] == f"auto:{CONFIG.language.max_sequence_length}"
