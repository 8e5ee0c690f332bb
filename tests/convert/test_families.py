"""The remote-code layout for every language family, and round trips of both layouts for every family.

A release's ``language_model.*`` is the LLM's own transformers model, so the converted language model must
give that model's logits, with δ = 1 and with fractional V2PE positions passed to both as position ids.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from megatron_v2pe.checkpoint.model_only import build_model
from megatron_v2pe.convert import LAYOUTS
from megatron_v2pe.convert.checkpoint import load_hf_weights
from megatron_v2pe.convert.cli import main
from megatron_v2pe.convert.safetensors_io import SafetensorsSource
from megatron_v2pe.model.llm_families import llm_family
from megatron_v2pe.model.internvl_config import from_hf_config
from megatron_v2pe.v2pe.positions import compute_positions
from tests.convert.test_round_trip import IMG, _assert_identical, _tensors
from tests.convert.tiny_models import (
    CONFIG,
    FAMILIES,
    causal_lm,
    family_config,
    hf_native_model,
    original_release,
    randomize,
    text_config,
    write_internvl2,
)

pytestmark = pytest.mark.usefixtures("megatron_runtime")

NAMED_AS_THEIR_CLASS = ("llama3", "qwen2", "qwen3")  # InternLM2's own names: test_round_trip, test_tables


def _text_tokens_and_positions(delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """40 text tokens (no `<IMG_CONTEXT>`), tokens 8..31 placed as an image of step ``delta`` would be."""
    rng = np.random.default_rng(3)
    tokens = rng.integers(CONFIG.img_context_token_id + 1, CONFIG.language.vocab_size, 40)
    steps_like_image = np.zeros(40, dtype=bool)
    steps_like_image[8:32] = True
    positions = compute_positions(steps_like_image, [delta])
    return torch.from_numpy(tokens)[None], torch.from_numpy(positions)[None]


@pytest.mark.parametrize("family", NAMED_AS_THEIR_CLASS)
def test_remote_code_layout_gives_the_llms_own_logits(tmp_path, family):
    tensors, hf_config = original_release(family, dtype=torch.float32)
    directory = write_internvl2(tmp_path / "release", tensors, hf_config)
    config = LAYOUTS["internvl2"].read_config(hf_config, CONFIG.img_context_token_id)
    assert config == family_config(family) and config.language.family == llm_family(hf_config["llm_config"])
    ours = build_model(config, torch.float32, "reference").eval()
    load_hf_weights(ours, SafetensorsSource(directory), LAYOUTS["internvl2"], config)
    reference = causal_lm(family)
    for delta in (1.0, 0.25):
        tokens, positions = _text_tokens_and_positions(delta)
        with torch.no_grad():
            mask = torch.ones_like(tokens)
            expected = reference(tokens, position_ids=positions, attention_mask=mask).logits
            found = ours(input_ids=tokens, positions=positions)
        torch.testing.assert_close(found.reshape(expected.shape), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("family", "tower"), [*((f, "300m") for f in NAMED_AS_THEIR_CLASS), ("internlm2", "6b"), ("qwen2", "6b")]
)
def test_remote_code_round_trip_is_bit_identical(tmp_path, family, tower):
    tensors, hf_config = original_release(family, tower=tower)
    source = write_internvl2(tmp_path / "release", tensors, hf_config)
    megatron, exported = tmp_path / "megatron", tmp_path / "exported"
    args = ["--hf-layout", "internvl2", "--input"]
    assert main(["hf-to-megatron", *args, str(source), "--output", str(megatron), *IMG]) == 0
    reference = ["--reference", str(source)]
    assert main(["megatron-to-hf", *args, str(megatron), "--output", str(exported), *reference]) == 0
    _assert_identical(_tensors(exported), tensors)
    released = json.loads((source / "config.json").read_text())
    assert json.loads((exported / "config.json").read_text())["llm_config"] == released["llm_config"]


HF_CASES = [*((f, "300m") for f in FAMILIES if f != "llama"), ("llama", "6b"), ("qwen2", "6b")]


@pytest.mark.parametrize(("family", "tower"), HF_CASES)  # llama on InternViT-300M: test_round_trip
def test_hf_native_round_trip_is_bit_identical(tmp_path, family, tower):
    from transformers import InternVLForConditionalGeneration

    source, megatron, exported = tmp_path / "hf", tmp_path / "megatron", tmp_path / "exported"
    hf_native_model(family=family, tower=tower).save_pretrained(source)
    args = ["--hf-layout", "hf", "--input"]
    assert main(["hf-to-megatron", *args, str(source), "--output", str(megatron)]) == 0
    assert main(["megatron-to-hf", *args, str(megatron), "--output", str(exported)]) == 0
    _assert_identical(load_file(exported / "model.safetensors"), load_file(source / "model.safetensors"))
    reloaded, info = InternVLForConditionalGeneration.from_pretrained(exported, output_loading_info=True)
    assert not any(info.values()), info
    classes = {"llama": "LlamaModel", "llama3": "LlamaModel", "qwen2": "Qwen2Model", "qwen3": "Qwen3Model"}
    expected = classes[family]
    assert type(reloaded.model.language_model).__name__ == expected


def _release_config(**llm_changes) -> dict:
    _, hf_config = original_release("qwen2")
    hf_config["llm_config"].update(llm_changes)
    return hf_config


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe"}, "mixture-of-experts"),
        ({"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss"}, "mixture-of-experts"),
        ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "not a supported language"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_unsupported_language_models_are_refused_by_field(changes, message):
    with pytest.raises(ValueError, match=message):
        from_hf_config(_release_config(**changes))


def test_qwen2_dynamic_ntk_gives_transformers_logits_past_the_window(tmp_path):
    """InternVL3's ``rope_scaling {"rope_type": "dynamic", "factor": 2.0}`` on a Qwen2 release: at δ = 1,
    40 tokens past a window of 32, the converted model gives transformers' dynamic-NTK Qwen2 logits (θ = 100,
    so that the scaling shows; plain RoPE differs by far more than the tolerance)."""
    tensors, hf_config = original_release("qwen2", dtype=torch.float32)
    llm = hf_config["llm_config"]
    llm.update(max_position_embeddings=32, rope_parameters={"rope_type": "default", "rope_theta": 100.0})
    plain_config = text_config("qwen2")
    plain_config.max_position_embeddings, plain_config.rope_parameters = 32, llm["rope_parameters"]
    llm["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    directory = write_internvl2(tmp_path / "release", tensors, hf_config)
    config = LAYOUTS["internvl2"].read_config(hf_config, CONFIG.img_context_token_id)
    assert config.language.dynamic_ntk_factor == 2.0
    ours = build_model(config, torch.float32, "reference").eval()
    load_hf_weights(ours, SafetensorsSource(directory), LAYOUTS["internvl2"], config)
    from transformers import AutoModelForCausalLM

    dynamic_config = copy.deepcopy(plain_config)
    dynamic_config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 100.0}
    tokens, positions = _text_tokens_and_positions(1.0)
    logits = {}
    for name, hf in (("plain", plain_config), ("dynamic", dynamic_config)):
        reference = randomize(AutoModelForCausalLM.from_config(hf), 0)
        with torch.no_grad():
            mask = torch.ones_like(tokens)
            logits[name] = reference(tokens, position_ids=positions, attention_mask=mask).logits
    with torch.no_grad():
        found = ours(input_ids=tokens, positions=positions).reshape(logits["dynamic"].shape)
    torch.testing.assert_close(found, logits["dynamic"], atol=1e-5, rtol=1e-5)
    assert (found - logits["plain"]).abs().max() > 1e-3
