"""Bad input: every problem listed in one error, and no output directory left behind."""

from __future__ import annotations

import re

import pytest
import torch

from megatron_v2pe.convert.checkpoint import hf_to_megatron, megatron_to_hf
from megatron_v2pe.convert.checks import ConversionError
from megatron_v2pe.convert.cli import main
from megatron_v2pe.model.presets import internvl2_2b, tiny
from tests.convert.tiny_models import CONFIG, internvl2_config, internvl2_state_dict, write_internvl2

pytestmark = pytest.mark.usefixtures("megatron_runtime")

ID = CONFIG.img_context_token_id


def _only(tmp_path, *names):
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


def test_missing_unexpected_and_misshaped_tensors_are_listed_together(tmp_path, capsys):
    tensors = internvl2_state_dict()
    del tensors["language_model.model.layers.1.feed_forward.w3.weight"]
    tensors["language_model.model.layers.0.attention.rotary_emb.inv_freq"] = torch.zeros(8)
    tensors["mlp1.1.weight"] = tensors["mlp1.1.weight"][:, :-1].contiguous()
    source = write_internvl2(tmp_path / "release", tensors)
    code = main(
        [
            "hf-to-megatron",
            "--hf-layout",
            "internvl2",
            "--input",
            str(source),
            "--output",
            str(tmp_path / "out"),
            "--img-context-token-id",
            str(ID),
        ]
    )
    message = capsys.readouterr().err
    assert code == 2 and "3 problem(s)" in message
    assert "missing tensor language_model.model.layers.1.feed_forward.w3.weight (shape (160, 64))" in message
    assert "unexpected tensor language_model.model.layers.0.attention.rotary_emb.inv_freq" in message
    assert "shape mismatch mlp1.1.weight: (64, 255) in the checkpoint, (64, 256) expected" in message
    _only(tmp_path, "release")


def test_config_that_is_not_the_preset_lists_every_difference(tmp_path):
    source = write_internvl2(tmp_path / "release", internvl2_state_dict())
    with pytest.raises(ConversionError) as err:
        hf_to_megatron(
            source, tmp_path / "out", "internvl2", expected=internvl2_2b(), img_context_token_id=ID
        )
    problems = err.value.problems
    assert "vision.num_layers: 2 in the checkpoint, 24 expected" in problems
    assert "img_context_token_id: 3 in the checkpoint, 92546 expected" in problems
    assert "language.vocab_size: 256 in the checkpoint, 92553 expected" in problems
    _only(tmp_path, "release")


def test_unsupported_config_is_refused(tmp_path):
    config = internvl2_config()
    config["llm_config"]["tie_word_embeddings"] = True
    source = write_internvl2(tmp_path / "release", internvl2_state_dict(), config)
    with pytest.raises(ConversionError, match="untied word embeddings"):
        hf_to_megatron(source, tmp_path / "out", "internvl2", img_context_token_id=ID)
    _only(tmp_path, "release")


def test_existing_output_is_never_overwritten(tmp_path):
    source = write_internvl2(tmp_path / "release", internvl2_state_dict())
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError):
        hf_to_megatron(source, tmp_path / "out", "internvl2", img_context_token_id=ID)


def test_export_failures_leave_nothing(tmp_path, monkeypatch):
    source = write_internvl2(tmp_path / "release", internvl2_state_dict())
    hf_to_megatron(source, tmp_path / "megatron", "internvl2", expected=tiny(), img_context_token_id=ID)
    with pytest.raises(ConversionError, match="needs the released model directory"):
        megatron_to_hf(tmp_path / "megatron", tmp_path / "a", "internvl2")
    with pytest.raises(ConversionError, match="no vlm_config.json"):
        megatron_to_hf(tmp_path / "megatron" / "tokenizer", tmp_path / "b", "hf")

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("megatron_v2pe.convert.safetensors_io.save_safetensors", disk_full)
    with pytest.raises(OSError, match="No space left"):
        megatron_to_hf(tmp_path / "megatron", tmp_path / "c", "hf")
    _only(tmp_path, "release", "megatron")


def _to_megatron(source, output):
    return ["hf-to-megatron", "--hf-layout", "internvl2", "--input", str(source), "--output", str(output),
            "--img-context-token-id", str(ID)]  # fmt: skip


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda data: data[: len(data) - 7], r"it is cut short: its tensors need \d+ bytes, it has \d+"),
        (lambda data: data[:40], r"it ends inside its header \(40 bytes\)"),
        (
            lambda data: data[:8] + b"{not json" + data[17:],
            r"its header is not a safetensors header \(JSONDecodeError: .*\)",
        ),
    ],
    ids=["truncated", "cut-in-header", "garbled-header"],
)
def test_damaged_safetensors_named_in_one_line(tmp_path, capsys, damage, message):
    source = write_internvl2(tmp_path / "release", internvl2_state_dict())
    shard = source / "model-00002-of-00002.safetensors"
    shard.write_bytes(damage(shard.read_bytes()))
    assert main(_to_megatron(source, tmp_path / "out")) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"v2pe-convert-checkpoint: error: cannot convert {shard}: ")
    assert re.search(message + r"; copy or download the file again; nothing was written$", line)
    _only(tmp_path, "release")


def test_missing_input_is_named(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    for command in ("megatron-to-hf", "hf-to-megatron"):
        arguments = ["--hf-layout", "hf", "--input", str(missing), "--output", str(tmp_path / "out")]
        assert main([command, *arguments]) == 2
        assert capsys.readouterr().err.strip() == (
            f"v2pe-convert-checkpoint: error: --input {missing} does not exist; check the path"
        )
    with pytest.raises(ConversionError, match="the checkpoint directory does not exist"):
        megatron_to_hf(missing, tmp_path / "out", "hf")
    with pytest.raises(ConversionError, match="the directory does not exist"):
        hf_to_megatron(missing, tmp_path / "out", "hf")
    _only(tmp_path)
