"""Tiny random checkpoints of both Hugging Face layouts, with the shapes of the ``tiny()`` preset.

The transformers-native one is built with transformers' own classes; the InternVL2 one (remote code is not
available here) is a state dict with the release's key names and shapes, written by hand from its config.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from megatron_v2pe.model.presets import VLMConfig, tiny

CONFIG = tiny()


def hf_native_model(seed: int = 0):
    """``InternVLForConditionalGeneration`` with a Llama text model, every weight random."""
    from transformers import (
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLVisionConfig,
        LlamaConfig,
    )

    vit, lm = CONFIG.vision, CONFIG.language
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=vit.hidden_size,
            num_hidden_layers=vit.num_layers,
            num_attention_heads=vit.num_attention_heads,
            intermediate_size=vit.ffn_hidden_size,
            image_size=vit.image_size,
            patch_size=vit.patch_size,
            attention_bias=True,
            layer_norm_eps=1e-6,
        ).to_dict(),
        text_config=LlamaConfig(
            hidden_size=lm.hidden_size,
            intermediate_size=lm.ffn_hidden_size,
            num_hidden_layers=lm.num_layers,
            num_attention_heads=lm.num_attention_heads,
            num_key_value_heads=lm.num_query_groups,
            vocab_size=lm.vocab_size,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            max_position_embeddings=4096,
        ).to_dict(),
        image_token_id=CONFIG.img_context_token_id,
        image_seq_length=CONFIG.tokens_per_tile,
        tie_word_embeddings=False,
    )
    model = InternVLForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2 + (param.dim() == 1) * 1.0)
    return model


def internvl2_config(config: VLMConfig = CONFIG) -> dict:
    """An InternVL2 ``config.json`` (the fields ``from_hf_config`` reads, named as the release names them)."""
    vit, lm = config.vision, config.language
    return {
        "architectures": ["InternVLChatModel"],
        "downsample_ratio": config.downsample_ratio,
        "force_image_size": vit.image_size,
        "template": "internlm2-chat",
        "ps_version": config.ps_version,
        "use_thumbnail": config.image_format.use_thumbnail,
        "dynamic_image_size": config.image_format.dynamic_image_size,
        "max_dynamic_patch": config.image_format.max_tiles,
        "vision_config": {
            "num_hidden_layers": vit.num_layers,
            "hidden_size": vit.hidden_size,
            "num_attention_heads": vit.num_attention_heads,
            "intermediate_size": vit.ffn_hidden_size,
            "image_size": vit.image_size,
            "patch_size": vit.patch_size,
            "layer_norm_eps": vit.layernorm_epsilon,
            "initializer_factor": vit.layer_scale_init,
            "qkv_bias": True,
            "qk_normalization": False,
            "norm_type": "layer_norm",
        },
        "llm_config": {
            "architectures": ["InternLM2ForCausalLM"],
            "bias": False,
            "num_hidden_layers": lm.num_layers,
            "hidden_size": lm.hidden_size,
            "num_attention_heads": lm.num_attention_heads,
            "num_key_value_heads": lm.num_query_groups,
            "intermediate_size": lm.ffn_hidden_size,
            "vocab_size": lm.vocab_size,
            "rope_theta": lm.rotary_base,
            "rms_norm_eps": lm.layernorm_epsilon,
            "max_position_embeddings": lm.max_sequence_length,
            "tie_word_embeddings": False,
        },
    }


def internvl2_state_dict(config: VLMConfig = CONFIG, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the InternVL2 release's names and shapes."""
    vit, lm = config.vision, config.language
    head_dim = lm.hidden_size // lm.num_attention_heads
    qkv_rows = (lm.num_attention_heads + 2 * lm.num_query_groups) * head_dim
    width = config.projector_input_size
    shapes = {
        "vision_model.embeddings.class_embedding": (1, 1, vit.hidden_size),
        "vision_model.embeddings.position_embedding": (1, vit.num_patches + 1, vit.hidden_size),
        "vision_model.embeddings.patch_embedding.weight": (
            vit.hidden_size,
            3,
            vit.patch_size,
            vit.patch_size,
        ),
        "vision_model.embeddings.patch_embedding.bias": (vit.hidden_size,),
        "mlp1.0.weight": (width,),
        "mlp1.0.bias": (width,),
        "mlp1.1.weight": (lm.hidden_size, width),
        "mlp1.1.bias": (lm.hidden_size,),
        "mlp1.3.weight": (lm.hidden_size, lm.hidden_size),
        "mlp1.3.bias": (lm.hidden_size,),
        "language_model.model.tok_embeddings.weight": (lm.vocab_size, lm.hidden_size),
        "language_model.model.norm.weight": (lm.hidden_size,),
        "language_model.output.weight": (lm.vocab_size, lm.hidden_size),
    }
    h, f = vit.hidden_size, vit.ffn_hidden_size
    for i in range(vit.num_layers):
        p = f"vision_model.encoder.layers.{i}."
        shapes.update(
            {
                p + "ls1": (h,),
                p + "ls2": (h,),
                p + "norm1.weight": (h,),
                p + "norm1.bias": (h,),
                p + "attn.qkv.weight": (3 * h, h),
                p + "attn.qkv.bias": (3 * h,),
                p + "attn.proj.weight": (h, h),
                p + "attn.proj.bias": (h,),
                p + "norm2.weight": (h,),
                p + "norm2.bias": (h,),
                p + "mlp.fc1.weight": (f, h),
                p + "mlp.fc1.bias": (f,),
                p + "mlp.fc2.weight": (h, f),
                p + "mlp.fc2.bias": (h,),
            }
        )
    h, f = lm.hidden_size, lm.ffn_hidden_size
    for i in range(lm.num_layers):
        p = f"language_model.model.layers.{i}."
        shapes.update(
            {
                p + "attention_norm.weight": (h,),
                p + "attention.wqkv.weight": (qkv_rows, h),
                p + "attention.wo.weight": (h, h),
                p + "ffn_norm.weight": (h,),
                p + "feed_forward.w1.weight": (f, h),
                p + "feed_forward.w3.weight": (f, h),
                p + "feed_forward.w2.weight": (h, f),
            }
        )
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=generator).to(torch.bfloat16) for name, shape in shapes.items()
    }


def write_internvl2(directory: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    """A release-style directory: two safetensors shards + index JSON, config.json, a tokenizer file."""
    directory.mkdir(parents=True)
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(directory / file))
        weight_map.update(dict.fromkeys(part, file))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    (directory / "config.json").write_text(json.dumps(config or internvl2_config()))
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    (directory / "modeling_internvl_chat.py").write_text("# remote code of the release\n")
    return directory
