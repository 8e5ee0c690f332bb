"""A Megatron-Core ``GPTModel`` whose rotary positions are V2PE positions passed in as data, and whose
vocabulary is padded to what the tensor-parallel size splits, the padded logits masked."""

from __future__ import annotations

from typing import Any, Optional

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_v2pe.model.layer_specs import V2PESelfAttention
from megatron_v2pe.model.tp_padding import TPPadding, unpadded_sharded_tensor, zero_padding
from megatron_v2pe.v2pe.rotary import DynamicNTK, V2PERotaryEmbedding, sequence_lengths


class V2PEGPTModel(GPTModel):
    """GPTModel with V2PE rotary embeddings.

    ``forward`` takes ``positions`` (float64, [b, s], or [1, t] for a packed THD micro-batch) as a
    keyword argument: Float16Module casts positional floating-point arguments to bf16, which would
    collapse fractional positions. Angles are computed on every pipeline stage from the same positions.

    ``vocab_size`` is the real vocabulary (the tokenizer's ids). At a TP size not dividing it, the
    embedding and output layer are built with zero rows padded up to a multiple of it (on the last rank,
    as Megatron-LM pads; ``tp_padding``), checkpointed as the unpadded tensors, and the padded logits are
    -inf: the loss, the gradients and every argmax or sample are the unpadded model's. (Megatron-LM pads
    to a multiple of 128 x TP and does not mask: those rows are part of its vocabulary, as they are of
    the ``tiny`` preset's, whose vocabulary is the tokenizer's padded to 128.)
    """

    VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")

    def __init__(
        self,
        config: TransformerConfig,
        transformer_layer_spec: ModuleSpec | TransformerBlockSubmodules,
        vocab_size: int,
        max_sequence_length: int,
        *,
        rotary_base: float = 1e6,
        rotary_percent: float = 1.0,
        dynamic_ntk: DynamicNTK | None = None,
        **kwargs,
    ):
        layer = (transformer_layer_spec.layer_specs[0]
                 if isinstance(transformer_layer_spec, TransformerBlockSubmodules) else transformer_layer_spec)
        attention = layer.submodules.self_attention.module
        if not (isinstance(attention, type) and issubclass(attention, V2PESelfAttention)):
            raise ValueError(
                f"V2PEGPTModel needs a layer spec with V2PESelfAttention, got {attention}: build it "
                "with megatron_v2pe.model.layer_specs.v2pe_layer_spec() or v2pe_decoder_block_spec()"
            )
        padding = TPPadding.of(
            vocab_size, config.tensor_model_parallel_size, parallel_state.get_tensor_model_parallel_rank()
        )
        super().__init__(
            config,
            transformer_layer_spec,
            padding.padded,
            max_sequence_length,
            position_embedding_type="none",
            **kwargs,
        )
        self.vocab_padding = padding
        if padding.padded != vocab_size:
            self._pad_vocabulary()
        self.rotary_pos_emb = V2PERotaryEmbedding(
            config.kv_channels, rotary_percent, rotary_base, dynamic_ntk
        )

    def _pad_vocabulary(self) -> None:
        """Zero this rank's padded embedding and output rows; mask the padded logits."""
        params = dict(self.named_parameters())
        for name in self.VOCAB_ROWS:
            if name in params:
                zero_padding(params[name], 0, self.vocab_padding)
        if self.post_process:
            self.output_layer.register_forward_hook(self._mask_padded_logits)

    def _mask_padded_logits(self, module, args, output: tuple) -> None:
        """-inf in the padded columns of the output layer's logits (this rank's, or gathered), in place:
        no second [tokens x vocabulary] tensor (the layer's backward does not need its output)."""
        logits = output[0]
        padding = self.vocab_padding
        real = padding.units if logits.shape[-1] == padding.padded else len(padding.real)
        logits[..., real:] = float("-inf")

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Any = None) -> dict:
        """Megatron's, with the vocabulary rows as pieces of the unpadded tensors (``tp_padding``)."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.vocab_padding.padded != self.vocab_padding.units:
            for name in self.VOCAB_ROWS:
                if prefix + name in state:
                    state[prefix + name] = unpadded_sharded_tensor(
                        state[prefix + name], 0, self.vocab_padding
                    )
        return state

    def forward(
        self,
        input_ids: Optional[Tensor],
        attention_mask: Optional[Tensor] = None,
        *,
        positions: Tensor,
        labels: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        **kwargs,
    ) -> Tensor:
        return super().forward(
            input_ids,
            positions,
            attention_mask,
            labels=labels,
            packed_seq_params=packed_seq_params,
            **kwargs,
        )

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        # GPTModel.forward hands our positions to _preprocess as position_ids; with
        # position_embedding_type 'none' the embedding ignores them and no rope is built, so the
        # angles slot (index 1) is ours to fill.
        outputs = list(super()._preprocess(input_ids, position_ids, *args, **kwargs))
        outputs[1] = self.rotary_pos_emb(position_ids, self._sequence_lengths(position_ids, kwargs))
        return tuple(outputs)

    def _sequence_lengths(self, positions: Tensor, kwargs: dict) -> Optional[Tensor]:
        """Each token's sequence length for dynamic NTK, in packed batches (rows are sequences otherwise)."""
        packed = kwargs.get("packed_seq_params")
        if self.rotary_pos_emb.dynamic_ntk is None or packed is None:
            return None
        cu = packed.cu_seqlens_q_padded if packed.cu_seqlens_q_padded is not None else packed.cu_seqlens_q
        group = parallel_state.get_context_parallel_group() if self.config.context_parallel_size > 1 else None
        return sequence_lengths(positions, cu, group)
