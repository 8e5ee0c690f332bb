"""Bad input: every problem listed in one error, and no output directory left behind."""

from __future__ import annotations

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
    assert code == 1 and "3 problem(s)" in message
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
