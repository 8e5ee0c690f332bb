"""Tiny random checkpoints of both Hugging Face layouts, with the shapes of the ``tiny()`` preset and the
language model of each family.

The transformers-native one is built with transformers' own classes; the remote-code one (its code is not
available here) is a state dict with the release's key names and shapes: InternViT and the InternLM2 LLM
written by hand from its config, the other families' LLMs taken from their own transformers classes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from megatron_v2pe.model.presets import VLMConfig, tiny

CONFIG = tiny()


FAMILIES = ("llama", "llama3", "qwen2", "qwen3")
"""Tiny language models of each family: ``llama`` is InternLM2 as transformers holds it (the InternVL2
releases), ``llama3`` Llama-3's RoPE base, ``qwen2`` with q/k/v biases and tied embeddings (the small
Qwen2.5), ``qwen3`` with q/k norms, tied embeddings and a head width of its own (hidden 64, heads 4, 32).
``qwen2_odd_vocab`` (not in the list) is ``qwen2`` with ``ODD_VOCAB`` ids."""
ODD_VOCAB = 251
"""A vocabulary TP 2 and TP 4 pad to 252 (as TP 8 pads InternVL3-78B's 151,674 to 151,680)."""


INTERNVIT_6B = dict(normalization="RMSNorm", qkv_bias=False, qk_normalization=True)
"""What the tiny InternViT-6B-style tower changes (the shapes stay ``tiny()``'s: 4 heads of 16)."""
ODD_HEADS = dict(hidden_size=80, num_attention_heads=5, ffn_hidden_size=160)
"""The ``6b_odd`` tower's shapes: 5 heads of 16, which TP 2 pads to 6 (as TP 8 pads InternViT-6B's 25)."""


def family_config(family: str = "llama", tower: str = "300m") -> VLMConfig:
    """``tiny()`` with the language model of ``family`` ("internlm2": unchanged) and the vision tower
    ``tower`` ("300m", "6b" or "6b_odd")."""
    vision = {"300m": {}, "6b": INTERNVIT_6B, "6b_odd": {**INTERNVIT_6B, **ODD_HEADS}}[tower]
    base = dataclasses.replace(CONFIG, vision=dataclasses.replace(CONFIG.vision, **vision))
    if family == "internlm2":
        return base
    lm = CONFIG.language
    changes = {
        "llama": dict(family="llama"),
        "llama3": dict(family="llama", rotary_base=500000.0),
        "qwen2": dict(family="qwen2", qkv_bias=True, tie_word_embeddings=True, layernorm_epsilon=1e-6),
        "qwen2_odd_vocab": dict(family="qwen2", qkv_bias=True, tie_word_embeddings=True,
                                layernorm_epsilon=1e-6, vocab_size=ODD_VOCAB),
        "qwen3": dict(family="qwen3", qk_layernorm=True, head_dim=32, tie_word_embeddings=True,
                      layernorm_epsilon=1e-6),
    }[family]  # fmt: skip
    return dataclasses.replace(base, language=dataclasses.replace(lm, **changes))


def text_config(family: str = "llama"):
    """The transformers config of the family's text model, with ``family_config``'s shapes."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    lm = family_config(family).language
    fields = dict(
        hidden_size=lm.hidden_size,
        intermediate_size=lm.ffn_hidden_size,
        num_hidden_layers=lm.num_layers,
        num_attention_heads=lm.num_attention_heads,
        num_key_value_heads=lm.num_query_groups,
        vocab_size=lm.vocab_size,
        rms_norm_eps=lm.layernorm_epsilon,
        tie_word_embeddings=lm.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": lm.rotary_base},
        max_position_embeddings=4096,
    )
    if lm.family == "qwen3":
        return Qwen3Config(**fields, head_dim=32)
    return (Qwen2Config if lm.family == "qwen2" else LlamaConfig)(**fields)


def randomize(model, seed: int):
    """Every weight random (norm weights around 1), so that no tensor can be misplaced unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2 + (param.dim() == 1) * 1.0)
    return model.eval()


def causal_lm(family: str = "llama", seed: int = 0):
    """The family's own ``*ForCausalLM``, every weight random."""
    from transformers import AutoModelForCausalLM

    return randomize(AutoModelForCausalLM.from_config(text_config(family)), seed)


def hf_native_model(seed: int = 0, family: str = "llama", tower: str = "300m"):
    """``InternVLForConditionalGeneration`` with the family's text model and the vision tower ``tower``
    of ``family_config``, every weight random."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig

    vit = family_config(family, tower).vision
    text = text_config(family)
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=vit.hidden_size,
            num_hidden_layers=vit.num_layers,
            num_attention_heads=vit.num_attention_heads,
            intermediate_size=vit.ffn_hidden_size,
            image_size=vit.image_size,
            patch_size=vit.patch_size,
            attention_bias=vit.qkv_bias,
            use_qk_norm=vit.qk_normalization,
            norm_type="layer_norm" if vit.normalization == "LayerNorm" else "rms_norm",
            layer_norm_eps=1e-6,
        ).to_dict(),
        text_config=text.to_dict(),
        image_token_id=CONFIG.img_context_token_id,
        image_seq_length=CONFIG.tokens_per_tile,
        tie_word_embeddings=text.tie_word_embeddings,
    )
    return randomize(InternVLForConditionalGeneration(config), seed)


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
            "qkv_bias": vit.qkv_bias,
            "qk_normalization": vit.qk_normalization,
            "norm_type": {"LayerNorm": "layer_norm", "RMSNorm": "rms_norm"}[vit.normalization],
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
        if vit.normalization == "RMSNorm":  # InternViT-6B: InternRMSNorm has no bias
            del shapes[p + "norm1.bias"], shapes[p + "norm2.bias"]
        if not vit.qkv_bias:
            del shapes[p + "attn.qkv.bias"]
        if vit.qk_normalization:  # over all heads: width hidden_size
            shapes.update({p + "attn.q_norm.weight": (h,), p + "attn.k_norm.weight": (h,)})
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


ARCHITECTURES = {"llama": "LlamaForCausalLM", "llama3": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}  # fmt: skip


def original_release(
    family: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16, tower: str = "300m"
) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config.json) of a remote-code release whose LLM is ``family``'s: InternViT and ``mlp1``
    as in ``internvl2_state_dict``, the language model InternLM2's written by hand there, or the family's
    own ``*ForCausalLM`` under ``language_model.`` (without ``lm_head`` when tied, as ``save_pretrained``
    writes it)."""
    config = family_config(family, tower)
    everything = internvl2_state_dict(config, seed)
    if family == "internlm2":
        return {n: t.to(dtype) for n, t in everything.items()}, internvl2_config(config)
    vision = {n: t for n, t in everything.items() if not n.startswith("language_model.")}
    lm = causal_lm(family, seed)
    language = {
        f"language_model.{n}": t.to(dtype).contiguous()
        for n, t in lm.state_dict().items()
        if not (lm.config.tie_word_embeddings and n == "lm_head.weight")
    }
    hf = internvl2_config(config)
    hf["llm_config"] = {**lm.config.to_dict(), "architectures": [ARCHITECTURES[family]]}
    return {**{n: t.to(dtype) for n, t in vision.items()}, **language}, hf
