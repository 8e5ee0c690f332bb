"""Model presets and construction from an InternVL2 Hugging Face config.json."""

from __future__ import annotations

import json

import pytest

from megatron_v2pe.model.internvl_config import from_hf_config
from megatron_v2pe.model.presets import internvl2_2b, preset, tiny

# The fields of OpenGVLab/InternVL2-2B's config.json that define the architecture (as published).
INTERNVL2_2B_CONFIG = {
    "_name_or_path": "OpenGVLab/InternVL2-2B",
    "downsample_ratio": 0.5,
    "force_image_size": 448,
    "ps_version": "v2",
    "select_layer": -1,
    "template": "internlm2-chat",
    "llm_config": {
        "architectures": ["InternLM2ForCausalLM"],
        "bias": False,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "max_position_embeddings": 32768,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000,
        "tie_word_embeddings": False,
        "vocab_size": 92553,
    },
    "vision_config": {
        "architectures": ["InternVisionModel"],
        "drop_path_rate": 0.0,
        "hidden_size": 1024,
        "image_size": 448,
        "initializer_factor": 1.0,
        "intermediate_size": 4096,
        "layer_norm_eps": 1e-06,
        "num_attention_heads": 16,
        "norm_type": "layer_norm",
        "num_hidden_layers": 24,
        "patch_size": 14,
        "qk_normalization": False,
        "qkv_bias": True,
    },
}


def test_hf_config_gives_the_2b_shapes(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(INTERNVL2_2B_CONFIG))
    config = from_hf_config(tmp_path)
    expected = internvl2_2b()
    assert config.language == expected.language
    assert config.vision.num_layers == expected.vision.num_layers
    assert config.vision.hidden_size == expected.vision.hidden_size
    assert config.vision.ffn_hidden_size == expected.vision.ffn_hidden_size
    assert config.tokens_per_tile == 256
    assert config.projector_input_size == 4096
    assert config.img_context_token_id == 92546


def test_derived_sizes():
    assert internvl2_2b().tokens_per_tile == (448 // 14) ** 2 // 4
    assert tiny().tokens_per_tile == (56 // 14) ** 2 // 4
    assert preset("tiny") == tiny()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["vision_config"].update(norm_type="group_norm"), "vision_config.norm_type 'group_norm'"),
        (lambda c: c.pop("llm_config"), "missing key 'llm_config'"),
        (lambda c: c.update(downsample_ratio=0.3), "downsample_ratio"),
    ],
)
def test_bad_hf_config_is_explained(change, message):
    config = json.loads(json.dumps(INTERNVL2_2B_CONFIG))
    change(config)
    with pytest.raises(ValueError, match=message):
        from_hf_config(config)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="internvl2_2b"):
        preset("internvl2_76b")


def test_img_context_id_must_be_in_vocabulary():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny(vocab_size=3, img_context_token_id=3)
