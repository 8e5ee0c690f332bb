"""A checkpoint saved by one process (TP = PP = CP = 1) resumes under TP 2, PP 2 and CP 2 (2 ranks)
with the next step's loss equal to the single-process resume's. The vocabulary (641 ids) is odd, so TP 2
pads it by a row: weights and optimizer state are saved unpadded and resharded into the padded layout."""

from __future__ import annotations

from megatron_v2pe.checkpoint.layout import latest_iteration
from tests.parallel.launch import run_torchrun
from tests.training.conftest import finish, losses, start_training, tiny_overrides

SAVED_AT, NEXT = 2, 3


def test_resume_in_other_layouts(synth_data, tmp_path):
    save, metrics, log = tmp_path / "ckpt", tmp_path / "single.jsonl", tmp_path / "single.log"
    overrides = tiny_overrides(synth_data, **{"data.num_workers": 0, "model.vocab_size": 641})
    proc = start_training(
        [
            *overrides,
            f"training.train_iters={NEXT}",
            f"checkpoint.save={save}",
            f"checkpoint.save_interval={SAVED_AT}",
            f"logging.metrics_file={metrics}",
        ],
        log,
    )
    assert finish(proc, log) == 0, log.read_text()[-4000:]
    (save / "latest_checkpointed_iteration.txt").write_text(str(SAVED_AT))  # resume from step 2
    assert latest_iteration(save) == SAVED_AT
    expected = losses(metrics)[NEXT]

    result = run_torchrun(
        "../../training/workers/resume_layouts.py",
        2,
        tmp_path,
        "--checkpoint",
        str(save),
        "--iterations",
        str(NEXT),
        *overrides,
    )
    for name, records in result.items():
        assert [r["iteration"] for r in records] == [NEXT], name
        assert abs(records[0]["loss"] - expected) <= 1e-5, (name, records[0]["loss"], expected)
