"""Typed model configurations of the InternVL2 architecture, and the presets we ship.

``VLMConfig`` describes a release: its shapes and the formats it was trained with (chat template, image
tiling, pixel shuffle, the ViT layer it reads); ``internvl_config.from_hf_config`` reads one from InternVL's
config.json. Parallelism and precision are applied when the Megatron-Core ``TransformerConfig``s are built
(``language_transformer_config`` / ``vision_transformer_config``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_v2pe.model.config import common_transformer_fields, internlm2_transformer_config
from megatron_v2pe.model.tp_padding import padded_size
from megatron_v2pe.v2pe.rotary import DynamicNTK


@dataclass(frozen=True)
class VisionConfig:
    """InternViT: a pre-norm ViT with CLS token, learned absolute positions, qkv bias and layer scale."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    image_size: int = 448
    patch_size: int = 14
    layernorm_epsilon: float = 1e-6
    layer_scale_init: float = 0.1
    drop_path_rate: float = 0.0
    select_layer: int = -1  # whose output feeds the projector, as InternVL indexes hidden states
    normalization: str = "LayerNorm"  # InternViT-6B: "RMSNorm"
    qkv_bias: bool = True  # InternViT-6B: False
    qk_normalization: bool = False  # InternViT-6B: q and k RMS-normalised over all heads (internvit_6b.py)

    def __post_init__(self) -> None:
        if not 1 <= self.feature_layers <= self.num_layers:
            raise ValueError(
                f"select_layer {self.select_layer} does not pick one of the {self.num_layers} ViT layers' "
                f"outputs; use -1 (the last) to -{self.num_layers} or 1 to {self.num_layers}"
            )

    @property
    def feature_layers(self) -> int:
        """Layers run to produce the features: InternVL's ``hidden_states[select_layer]`` (index 0 is the
        embeddings, -1 the last layer's output)."""
        return self.select_layer if self.select_layer >= 0 else self.num_layers + 1 + self.select_layer

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2


@dataclass(frozen=True)
class LanguageConfig:
    """A dense decoder: RMSNorm, SwiGLU, grouped-query attention. The defaults are InternLM2's (no
    biases, untied embeddings); Qwen2 adds a qkv bias, Qwen3 per-head q/k RMSNorm and its own head
    width, the small sizes of both tie the input and output embeddings (``llm_families``)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    rotary_base: float = 1e6
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 32768
    qkv_bias: bool = False
    qk_layernorm: bool = False
    head_dim: int | None = None  # None: hidden_size / num_attention_heads
    tie_word_embeddings: bool = False
    family: str = field(default="internlm2", compare=False)
    """How the release names its language-model tensors (``llm_families.FAMILIES``); InternLM2 and
    Llama are the same computation, so two configs differing only here describe one architecture."""
    dynamic_ntk_factor: float | None = None  # rope_scaling {type: dynamic}: δ = 1 inference only

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def dynamic_ntk(self) -> DynamicNTK | None:
        if self.dynamic_ntk_factor is None:
            return None
        return DynamicNTK(self.dynamic_ntk_factor, self.max_sequence_length)

TileBudget = Literal["per_image", "per_sample"]  # data/images.py: tiling_for_images
TILE_BUDGETS = get_args(TileBudget)


@dataclass(frozen=True)
class ImageFormat:
    """How the release cuts images into tiles: the data pipeline's defaults (InternVL's config.json
    ``max_dynamic_patch``, ``min_dynamic_patch``, ``use_thumbnail``, ``dynamic_image_size``; V2PE's
    ``dynamic_max_patch``). ``data/images.py`` says what each means."""

    max_tiles: int = 6
    min_tiles: int = 1
    use_thumbnail: bool = True
    dynamic_image_size: bool = True  # False: every image is one tile, resized
    tile_budget: TileBudget = "per_sample"  # per_sample (InternVL) | per_image (V2PE recipe)

    def __post_init__(self) -> None:
        if not 1 <= self.min_tiles <= self.max_tiles or self.tile_budget not in TILE_BUDGETS:
            raise ValueError(
                f"need 1 <= min_tiles <= max_tiles and tile_budget one of {TILE_BUDGETS}, got "
                f"{self.min_tiles}, {self.max_tiles}, {self.tile_budget!r}"
            )


PIXEL_SHUFFLE_VERSIONS = ("v1", "v2")


@dataclass(frozen=True)
class VLMConfig:
    vision: VisionConfig
    language: LanguageConfig
    img_context_token_id: int
    downsample_ratio: float = 0.5
    ps_version: str = "v2"  # pixel shuffle: v1 leaves the shuffled grid transposed (projector.py)
    template: str = "internlm2-chat"  # the chat template; the data pipeline refuses one not in TEMPLATES
    image_format: ImageFormat = field(default_factory=ImageFormat)
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if self.ps_version not in PIXEL_SHUFFLE_VERSIONS:
            raise ValueError(f"ps_version must be one of {PIXEL_SHUFFLE_VERSIONS}, got {self.ps_version!r}")
        shuffle = round(1 / self.downsample_ratio)
        if abs(shuffle * self.downsample_ratio - 1) > 1e-9 or self.vision.patches_per_side % shuffle:
            raise ValueError(
                f"downsample_ratio {self.downsample_ratio} must be 1/k with k dividing the "
                f"{self.vision.patches_per_side} patches per side (image_size {self.vision.image_size} "
                f"// patch_size {self.vision.patch_size})"
            )
        if not 0 <= self.img_context_token_id < self.language.vocab_size:
            raise ValueError(
                f"img_context_token_id {self.img_context_token_id} is outside the vocabulary "
                f"(size {self.language.vocab_size})"
            )

    @property
    def shuffle_factor(self) -> int:
        """Pixel shuffle folds shuffle_factor² neighbouring patches into one token."""
        return round(1 / self.downsample_ratio)

    @property
    def tokens_per_tile(self) -> int:
        """<IMG_CONTEXT> slots one 448-px tile fills (256 for InternVL2)."""
        return self.vision.num_patches // self.shuffle_factor**2

    @property
    def projector_input_size(self) -> int:
        return self.vision.hidden_size * self.shuffle_factor**2


def language_transformer_config(config: VLMConfig, **overrides: Any) -> TransformerConfig:
    lm = config.language
    if overrides.get("pipeline_model_parallel_size") == 2 and overrides.get("virtual_pipeline_model_parallel_size"):
        # With two stages the previous and next rank are the same peer: batched p2p would post the
        # activation and the gradient to it in one group, and they can be matched to each other's
        # buffers. Separate sends keep them apart.
        overrides.setdefault("batch_p2p_comm", False)
    return internlm2_transformer_config(
        lm.num_layers, lm.hidden_size, lm.num_attention_heads, lm.num_query_groups,
        lm.ffn_hidden_size, layernorm_epsilon=lm.layernorm_epsilon,
        add_qkv_bias=lm.qkv_bias, qk_layernorm=lm.qk_layernorm, kv_channels=lm.kv_channels, **overrides,
    )


def vision_attention_heads(vit: VisionConfig, tp: int) -> int:
    """The heads the tower is built with at tensor-parallel size ``tp``: its own, or for InternViT-6B
    (cross-head q/k norms) padded with zero heads up to a multiple of ``tp`` (``tp_padding``)."""
    heads = vit.num_attention_heads
    if heads % tp == 0:
        return heads
    if not vit.qk_normalization:
        raise ValueError(
            f"tensor_model_parallel_size {tp} does not divide the vision tower's {heads} heads; padding "
            "heads is implemented for InternViT-6B only: use a TP size dividing them"
        )
    if tp > heads:
        raise ValueError(
            f"tensor_model_parallel_size {tp} exceeds the vision tower's {heads} heads: every rank would "
            f"hold a single head, most of them padding; use a TP size of at most {heads}"
        )
    return padded_size(heads, tp)


def vision_transformer_config(config: VLMConfig, **overrides: Any) -> TransformerConfig:
    """InternViT blocks: LayerNorm (6B: RMSNorm), GELU MLP, biases (6B: none on qkv, dropped in its spec);
    heads padded with zeros at a TP size that does not divide InternViT-6B's 25 (``vision_attention_heads``);
    never split across pipeline stages (the tower is a few percent of the model and runs before the first
    language layer: the first stage holds it, and its layer budget can be lowered to compensate)."""
    vit = config.vision
    heads = vision_attention_heads(vit, overrides.get("tensor_model_parallel_size", 1))
    if overrides.get("num_attention_heads", heads) != heads:
        raise ValueError(
            f"num_attention_heads {overrides['num_attention_heads']} of the vision tower is derived from "
            f"its config and the TP size ({heads}); do not set it"
        )
    params_dtype = overrides.pop("params_dtype", torch.float32)
    fields: dict[str, Any] = dict(
        num_layers=vit.num_layers,
        hidden_size=vit.hidden_size,
        num_attention_heads=heads,
        kv_channels=vit.hidden_size // vit.num_attention_heads,
        ffn_hidden_size=vit.ffn_hidden_size,
        normalization=vit.normalization,
        layernorm_epsilon=vit.layernorm_epsilon,
        activation_func=F.gelu,
        gated_linear_unit=False,
        add_bias_linear=True,
        add_qkv_bias=True,
        **common_transformer_fields(params_dtype),
    )
    fields.update(overrides)
    fields["pipeline_model_parallel_size"] = 1  # the vision tower lives on the first stage
    return TransformerConfig(**fields)


def tiny(vocab_size: int = 256, img_context_token_id: int = 3) -> VLMConfig:
    """For tests and the CPU demo: 56-px tiles of 4x4 patches -> 4 tokens per tile."""
    return VLMConfig(
        vision=VisionConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                            image_size=56, patch_size=14),
        language=LanguageConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                                ffn_hidden_size=160, vocab_size=vocab_size, max_sequence_length=4096),
        img_context_token_id=img_context_token_id,
        name="tiny",
    )


INTERNVL2_2B_IMG_CONTEXT_ID = 92546
"""`<IMG_CONTEXT>` in InternVL2-2B's tokenizer (InternLM2's 92,544 tokens + 9 added specials)."""


def internvl2_2b() -> VLMConfig:
    """InternVL2-2B as released (InternViT-300M-448px + MLP projector + InternLM2-chat-1.8B), with plain
    RoPE: its config.json's dynamic NTK is for δ = 1 inference (``internvl_config.from_hf_config``)."""
    return VLMConfig(
        vision=VisionConfig(num_layers=24, hidden_size=1024, num_attention_heads=16, ffn_hidden_size=4096),
        language=LanguageConfig(num_layers=24, hidden_size=2048, num_attention_heads=16, num_query_groups=8,
                                ffn_hidden_size=8192, vocab_size=92553),
        img_context_token_id=INTERNVL2_2B_IMG_CONTEXT_ID,
        image_format=ImageFormat(max_tiles=12),
        name="internvl2_2b",
    )


QWEN_IMG_CONTEXT_ID = 151667
"""`<IMG_CONTEXT>` in the tokenizer of the Qwen2.5-based releases (Qwen's 151,643 tokens + specials)."""


def internvit_300m_v2_5() -> VisionConfig:
    """InternViT-300M-448px(-V2_5): the vision tower of InternVL2-2B, InternVL2.5-1B/2B/4B/8B and
    InternVL3-1B/2B/8B/9B/14B (the same shapes; V2_5 is retrained weights)."""
    return VisionConfig(num_layers=24, hidden_size=1024, num_attention_heads=16, ffn_hidden_size=4096)


def internvit_6b() -> VisionConfig:
    """InternViT-6B-448px-V1-5 / V2_5 as InternVL keeps it: 45 of its 48 layers, RMSNorm, no qkv bias,
    q/k normalised over all 25 heads."""
    return VisionConfig(num_layers=45, hidden_size=3200, num_attention_heads=25, ffn_hidden_size=12800,
                        normalization="RMSNorm", qkv_bias=False, qk_normalization=True)  # fmt: skip


def qwen2_5(num_layers: int, hidden: int, heads: int, groups: int, ffn: int) -> LanguageConfig:
    """Qwen2.5 as InternVL releases it: q/k/v biases, InternVL's 151,674-token vocabulary, RoPE base 1e6,
    a separate output layer (their config.json leaves tie_word_embeddings false and ships lm_head)."""
    return LanguageConfig(
        num_layers=num_layers, hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups,
        ffn_hidden_size=ffn, vocab_size=151674, layernorm_epsilon=1e-6, qkv_bias=True, family="qwen2",
    )  # fmt: skip


def qwen_release(name: str, language: LanguageConfig, vision: VisionConfig | None = None) -> VLMConfig:
    return VLMConfig(vision or internvit_300m_v2_5(), language, QWEN_IMG_CONTEXT_ID, template="internvl2_5",
                     name=name)  # fmt: skip


def internvl2_5_1b() -> VLMConfig:
    """InternViT-300M-448px-V2_5 + Qwen2.5-0.5B-Instruct."""
    return qwen_release("internvl2_5_1b", qwen2_5(24, 896, 14, 2, 4864))


def internvl3_2b() -> VLMConfig:
    """InternViT-300M-448px-V2_5 + Qwen2.5-1.5B."""
    return qwen_release("internvl3_2b", qwen2_5(28, 1536, 12, 2, 8960))


def internvl3_8b() -> VLMConfig:
    """InternViT-300M-448px-V2_5 + Qwen2.5-7B."""
    return qwen_release("internvl3_8b", qwen2_5(28, 3584, 28, 4, 18944))


def internvl3_78b() -> VLMConfig:
    """InternViT-6B-448px-V2_5 + Qwen2.5-72B."""
    return qwen_release("internvl3_78b", qwen2_5(80, 8192, 64, 8, 29568), internvit_6b())


def internvl2_5_26b() -> VLMConfig:
    """InternViT-6B-448px-V2_5 + InternLM2.5-20B-chat (InternLM2's tokenizer, as InternVL2-2B). The shapes;
    RoPE settings are InternLM2's defaults here: ``from_hf_config`` reads a release's own."""
    return VLMConfig(
        vision=internvit_6b(),
        language=LanguageConfig(num_layers=48, hidden_size=6144, num_attention_heads=48, num_query_groups=8,
                                ffn_hidden_size=16384, vocab_size=92553),
        img_context_token_id=INTERNVL2_2B_IMG_CONTEXT_ID,
        template="internvl2_5",
        name="internvl2_5_26b",
    )  # fmt: skip


PRESETS = {
    "tiny": tiny,
    "internvl2_2b": internvl2_2b,
    "internvl2_5_1b": internvl2_5_1b,
    "internvl3_2b": internvl3_2b,
    "internvl3_8b": internvl3_8b,
    "internvl2_5_26b": internvl2_5_26b,
    "internvl3_78b": internvl3_78b,
}


def preset(name: str) -> VLMConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None
