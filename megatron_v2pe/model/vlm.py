"""InternVL2 with V2PE on Megatron-Core: InternViT -> pixel shuffle + MLP -> InternLM2 (V2PEGPTModel).

The model consumes one packed (THD) micro-batch: text embeddings with the projected image features
written into the ``<IMG_CONTEXT>`` slots in order, attention block-diagonal over sub-samples, V2PE
positions passed as data. Like Megatron-Core's multimodal models it splits across pipeline stages with
the vision tower and projector on the first stage; later stages receive hidden states through
``set_input_tensor``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_v2pe.batch import PackedBatch
from megatron_v2pe.model.chunked_loss import ChunkedLossProcessor
from megatron_v2pe.model.fusions import Fusions
from megatron_v2pe.model.language_model import V2PEGPTModel
from megatron_v2pe.model.layer_specs import v2pe_decoder_block_spec
from megatron_v2pe.model.presets import VLMConfig, vision_transformer_config
from megatron_v2pe.model.projector import VisionProjector
from megatron_v2pe.model.vision import InternViTModel, vision_layer_spec
from megatron_v2pe.parallel.attention_backends import AttentionBackend
from megatron_v2pe.parallel.context_parallel import all_gather_tokens, context_parallel_group


class InternVLModel(MegatronModule):
    """The VLM.

    Args:
        config: architecture (shapes, `<IMG_CONTEXT>` id).
        language_config: the language model's TransformerConfig (parallelism, precision, recompute).
        vision_config: the vision tower's; defaults to ``vision_transformer_config(config)``.
        attention_backend: 'auto', 'te', 'torch' or 'reference' (``parallel/attention_backends.py``).
        pre_process / post_process: whether this pipeline stage holds the embeddings (and the vision
            tower and projector) / the output layer and loss.
        fusions: chunked loss and compiled norm of the language model (``model/fusions.py``).
    """

    def __init__(
        self,
        config: VLMConfig,
        language_config: TransformerConfig,
        vision_config: Optional[TransformerConfig] = None,
        *,
        attention_backend: AttentionBackend = "auto",
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: Optional[int] = None,
        fusions: Fusions = Fusions(),
    ):
        super().__init__(config=language_config)
        self.vlm_config = config
        self.fusions = fusions
        self.model_type = ModelType.encoder_or_decoder  # what Megatron's schedules expect
        lm = config.language
        # Tied (Qwen's small sizes): under PP the last stage keeps a copy that Megatron initialises from
        # the first stage's and whose gradient it sums with the embedding's (finalize_model_grads reads
        # this attribute and shared_embedding_or_output_weight of the model).
        self.share_embeddings_and_output_weights = lm.tie_word_embeddings
        self.pre_process = pre_process
        self.post_process = post_process
        self.language_model = V2PEGPTModel(
            language_config,
            v2pe_decoder_block_spec(language_config, attention_backend, vp_stage, fusions.compiled_norm),
            lm.vocab_size,
            lm.max_sequence_length,
            rotary_base=lm.rotary_base,
            dynamic_ntk=lm.dynamic_ntk,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=lm.tie_word_embeddings,
            scatter_embedding_sequence_parallel=False,  # images are merged first, then scattered
            vp_stage=vp_stage,
        )
        if pre_process:
            vision_config = vision_config or vision_transformer_config(config)
            layer_spec = vision_layer_spec(attention_backend, config.vision)
            self.vision_model = InternViTModel(config.vision, vision_config, layer_spec)
            projector_config = dataclasses.replace(language_config, sequence_parallel=False)
            self.vision_projection = VisionProjector(config, projector_config)

    def shared_embedding_or_output_weight(self) -> Tensor:
        """The tied embedding / output weight of this stage (Megatron's gradient sync asks for it)."""
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline stages after the first receive the previous stage's hidden states here."""
        self.language_model.set_input_tensor(input_tensor)

    def freeze(self, *, vision: bool = False, projector: bool = False, language: bool = False) -> None:
        """Stop gradients to whole parts of the model (parts absent on this pipeline stage are skipped)."""
        parts = {
            "vision_model": vision,
            "vision_projection": projector,
            "language_model": language,
        }
        for name, frozen in parts.items():
            module = getattr(self, name, None)
            if frozen and module is not None:
                for param in module.parameters():
                    param.requires_grad_(False)

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """Tiles [n, 3, S, S] -> image-token features [n · tokens_per_tile, hidden], tile-major."""
        dtype = next(self.vision_model.parameters()).dtype
        return self.vision_projection(self.vision_model(pixel_values.to(dtype)))

    def encode_images_context_parallel(self, pixel_values: Tensor, cp_group) -> Tensor:
        """Each CP rank encodes an equal share of the tiles (zero tiles pad the last share); the
        features are all-gathered, so no rank encodes every image and gradients flow back to the rank
        that encoded each tile."""
        tiles, size = pixel_values.shape[0], cp_group.size()
        per_rank = -(-tiles // size)
        padded = torch.nn.functional.pad(pixel_values, (0, 0, 0, 0, 0, 0, 0, per_rank * size - tiles))
        mine = padded[cp_group.rank() * per_rank : (cp_group.rank() + 1) * per_rank]
        features = all_gather_tokens(self.encode_images(mine), cp_group)
        return features[: tiles * self.vlm_config.tokens_per_tile]

    def _image_features(self, pixel_values: Optional[Tensor], like: Tensor) -> Tensor:
        if pixel_values is None or pixel_values.shape[0] == 0:
            return like.new_zeros(0, like.shape[-1])
        if self.language_model.config.context_parallel_size > 1:
            return self.encode_images_context_parallel(pixel_values, context_parallel_group())
        return self.encode_images(pixel_values)

    def embed(
        self, input_ids: Tensor, pixel_values: Optional[Tensor], image_feature_index: Optional[Tensor] = None
    ) -> Tensor:
        """Text embeddings [t, 1, h] with the image features written into the `<IMG_CONTEXT>` slots.

        ``image_feature_index`` (set by context-parallel sharding) names the feature row of each local
        slot; without it, slots take the features in order."""
        text = self.language_model.embedding(input_ids=input_ids, position_ids=None)
        slots = (input_ids == self.vlm_config.img_context_token_id).transpose(0, 1).unsqueeze(-1)
        features = self._image_features(pixel_values, text)
        tiles = 0 if pixel_values is None else pixel_values.shape[0]
        if image_feature_index is not None:
            features = features[image_feature_index[image_feature_index >= 0]]
        num_slots = int(slots.sum())
        if features.shape[0] != num_slots:
            raise ValueError(
                f"{num_slots} <IMG_CONTEXT> slots in the batch but {features.shape[0]} image features "
                f"({tiles} tiles x {self.vlm_config.tokens_per_tile} tokens per tile): the data "
                "pipeline must expand every <image> to tokens_per_tile x tiles slots"
            )
        merged = text.masked_scatter(slots, features.to(text.dtype))
        if self.language_model.config.sequence_parallel:
            merged = tensor_parallel.scatter_to_sequence_parallel_region(merged)
        return merged

    def forward(
        self,
        input_ids: Optional[Tensor],
        *,
        positions: Tensor,
        pixel_values: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        image_feature_index: Optional[Tensor] = None,
    ) -> Tensor:
        """input_ids, positions (float64) and labels are [1, t] (this rank's tokens under context
        parallelism); returns the per-token cross entropy [1, t] when labels are given, else the
        logits. Reduce with ``weighted_loss``."""
        decoder_input = self.embed(input_ids, pixel_values, image_feature_index) if self.pre_process else None
        chunk = self.fusions.loss_chunk_tokens
        real_rows = len(self.language_model.vocab_padding.real)
        chunked = ChunkedLossProcessor(chunk, real_rows) if chunk and labels is not None else None
        return self.language_model(
            None,
            positions=positions,
            decoder_input=decoder_input,
            labels=labels,
            packed_seq_params=packed_seq_params,
            output_processor=chunked,
        )


def model_chunks(
    config: VLMConfig,
    language_config: TransformerConfig,
    vision_config: TransformerConfig,
    attention_backend: AttentionBackend = "auto",
    fusions: Fusions = Fusions(),
) -> list[InternVLModel]:
    """This rank's model: one chunk per virtual pipeline stage (one without virtual stages)."""
    virtual = language_config.virtual_pipeline_model_parallel_size
    chunks = []
    for stage in range(virtual or 1):
        vp = stage if virtual else None
        chunks.append(InternVLModel(
            config, language_config, vision_config, attention_backend=attention_backend,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp), vp_stage=vp,
            fusions=fusions,
        ))
    return chunks


def model_inputs(batch: PackedBatch) -> dict:
    """The keyword arguments of ``InternVLModel.forward`` for a packed batch (labels of unsupervised
    tokens are mapped to 0: they carry zero loss weight, and the loss kernel needs valid ids)."""
    return dict(
        input_ids=batch.tokens[None],
        positions=batch.positions[None],
        pixel_values=batch.pixel_values,
        labels=batch.labels.clamp(min=0)[None],
        packed_seq_params=batch.packed_seq_params(),
        image_feature_index=batch.image_feature_index,
    )


def weighted_loss(per_token_loss: Tensor, loss_weights: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ w·CE, Σ w) over the local tokens. The loss is their ratio once both are summed over the
    data- and context-parallel ranks, so every token weighs the same wherever it was computed."""
    weights = loss_weights.reshape(per_token_loss.shape).to(per_token_loss.dtype)
    return (per_token_loss * weights).sum(), weights.sum()
