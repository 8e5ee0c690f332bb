"""Checkpoints on CPU: exact resume after SIGKILL and an interrupted save, SIGTERM / SIGUSR1 to the
whole process group."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest

from megatron_v2pe.checkpoint.layout import latest_iteration
from megatron_v2pe.checkpoint.model_config import MODEL_CONFIG_FILE, config_from_dict
from megatron_v2pe.data.tokenizer import load_tokenizer
from megatron_v2pe.training.config import load_config, model_config
from tests.training.conftest import TINY_CONFIG, finish, losses, start_training, tiny_overrides

TOTAL, SAVED_AT = 8, 3


def wait_for(condition, proc, log, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) too early:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out:\n{log.read_text()[-4000:]}")
        time.sleep(0.02)


def test_resume_after_sigkill_is_bit_identical(synth_data, tmp_path):
    """Run N steps; run again, SIGKILL it right after the checkpoint of step k is complete, resume to
    N: steps k+1..N give bit-identical losses. A half-written later save is ignored on resume."""
    common = {"training.train_iters": TOTAL, "optimizer.lr_warmup_fraction": 0.25}
    reference = start_training(
        tiny_overrides(synth_data, **common, **{"logging.metrics_file": tmp_path / "reference.jsonl"}),
        tmp_path / "reference.log",
    )
    save = tmp_path / "ckpt"
    run = tiny_overrides(
        synth_data, **common, **{"checkpoint.save": save, "checkpoint.save_interval": SAVED_AT}
    )
    first = start_training(
        [*run, f"logging.metrics_file={tmp_path / 'first.jsonl'}"], tmp_path / "first.log", own_process_group=True
    )
    wait_for(lambda: latest_iteration(save) == SAVED_AT, first, tmp_path / "first.log")
    os.killpg(first.pid, signal.SIGKILL)  # the trainer and its helper processes, as a node failure does
    first.wait()
    assert latest_iteration(save) == SAVED_AT, "the run got past the next save before it was killed"

    # A save of a later step that was killed half-way: its directory exists, the marker never saw it.
    shutil.copytree(save / f"iter_{SAVED_AT:07d}", save / f"iter_{SAVED_AT + 1:07d}.tmp")
    (save / f"iter_{SAVED_AT + 1:07d}.tmp" / "metadata.json").unlink()

    resumed = start_training(
        [*run, f"logging.metrics_file={tmp_path / 'resumed.jsonl'}"], tmp_path / "resumed.log"
    )
    assert finish(resumed, tmp_path / "resumed.log") == 0, (tmp_path / "resumed.log").read_text()[-4000:]
    assert finish(reference, tmp_path / "reference.log") == 0, (tmp_path / "reference.log").read_text()[
        -4000:
    ]

    expected = losses(tmp_path / "reference.jsonl")
    assert sorted(expected) == list(range(1, TOTAL + 1))
    got = losses(tmp_path / "resumed.jsonl")
    assert sorted(got) == list(range(SAVED_AT + 1, TOTAL + 1))
    assert {i: expected[i] for i in got} == got  # bit-identical floats
    before_kill = losses(tmp_path / "first.jsonl")
    assert all(before_kill[i] == expected[i] for i in before_kill)
    assert latest_iteration(save) == TOTAL
    assert not list(save.glob("*.tmp")), "the incomplete save was not cleaned up"
    # the architecture sits beside the checkpoints, so evaluation and conversion need no config
    written = config_from_dict(json.loads((save / MODEL_CONFIG_FILE).read_text()))
    train_config = load_config(TINY_CONFIG, run)
    assert written == model_config(train_config, load_tokenizer(train_config.data.tokenizer))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_to_the_process_group_saves_and_exits_zero(synth_data, tmp_path, signum):
    """Slurm signals every process of a step: the data-loader worker and the async checkpoint writer
    get the signal too, and the trainer still finishes its step, saves and exits 0. While it runs, a
    second run in its checkpoint directory is refused, naming it."""
    save, metrics, log = tmp_path / "ckpt", tmp_path / "metrics.jsonl", tmp_path / "run.log"
    run = tiny_overrides(
        synth_data,
        **{"training.train_iters": 10_000, "checkpoint.save": save, "checkpoint.save_interval": 1,
           "checkpoint.async_save": "true", "checkpoint.keep_last": 2, "logging.metrics_file": metrics},
    )
    proc = start_training(run, log, own_process_group=True)
    assert "data.num_workers=1" in run
    wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 2, proc, log)
    if signum == signal.SIGTERM:
        second = start_training(run, tmp_path / "second.log")
        assert finish(second, tmp_path / "second.log") == 2
        assert (f"checkpoint.save {save} is in use by another run (pid {proc.pid} on {os.uname().nodename}"
                in (tmp_path / "second.log").read_text())
    os.killpg(proc.pid, signum)
    assert finish(proc, log) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert "Traceback" not in text and f"on signal {int(signum)}" in text, text[-4000:]
    last = max(losses(metrics))
    assert latest_iteration(save) == last
    assert (save / f"iter_{last:07d}" / "train_state" / "layout.json").is_file()
    assert not list(save.glob("*.tmp")) and not (save / "train.lock").exists()
