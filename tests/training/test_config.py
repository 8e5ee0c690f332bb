"""Configuration: YAML + overrides, and one test per validation message (no process group needed)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from megatron_v2pe.optional_deps import is_available
from megatron_v2pe.training.config import ConfigError, load_config, validate
from tests.training.conftest import REPO_ROOT, TINY_CONFIG, tiny_overrides

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
    from megatron_v2pe.training.config import model_config

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
        ({"model.attention_backend": "flash"}, 1, r"model.attention_backend is 'flash'; choose one of \("),
        ({"model.rotary_base": 0.5}, 1, r"model.rotary_base is 0.5; it must be > 1"),
        ({"optimizer.adam_beta1": 1.5}, 1, r"optimizer.adam_beta1 is 1.5; it must be in \[0, 1\)"),
        ({"optimizer.weight_decay": -0.1}, 1, r"optimizer.weight_decay is -0.1; it must be >= 0"),
        ({"optimizer.clip_grad": -1}, 1, r"optimizer.clip_grad is -1.0; it must be >= 0 .*0 turns clipping"),
        ({"data.delta_policy": "bogus"}, 1, r"data.delta_policy: unknown δ policy 'bogus'; valid forms"),
        ({"data.delta_policy": "fixed:0"}, 1, r"policy 'fixed:0': delta\[0\] = 0.0 is outside \(0, 1\]"),
        ({"data.delta_policy": "fixed:3"}, 1, r"policy 'fixed:3': delta\[0\] = 3.0 is outside \(0, 1\]"),
        ({"data.max_seq_len": 0}, 1, r"data.max_seq_len is 0; it must be in \[1, 262144\]"),
        ({"data.num_workers": -1}, 1, r"data.num_workers is -1; it must be >= 0"),
        ({"data.max_tiles": 0}, 1, r"data.max_tiles is 0; it must be >= 1"),
        ({"model.hf_config": "/nowhere/config.json"}, 1, "model.hf_config /nowhere/config.json does not exist"),
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


def test_negative_dataset_weight(synth_data):
    manifest = synth_data[0][0]
    with pytest.raises(ConfigError, match=r"data.datasets\[0\].weight is -1.0; weights must be > 0"):
        validate(config(synth_data, **{"data.datasets": f"[{{shards: '{manifest}', weight: -1}}]"}), 1)


def test_a_config_built_in_code_gets_the_same_checks(synth_data):
    c = config(synth_data)
    c.data.over_long = "cut"
    with pytest.raises(ConfigError, match=r"data.over_long is 'cut'; choose one of \('drop', 'truncate'\)"):
        validate(c, 1)


@pytest.mark.skipif(is_available("transformer_engine"), reason="checks the message without TE")
def test_te_attention_without_transformer_engine(synth_data):
    with pytest.raises(ConfigError, match="model.attention_backend=te: .*'transformer-engine'.*; or set"):
        validate(config(synth_data, **{"model.attention_backend": "te"}), 1)


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  preset: [tiny\n")
    with pytest.raises(ConfigError, match=r"bad.yaml, line 3, column 1: not valid YAML: .*started at line 2"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"configuration file .*missing.yaml does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "extra, world_size, message",
    [
        ({"parallel.tensor_model_parallel_size": 3}, 3, "attention heads = 4 is not divisible by tensor_"),
        ({"parallel.tensor_model_parallel_size": 4}, 4, "query groups = 2 is not divisible by tensor_model"),
        ({"parallel.pipeline_model_parallel_size": 3}, 3, "layers = 2 is not divisible by pipeline stages"),
        (
            {"parallel.pipeline_model_parallel_size": 2, "parallel.virtual_pipeline_model_parallel_size": 2},
            2,
            r"layers = 2 is not divisible by pipeline stages \(pipeline x virtual pipeline size\) 4",
        ),
    ],
)
def test_model_that_does_not_split_over_the_layout(synth_data, monkeypatch, extra, world_size, message):
    from megatron_v2pe.training.train import preflight

    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    with pytest.raises(ConfigError, match="model tiny: .*" + message):
        preflight(config(synth_data, **extra))


def test_a_vocabulary_the_tp_size_does_not_divide_is_accepted(synth_data, monkeypatch):
    """The model pads it to a multiple of TP and masks the padding (``model/tp_padding.py``)."""
    from megatron_v2pe.training.train import preflight

    monkeypatch.setenv("WORLD_SIZE", "2")
    layout = {"parallel.tensor_model_parallel_size": 2, "model.vocab_size": 641}
    vlm, _ = preflight(config(synth_data, **layout))
    assert vlm.language.vocab_size == 641


def test_packs_smaller_than_every_sample(synth_data):
    from megatron_v2pe.training.train import preflight

    vlm, _ = preflight(config(synth_data))  # the usual limits let samples in
    assert vlm.name == "tiny"
    with pytest.raises(
        ConfigError,
        match=r"none of the first \d+ samples of data.datasets\[0\] .* fits a pack of data.max_seq_len 64 "
        r"tokens and data.max_tiles 24 tiles \(skipped: too_long \d+\); raise data.max_seq_len",
    ):
        preflight(config(synth_data, **{"data.max_seq_len": 64}))


def test_a_dataset_without_readable_data_is_named_before_any_work(synth_data, tmp_path):
    from megatron_v2pe.training.train import preflight

    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"data.datasets\[0\] \(.*empty.tar\): .*holds no readable tar data"):
        preflight(config(synth_data, **{"data.datasets": f"[{{shards: '{tmp_path / 'empty.tar'}'}}]"}))


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--config", "/nowhere/run.yaml"], "the configuration file /nowhere/run.yaml does not exist"),
        (["data.tokenizer={bad}"], "data.tokenizer: .*bad.model is not a sentencepiece tokenizer model"),
        (["data.max_seq_len=64"], "none of the first"),
    ],
)
def test_user_errors_exit_2_with_one_line_before_any_work(
    synth_data, tmp_path, capsys, monkeypatch, arguments, message
):
    from megatron_v2pe.training import train

    def no_work(**_):
        raise AssertionError("the process group was set up")

    monkeypatch.setattr(train, "initialize", no_work)
    (tmp_path / "bad.model").write_text("not a tokenizer\n")
    argv = ["--config", str(TINY_CONFIG), *tiny_overrides(synth_data)]
    code = train.main([*argv, *(a.format(bad=tmp_path / "bad.model") for a in arguments)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("v2pe-train: error:")]
    assert code == 2 and len(errors) == 1
    assert re.search(message, errors[0])


def test_under_torchrun_rank_0_alone_prints_and_exit_code_is_2(synth_data):
    from tests.parallel.launch import free_port

    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"]
    launch.append(f"--master-port={free_port()}")
    layout = {"parallel.pipeline_model_parallel_size": 2, "parallel.virtual_pipeline_model_parallel_size": 2}
    overrides = tiny_overrides(synth_data, **layout)
    proc = subprocess.run(
        [*launch, "-m", "megatron_v2pe.training.train", "--config", str(TINY_CONFIG), *overrides],
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1"),
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if "v2pe-train: error:" in line]
    assert len(errors) == 1
    assert "layers = 2 is not divisible by pipeline stages" in errors[0]
    assert "exitcode  : 2" in output  # torchrun's report of the first rank to exit
    assert "megatron_v2pe/" not in output  # no traceback through the project's code


@pytest.mark.parametrize(
    "template, refusal",
    [
        ("internvl2_5", None),
        ("Hermes-2", None),
        ("vicuna", "chat template 'vicuna' .*not implemented"),
        ("phi3-chat", "'phi3-chat' needs .*<\\|end\\|>.* as special tokens"),  # the tokenizer lacks them
    ],
)
def test_the_trainer_takes_every_implemented_template_of_an_internvl3_config(
    synth_data, tmp_path, template, refusal
):
    from megatron_v2pe.data.tokenizer import load_tokenizer
    from megatron_v2pe.training.train import model_config
    from tests.unit.test_internvl_config import INTERNVL3_1B

    path = tmp_path / "config.json"
    path.write_text(json.dumps({**INTERNVL3_1B, "template": template}))
    tokenizer = load_tokenizer(synth_data[1])
    c = config(synth_data, **{"model.hf_config": path, "model.img_context_token_id": tokenizer.img_context_id})
    if refusal is None:
        assert model_config(c, tokenizer).template == template
    else:
        with pytest.raises(ValueError, match=refusal):
            model_config(c, tokenizer)
