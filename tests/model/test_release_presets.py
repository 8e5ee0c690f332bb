"""The release presets built on the meta device have the parameter count of the published checkpoints.

Shapes from the releases' config.json (OpenGVLab/InternVL2_5-1B, InternVL3-2B, InternVL3-8B on the
Hugging Face Hub: ``vision_config`` of InternViT-300M-448px-V2_5, ``llm_config`` of Qwen2.5-0.5B / 1.5B /
7B with InternVL's 151,674-token vocabulary; no ``tie_word_embeddings`` in ``llm_config`` and
``language_model.lm_head`` shipped, so the output layer is separate). The count below is written from
those shapes, tensor by tensor as the releases name them, independently of the model code.
"""

from __future__ import annotations

import pytest
import torch

from megatron_v2pe.model.presets import (
    internvl2_5_1b,
    internvl3_2b,
    internvl3_8b,
    language_transformer_config,
)
from megatron_v2pe.model.vlm import InternVLModel

pytestmark = pytest.mark.usefixtures("megatron_runtime")

# name: (preset, (layers, hidden, heads, kv_heads, ffn) of the Qwen2.5 LLM, published size in billions)
RELEASES = {
    "InternVL2_5-1B": (internvl2_5_1b, (24, 896, 14, 2, 4864), 0.94),
    "InternVL3-2B": (internvl3_2b, (28, 1536, 12, 2, 8960), 2.09),
    "InternVL3-8B": (internvl3_8b, (28, 3584, 28, 4, 18944), 7.94),
}
VOCAB = 151674


def internvit_300m_count() -> int:
    h, ffn, layers, patches = 1024, 4096, 24, (448 // 14) ** 2
    embeddings = 3 * 14 * 14 * h + h + h + (patches + 1) * h  # patch conv weight + bias, class, positions
    per_layer = (
        2 * 2 * h  # norm1, norm2 (weight + bias)
        + h * 3 * h + 3 * h  # attn.qkv weight + bias
        + h * h + h  # attn.proj
        + h * ffn + ffn + ffn * h + h  # mlp.fc1, mlp.fc2
        + 2 * h  # ls1, ls2
    )
    return embeddings + layers * per_layer


def mlp1_count(llm_hidden: int) -> int:
    width = 4 * 1024  # pixel shuffle 2x2 of InternViT-300M's 1024 channels
    return 2 * width + width * llm_hidden + llm_hidden + llm_hidden * llm_hidden + llm_hidden


def qwen2_5_count(layers: int, hidden: int, heads: int, kv_heads: int, ffn: int) -> int:
    head_dim = hidden // heads
    per_layer = (
        2 * hidden  # input_layernorm, post_attention_layernorm
        + hidden * hidden + hidden  # q_proj weight + bias
        + 2 * (hidden * kv_heads * head_dim + kv_heads * head_dim)  # k_proj, v_proj weight + bias
        + hidden * hidden  # o_proj
        + 3 * hidden * ffn  # gate_proj, up_proj, down_proj
    )
    return 2 * VOCAB * hidden + hidden + layers * per_layer  # embed_tokens, lm_head, norm


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_release_preset_has_the_published_parameter_count(release):
    build, llm, billions = RELEASES[release]
    config = build()
    with torch.device("meta"):
        model = InternVLModel(config, language_transformer_config(config), attention_backend="reference")
    count = sum(p.numel() for p in model.parameters())
    assert count == internvit_300m_count() + mlp1_count(llm[1]) + qwen2_5_count(*llm)
    assert round(count / 1e9, 2) == billions


def test_a_released_config_json_reads_as_the_preset():
    """InternVL3-1B's config.json (the same architecture as InternVL2.5-1B), its architecture fields as
    published, dynamic NTK rope_scaling included."""
    from megatron_v2pe.convert.checks import config_differences
    from megatron_v2pe.model.presets import QWEN_IMG_CONTEXT_ID, from_hf_config

    released = {
        "architectures": ["InternVLChatModel"], "downsample_ratio": 0.5, "force_image_size": 448,
        "template": "internvl2_5", "tie_word_embeddings": False,
        "llm_config": {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
            "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14, "num_hidden_layers": 24,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "max_position_embeddings": 32768,
            "rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"},
            "rope_theta": 1000000.0, "sliding_window": None, "use_sliding_window": False, "vocab_size": 151674,
        },
        "vision_config": {
            "architectures": ["InternVisionModel"], "drop_path_rate": 0.1, "hidden_act": "gelu",
            "hidden_size": 1024, "image_size": 448, "initializer_factor": 0.1, "intermediate_size": 4096,
            "layer_norm_eps": 1e-06, "norm_type": "layer_norm", "num_attention_heads": 16,
            "num_hidden_layers": 24, "patch_size": 14, "qk_normalization": False, "qkv_bias": True,
        },
    }  # fmt: skip
    config = from_hf_config(released, QWEN_IMG_CONTEXT_ID)
    assert config_differences(config, internvl2_5_1b()) == []
    assert config.language.family == "qwen2" and not config.language.tie_word_embeddings
