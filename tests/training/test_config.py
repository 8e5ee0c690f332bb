"""Configuration: YAML + overrides, and one test per validation message (no process group needed)."""

from __future__ import annotations

import pytest

from megatron_v2pe.optional_deps import is_available
from megatron_v2pe.training.config import ConfigError, load_config, validate
from tests.training.conftest import TINY_CONFIG, tiny_overrides

EXAMPLE_2B = TINY_CONFIG.with_name("internvl2_2b_32k.yaml")


def config(synth_data, **extra):
    return load_config(TINY_CONFIG, tiny_overrides(synth_data, **extra))


def test_overrides_are_typed(synth_data):
    c = config(
        synth_data,
        **{"training.train_iters": 7, "optimizer.lr": "3e-4", "parallel.tensor_model_parallel_size": 2},
    )
    assert (c.training.train_iters, c.optimizer.lr, c.parallel.tensor_model_parallel_size) == (7, 3e-4, 2)
    assert c.data.datasets[0].shards.endswith("manifest.json")
    validate(config(synth_data), world_size=1)


def test_paper_recipe_example_reads():
    c = load_config(EXAMPLE_2B)
    assert c.model.preset == "internvl2_2b" and c.model.vision_drop_path_rate == 0.1
    assert (c.optimizer.lr, c.optimizer.lr_warmup_fraction, c.optimizer.weight_decay) == (5e-6, 0.03, 0.05)
    assert c.training.bf16 and c.data.delta_policy == "random" and c.model.recompute_granularity == "full"


def test_rotary_base_override_reaches_the_language_model(synth_data):
    from megatron_v2pe.data.tokenizer import load_tokenizer
    from megatron_v2pe.training.train import model_config

    c = config(synth_data, **{"model.rotary_base": 1000})
    tokenizer = load_tokenizer(c.data.tokenizer)
    assert model_config(c, tokenizer).language.rotary_base == 1000.0
    assert model_config(config(synth_data), tokenizer).language.rotary_base == 1e6  # the preset's


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.train_iters=ten", "training.train_iters: expected int"),
        ("training.iters=3", "unknown key(s) training.iters"),
        ("train_iters", "write section.key=value"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(TINY_CONFIG, [override])


@pytest.mark.parametrize(
    "extra, world_size, message",
    [
        (
            {"parallel.tensor_model_parallel_size": 2, "parallel.context_parallel_size": 2},
            6,
            "world size 6 is not divisible by .* = 4; change the parallel sizes or launch a multiple of 4",
        ),
        (
            {"parallel.context_parallel_size": 2, "data.max_seq_len": 510, "data.pad_multiple": "null"},
            2,
            r"data.max_seq_len 510 is not a multiple of 4, .*2 x context_parallel_size 2\); use 508",
        ),
        (
            {"parallel.context_parallel_size": 4, "data.pad_multiple": 4},
            4,
            "data.pad_multiple 4 is not a multiple of 8",
        ),
        ({"training.global_batch_size": 3}, 2, "global_batch_size 3 is not a positive multiple of .* 1 x 2"),
        ({"training.micro_batch_size": 2}, 1, "a micro-batch is one packed"),
        ({"parallel.sequence_parallel": True}, 1, "sequence_parallel needs tensor_model_parallel_size > 1"),
        (
            {"data.tokenizer": "/nonexistent/tok.model"},
            1,
            "data.tokenizer /nonexistent/tok.model does not exist",
        ),
        ({"data.tokenizer": "null"}, 1, "data.tokenizer is not set"),
        (
            {"data.datasets": "[{shards: '/nonexistent/shard-{0..3}.tar'}]"},
            1,
            r"data.datasets\[0\].shards .* names no shard files \(/nonexistent/shard-0.tar is missing\)",
        ),
        ({"data.datasets": "[]"}, 1, "data.datasets is empty"),
        ({"optimizer.lr_decay_style": "wsd"}, 1, "optimizer.lr_decay_style is 'wsd'; choose one of"),
        ({"model.rotary_base": 0.5}, 1, r"model.rotary_base is 0.5; it must be > 1"),
    ],
)
def test_validation_messages(synth_data, extra, world_size, message):
    with pytest.raises(ConfigError, match=message):
        validate(config(synth_data, **extra), world_size)


@pytest.mark.skipif(
    is_available("transformer_engine"), reason="checks the message without Transformer Engine"
)
def test_fp8_without_transformer_engine(synth_data):
    with pytest.raises(ConfigError, match="training.fp8=delayed: .*transformer-engine"):
        validate(
            config(synth_data, **{"training.fp8": "delayed", "training.bf16": True, "data.pad_multiple": 16}),
            1,
        )


def test_config_error_exits_before_any_work(synth_data, capsys):
    from megatron_v2pe.training.train import main

    code = main(["--config", str(TINY_CONFIG), *tiny_overrides(synth_data, **{"data.tokenizer": "/missing"})])
    assert code == 2
    assert "data.tokenizer /missing does not exist" in capsys.readouterr().err
