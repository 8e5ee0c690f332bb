"""The release recipes of examples/configs/ pass the configuration checks at the world size they are
written for (their memory arithmetic is in their header)."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_v2pe.model.presets import preset, vision_transformer_config
from megatron_v2pe.model.tp_padding import TPPadding
from megatron_v2pe.training.config import ConfigError, load_config, validate, validate_architecture
from tests.training.conftest import TINY_CONFIG

EXAMPLE_8B = TINY_CONFIG.with_name("internvl3_8b_32k.yaml")
EXAMPLE_78B = TINY_CONFIG.with_name("internvl3_78b_256k.yaml")


def _recipe(synth_data, *extra: str, path=EXAMPLE_8B):
    manifests, tokenizer = synth_data
    data = "[" + ",".join(f"{{shards: '{m}'}}" for m in manifests) + "]"
    return load_config(path, [f"data.datasets={data}", f"data.tokenizer={tokenizer}", *extra])


def test_internvl3_8b_recipe_validates_on_32_gpus(synth_data):
    config = _recipe(synth_data)
    validate(config, world_size=32)
    assert preset(config.model.preset).name == "internvl3_8b"
    assert (config.data_parallel_size(32), config.num_micro_batches(32)) == (16, 2)
    vocab = preset(config.model.preset).language.vocab_size
    assert vocab % config.parallel.tensor_model_parallel_size == 0  # the output layer splits evenly


def test_internvl3_8b_recipe_refuses_a_world_size_it_does_not_divide(synth_data):
    with pytest.raises(ConfigError, match="world size 31"):
        validate(_recipe(synth_data), world_size=31)


def test_internvl3_78b_recipe_validates_on_256_gpus_with_the_vit_heads_padded(synth_data):
    config = _recipe(synth_data, path=EXAMPLE_78B)
    validate(config, world_size=256)
    vlm = preset(config.model.preset)
    validate_architecture(config, vlm)
    p = config.parallel
    sizes = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size)
    assert sizes == (8, 4, 8)
    assert (config.data_parallel_size(256), config.num_micro_batches(256)) == (1, 16)
    assert config.data.max_seq_len // p.context_parallel_size == 32768
    vision = vision_transformer_config(vlm, tensor_model_parallel_size=p.tensor_model_parallel_size)
    assert vision.num_attention_heads == 32  # 25 heads + 7 zero heads, 4 a rank


def test_internvl3_78b_at_tp8_is_built_with_its_vocabulary_padded(synth_data):
    config = _recipe(synth_data, path=EXAMPLE_78B)
    assert config.model.vocab_size is None  # the release's vocabulary, as converted
    vocab = preset(config.model.preset).language.vocab_size
    assert vocab == 151_674
    tp = config.parallel.tensor_model_parallel_size
    rows = [TPPadding.of(vocab, tp, rank) for rank in range(tp)]
    assert [p.padded for p in rows] == [151_680] * tp  # 18,960 rows a rank
    assert [len(p.real) for p in rows] == [18_960] * 7 + [18_960 - 6]  # the last rank holds the padding


def test_a_tensor_parallel_size_the_vit_cannot_pad_to_is_a_config_error(synth_data):
    config = _recipe(synth_data, "parallel.tensor_model_parallel_size=32", path=EXAMPLE_78B)
    with pytest.raises(ConfigError, match="internvl3_78b: language model query groups = 8 .* 32"):
        validate_architecture(config, preset(config.model.preset))  # the language model first
    vlm = preset(config.model.preset)
    language = dataclasses.replace(vlm.language, num_query_groups=64, vocab_size=151_680)
    vlm = dataclasses.replace(vlm, language=language)
    with pytest.raises(ConfigError, match="internvl3_78b: tensor_model_parallel_size 32 exceeds .* 25 heads"):
        validate_architecture(config, vlm)
