"""The release recipes of examples/configs/ pass the configuration checks at the world size they are
written for (their memory arithmetic is in their header)."""

from __future__ import annotations

import pytest

from megatron_v2pe.model.presets import preset
from megatron_v2pe.training.config import ConfigError, load_config, validate
from tests.training.conftest import TINY_CONFIG

EXAMPLE_8B = TINY_CONFIG.with_name("internvl3_8b_32k.yaml")


def _recipe(synth_data, *extra: str):
    manifests, tokenizer = synth_data
    data = "[" + ",".join(f"{{shards: '{m}'}}" for m in manifests) + "]"
    return load_config(EXAMPLE_8B, [f"data.datasets={data}", f"data.tokenizer={tokenizer}", *extra])


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
