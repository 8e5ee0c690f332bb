"""The release presets built on the meta device have the parameter count of the published checkpoints.

Shapes from the releases' config.json on the Hugging Face Hub (OpenGVLab/InternVL2_5-1B, InternVL3-2B,
InternVL3-8B, InternVL2_5-26B, InternVL3-78B): ``vision_config`` of InternViT-300M-448px-V2_5 or of
InternViT-6B-448px-V2_5 (45 layers kept), ``llm_config`` of Qwen2.5-0.5B / 1.5B / 7B / 72B with InternVL's
151,674-token vocabulary or of InternLM2.5-20B with InternLM2's 92,553. The Qwen releases have no
``tie_word_embeddings`` in ``llm_config`` and ship ``language_model.lm_head``: the output layer is
separate. The counts below are written from those shapes, tensor by tensor as the releases name them,
independently of the model code; the sizes are the model cards' (0.94B, 2.09B, 7.94B, 25.5B, 78.4B).
"""

from __future__ import annotations

import pytest
import torch

from megatron_v2pe.model.presets import (
    internvl2_5_1b,
    internvl2_5_26b,
    internvl3_2b,
    internvl3_8b,
    internvl3_78b,
    language_transformer_config,
)
from megatron_v2pe.model.vlm import InternVLModel

pytestmark = pytest.mark.usefixtures("megatron_runtime")

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


def internvit_6b_count() -> int:
    """InternViT-6B-448px-V2_5 (config.json: hidden 3200, 25 heads, intermediate 12800, 45 layers,
    norm_type rms_norm, qkv_bias false, qk_normalization true)."""
    h, ffn, layers, patches = 3200, 12800, 45, (448 // 14) ** 2
    embeddings = 3 * 14 * 14 * h + h + h + (patches + 1) * h
    per_layer = (
        2 * h  # norm1, norm2 (RMSNorm: weight only)
        + h * 3 * h  # attn.qkv, no bias
        + 2 * h  # attn.q_norm, attn.k_norm over all heads
        + h * h + h  # attn.proj
        + h * ffn + ffn + ffn * h + h  # mlp.fc1, mlp.fc2
        + 2 * h  # ls1, ls2
    )
    return embeddings + layers * per_layer


def mlp1_count(vit_hidden: int, llm_hidden: int) -> int:
    width = 4 * vit_hidden  # pixel shuffle 2x2
    return 2 * width + width * llm_hidden + llm_hidden + llm_hidden * llm_hidden + llm_hidden


def decoder_count(
    layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int, bias: bool
) -> int:
    head_dim = hidden // heads
    qkv_rows = hidden + 2 * kv_heads * head_dim
    per_layer = (
        2 * hidden  # the two RMSNorms
        + hidden * qkv_rows + bias * qkv_rows  # q, k, v (InternLM2: wqkv) and Qwen2's biases
        + hidden * hidden  # o_proj / wo
        + 3 * hidden * ffn  # gate, up, down (w1, w3, w2)
    )
    return 2 * vocab * hidden + hidden + layers * per_layer  # embeddings, output layer, final norm


QWEN, INTERNLM2 = 151674, 92553  # vocabularies

# name: (preset, (vision count, ViT width), LLM (layers, hidden, heads, kv heads, ffn, vocab, qkv bias),
# size in billions as the model card states it)
V300M, V6B = (internvit_300m_count, 1024), (internvit_6b_count, 3200)
RELEASES = {
    "InternVL2_5-1B": (internvl2_5_1b, V300M, (24, 896, 14, 2, 4864, QWEN, True), 0.94),
    "InternVL3-2B": (internvl3_2b, V300M, (28, 1536, 12, 2, 8960, QWEN, True), 2.09),
    "InternVL3-8B": (internvl3_8b, V300M, (28, 3584, 28, 4, 18944, QWEN, True), 7.94),
    "InternVL2_5-26B": (internvl2_5_26b, V6B, (48, 6144, 48, 8, 16384, INTERNLM2, False), 25.5),
    "InternVL3-78B": (internvl3_78b, V6B, (80, 8192, 64, 8, 29568, QWEN, True), 78.4),
}


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_release_preset_has_the_published_parameter_count(release):
    build, (vision_count, vit_width), llm, billions = RELEASES[release]
    config = build()
    with torch.device("meta"):
        model = InternVLModel(config, language_transformer_config(config), attention_backend="reference")
    count = sum(p.numel() for p in model.parameters())
    assert count == vision_count() + mlp1_count(vit_width, llm[1]) + decoder_count(*llm)
    decimals = len(str(billions).split(".")[1])  # as precise as the model card states it
    assert round(count / 1e9, decimals) == billions, count


def test_a_released_config_json_reads_as_the_preset():
    """InternVL3-1B's config.json (the same architecture as InternVL2.5-1B), its architecture fields as
    published, dynamic NTK rope_scaling included."""
    from megatron_v2pe.model.architecture import config_differences
    from megatron_v2pe.model.internvl_config import from_hf_config
    from megatron_v2pe.model.presets import QWEN_IMG_CONTEXT_ID

    released = {
        "architectures": ["InternVLChatModel"], "downsample_ratio": 0.5, "force_image_size": 448,
        "ps_version": "v2", "template": "internvl2_5", "tie_word_embeddings": False,
        "llm_config": {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
            "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14, "num_hidden_layers": 24,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "max_position_embeddings": 32768,
            "rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"},
            "rope_theta": 1000000.0, "sliding_window": None, "use_sliding_window": False,
            "vocab_size": 151674,
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


def test_internvit_6b_pads_its_heads_to_a_multiple_of_the_tensor_parallel_size():
    from megatron_v2pe.model.presets import vision_transformer_config

    at_tp8 = vision_transformer_config(internvl3_78b(), tensor_model_parallel_size=8)
    assert (at_tp8.num_attention_heads, at_tp8.num_query_groups, at_tp8.kv_channels) == (32, 32, 128)
    assert vision_transformer_config(internvl3_78b(), tensor_model_parallel_size=5).num_attention_heads == 25
    with pytest.raises(ValueError, match="exceeds the vision tower's 25 heads.*at most 25"):
        vision_transformer_config(internvl3_78b(), tensor_model_parallel_size=32)
    with pytest.raises(ValueError, match="num_attention_heads 25 .* derived"):
        vision_transformer_config(internvl3_78b(), tensor_model_parallel_size=8, num_attention_heads=25)


def test_internvit_300m_refuses_a_tensor_parallel_size_that_splits_a_head():
    from megatron_v2pe.model.presets import vision_transformer_config

    with pytest.raises(ValueError, match="does not divide the vision tower's 16 heads.*InternViT-6B only"):
        vision_transformer_config(internvl3_8b(), tensor_model_parallel_size=3)
