"""The recompute and fusion knobs of the model section: validated up front, and handed to the model."""

from __future__ import annotations

import pytest

from megatron_v2pe.data.tokenizer import load_tokenizer
from megatron_v2pe.training.config import ConfigError, load_config, validate
from tests.training.conftest import TINY_CONFIG, tiny_overrides


def config(synth_data, **extra):
    return load_config(TINY_CONFIG, tiny_overrides(synth_data, **extra))


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"model.recompute_modules": "[mlp]"}, "recompute_modules applies to recompute_granularity: selective"),
        ({"model.recompute_granularity": "selective", "model.recompute_modules": "[attn]"},
         r"model.recompute_modules\[0\] is 'attn'; choose one of \('core_attn', 'mlp', 'layernorm'\)"),
        ({"model.recompute_granularity": "selective", "model.recompute_modules": "[layernorm]"},
         "'layernorm' needs the Transformer Engine layers"),
        ({"model.loss_chunk_tokens": 0}, r"model.loss_chunk_tokens is 0; it must be >= 1 \(tokens per chunk\)"),
    ],
)
def test_validation_messages(synth_data, extra, message):
    with pytest.raises(ConfigError, match=message):
        validate(config(synth_data, **extra), 1)


@pytest.mark.usefixtures("megatron_runtime")
def test_knobs_reach_the_model(synth_data):
    from megatron_v2pe.model.norms import CompiledRMSNorm
    from megatron_v2pe.training.config import model_config
    from megatron_v2pe.training.train import build_model

    c = config(synth_data, **{
        "model.recompute_granularity": "selective", "model.recompute_modules": "[core_attn, mlp]",
        "model.loss_chunk_tokens": 512, "model.compiled_norm": True, "model.fused_swiglu": True,
        "model.attention_backend": "reference",
    })
    validate(c, 1)
    (chunk,) = build_model(c, model_config(c, load_tokenizer(c.data.tokenizer)))
    language = chunk.language_model
    assert chunk.fusions.loss_chunk_tokens == 512
    assert language.config.bias_activation_fusion and language.config.recompute_modules == ["core_attn", "mlp"]
    assert chunk.vision_model.config.recompute_modules == ["core_attn"]  # model/fusions.py says why
    layer = language.decoder.layers[0]
    assert layer.recompute_mlp and isinstance(layer.pre_mlp_layernorm, CompiledRMSNorm)
    assert isinstance(language.decoder.final_layernorm, CompiledRMSNorm)
