"""The model to evaluate: a checkpoint (a model-only dist checkpoint or a training run's root), its
architecture and tokenizer, on this process's device, at the context-parallel size asked for."""

from __future__ import annotations

from pathlib import Path

from megatron_v2pe.checkpoint.model_config import read_model_config, tokenizer_dir
from megatron_v2pe.checkpoint.model_only import load_model
from megatron_v2pe.data.loader import check_tokenizer_matches
from megatron_v2pe.data.tokenizer import Tokenizer, load_tokenizer
from megatron_v2pe.model.vlm import InternVLModel
from megatron_v2pe.parallel.attention_backends import AttentionBackend
from megatron_v2pe.v2pe.positions import FixedDelta, UnitDelta, parse_delta_policy


def load_for_evaluation(
    checkpoint: Path,
    *,
    tokenizer: Path | None = None,
    model_config: Path | None = None,
    trained_window: int | None = None,
    attention_backend: AttentionBackend = "auto",
    context_parallel_size: int = 1,
) -> tuple[InternVLModel, Tokenizer, int]:
    """(model in eval mode, tokenizer, trained window). The architecture comes from ``model_config`` (a
    ``vlm_config.json`` or a training YAML, whose ``data.max_seq_len`` is then the default window) or
    else from the ``vlm_config.json`` beside the checkpoint; the tokenizer from ``tokenizer`` or the
    checkpoint's ``tokenizer/``. The window defaults to the model's maximum sequence length."""
    from megatron.core import parallel_state

    from megatron_v2pe.parallel import initialize
    from megatron_v2pe.parallel.runtime import current_device

    if not parallel_state.model_parallel_is_initialized():
        initialize(context_parallel_size=context_parallel_size, seed=0)
    tok = load_tokenizer(tokenizer or tokenizer_dir(checkpoint))
    config, window = None, trained_window
    if model_config is not None:
        if model_config.suffix in (".yaml", ".yml"):
            from megatron_v2pe.training.config import load_config
            from megatron_v2pe.training.config import model_config as training_model_config

            train = load_config(model_config)
            config = training_model_config(train, tok)
            window = window or train.data.max_seq_len
        else:
            config = read_model_config(model_config)
    model, config = load_model(checkpoint, config, attention_backend=attention_backend)
    check_tokenizer_matches(tok, config)
    return model.to(current_device()).eval(), tok, window or config.language.max_sequence_length


def rope_for_policy(model: InternVLModel, delta_policy: str) -> str | None:
    """Turn off a released model's dynamic NTK scaling unless the evaluation runs at δ = 1, the only
    setting it was made for (V2PE positions use plain RoPE, as the paper does); a line saying so, if
    it was on."""
    rotary = model.language_model.rotary_pos_emb
    policy = parse_delta_policy(delta_policy)
    unit = isinstance(policy, UnitDelta) or (isinstance(policy, FixedDelta) and policy.delta == 1.0)
    if rotary.dynamic_ntk is None or unit:
        return None
    rotary.dynamic_ntk = None
    return f"plain RoPE under delta policy {delta_policy}: the model's dynamic NTK scaling is for δ = 1 only"
