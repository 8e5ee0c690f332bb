"""Nothing lost: damaged or foreign checkpoint directories, resume with changed settings, data totals.

One run saves iterations 2 and 4; every other trainer launch resumes from a copy of its directory,
changed the way a user or a crash changes it. The checks that need no trainer run the functions of
the checkpoint directory directly.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from megatron_v2pe.checkpoint.errors import CheckpointError
from megatron_v2pe.checkpoint.layout import LATEST, find_checkpoint, tidy_save_dir
from megatron_v2pe.checkpoint.lock import SaveDirLock
from megatron_v2pe.data.shards import ShardWriter
from tests.training.conftest import finish, losses, start_training, tiny_overrides

SAVED = (2, 4)
LR, MIN_LR = 2.0e-3, 2.0e-4  # examples/configs/tiny_cpu.yaml


def _write_dirty_dataset(directory: Path) -> Path:
    """Two shards of text-only samples; the first holds two different samples under one key."""

    def record(i: int) -> dict:
        return {"conversations": [{"from": "human", "value": f"Count to {i}."},
                                  {"from": "gpt", "value": " ".join(str(k) for k in range(i))}]}

    with ShardWriter(directory, max_bytes=3000) as writer:
        writer.write("twin", record(3))
        writer.write("twin", record(5))
        for i in range(1, 12):
            writer.write(f"count{i:02d}", record(i))
    assert len(list(directory.glob("*.tar"))) >= 2
    return directory


@pytest.fixture(scope="module")
def run(synth_data, tmp_path_factory):
    """(overrides, directory) of a finished 4-step run that saved iterations 2 and 4."""
    root = tmp_path_factory.mktemp("recovery")
    dirty = _write_dirty_dataset(root / "dirty")
    manifests, _ = synth_data
    datasets = ",".join([f"{{shards: '{m}'}}" for m in manifests] + [f"{{shards: '{dirty}', weight: 3}}"])
    overrides = tiny_overrides(synth_data, **{"data.datasets": f"[{datasets}]"})
    proc = start_training(
        [*overrides, "training.train_iters=4", "checkpoint.save_interval=2", f"checkpoint.save={root / 'ckpt'}",
         f"logging.metrics_file={root / 'metrics.jsonl'}", f"logging.tensorboard_dir={root / 'tb'}"],
        root / "run.log",
    )
    assert finish(proc, root / "run.log") == 0, (root / "run.log").read_text()[-4000:]
    return overrides, root


def _copy(run, tmp_path) -> Path:
    shutil.copytree(run[1] / "ckpt", tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _train(run, tmp_path, save: Path, *extra: str) -> tuple[int, str]:
    log = tmp_path / "resume.log"
    proc = start_training(
        [*run[0], f"checkpoint.save={save}", f"logging.metrics_file={tmp_path / 'metrics.jsonl'}", *extra], log
    )
    return finish(proc, log), log.read_text()


def _records(metrics: Path) -> dict[int, dict]:
    return {r["iteration"]: r for r in map(json.loads, metrics.read_text().splitlines())}


# -- data totals -------------------------------------------------------------------------------------


def test_data_problem_totals_in_log_metrics_and_tensorboard(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, root = run
    last = _records(root / "metrics.jsonl")[4]["data_problems"]
    assert last["duplicate_key"] >= 2 and last["duplicate_key"] % 2 == 0, last  # both twins, every epoch
    text = (root / "run.log").read_text()
    assert "skipped sample" in text and "twin: duplicate_key" in text
    skipped = sum(n for k, n in last.items() if k not in ("truncated", "unreadable_shard", "corrupt_tar_data"))
    assert f"| skipped samples {skipped} (" in text and f"duplicate_key {last['duplicate_key']}" in text
    assert re.search(rf"^data totals: skipped samples {skipped} \(.*duplicate_key", text, flags=re.M), text[-3000:]
    events = EventAccumulator(str(root / "tb"))
    events.Reload()
    scalars = events.Scalars("train/data/duplicate_key")
    assert [(s.step, s.value) for s in scalars][-1] == (4, last["duplicate_key"])


# -- the checkpoint directory (no trainer) -----------------------------------------------------------


def test_marker_and_completeness_decide_the_resume_point(run, tmp_path, caplog):
    save = _copy(run, tmp_path)
    assert find_checkpoint(save).iteration == 4
    # A checkpoint newer than the marker (a save interrupted before the marker, or a roll-back) is kept.
    (save / LATEST).write_text("2")
    assert find_checkpoint(save).iteration == 2
    assert "newer complete checkpoint(s) iter_0000004 are not resumed from" in caplog.text
    # A stray directory is no checkpoint; a truncated file makes a checkpoint incomplete.
    shutil.copytree(save / "iter_0000004", save / "iter_0000020.bak")
    (save / LATEST).write_text("4")
    distcp = save / "iter_0000004" / "__0_0.distcp"
    size = distcp.stat().st_size
    with open(distcp, "r+b") as f:
        f.truncate(size // 2)
    assert find_checkpoint(save).iteration == 2
    assert f"{distcp} has {size // 2} bytes, {size} were written (truncated?): resuming from " \
           f"{save / 'iter_0000002'}, the newest complete checkpoint" in caplog.text
    # Start-up moves the incomplete one out of the way (this run saves iteration 4 again), deletes none.
    (save / "iter_0000005.tmp").mkdir()
    tidy_save_dir(save, 2)
    assert sorted(p.name for p in save.iterdir() if p.is_dir()) == [
        "iter_0000002", "iter_0000004.set-aside", "iter_0000020.bak"
    ]
    # Nothing complete left: a message, not a fresh start.
    (save / "iter_0000002" / "train_state" / "layout.json").unlink()
    with pytest.raises(CheckpointError, match=r"no complete checkpoint to resume from in .*names iteration 4, which has no directory; .*layout\.json is missing"):
        find_checkpoint(save)


def test_lock_refuses_a_second_run_and_takes_over_a_dead_one(tmp_path):
    first, second = SaveDirLock(tmp_path), SaveDirLock(tmp_path)
    first.acquire()
    with pytest.raises(CheckpointError, match=rf"in use by another run \(pid {os.getpid()} on {re.escape(os.uname().nodename)}"):
        second.acquire()
    first.release()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "train.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid}))
    second.acquire()  # stale: same host, no such process
    assert json.loads((tmp_path / "train.lock").read_text())["pid"] == os.getpid()
    second.release()
    (tmp_path / "train.lock").write_text(json.dumps({"host": "elsewhere", "pid": dead.pid}))
    with pytest.raises(CheckpointError, match="pid .* on elsewhere"):
        first.acquire()  # another host's process cannot be checked: refused


def test_changed_data_layout_is_named(run):
    import torch

    from megatron_v2pe.data.loader import DataStateMismatch, PackedBatchLoader
    from megatron_v2pe.data.tokenizer import load_tokenizer
    from megatron_v2pe.training.config import load_config, model_config
    from tests.training.conftest import TINY_CONFIG

    overrides, root = run
    state = torch.load(root / "ckpt" / "iter_0000004" / "train_state" / "data_dp0000_of_0001.pt", weights_only=False)

    def loader(*extra):
        config = load_config(TINY_CONFIG, [*overrides, *extra])
        return PackedBatchLoader(config.data_config(), model_config(config, load_tokenizer(config.data.tokenizer)))

    loader().load_state_dict(state)
    with pytest.raises(DataStateMismatch, match=r"saved with data.num_workers=1, this run has 2; set data.num_workers=1"):
        loader("data.num_workers=2").load_state_dict(state)
    with pytest.raises(DataStateMismatch, match="dataset 0 .* another shard list or seed"):
        loader("training.seed=7").load_state_dict(state)


# -- resuming (trainer launches) ---------------------------------------------------------------------


def test_lost_marker_and_damaged_latest_resume_from_the_previous_checkpoint(run, tmp_path):
    """No marker, a file of iteration 4 deleted, a stray .bak, an abandoned .tmp and the lock of a dead
    run: resume from iteration 2, bit-identical, with every complete checkpoint kept. A new optimizer.lr
    and more train_iters keep the checkpoint's schedule, and say so."""
    save = _copy(run, tmp_path)
    (save / LATEST).unlink()
    (save / "iter_0000004" / "train_state" / "rng_rank00000.pt").unlink()
    shutil.copytree(save / "iter_0000002", save / "iter_0000020.bak")
    (save / "iter_0000005.tmp").mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (save / "train.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid}))
    code, log = _train(run, tmp_path, save, "training.train_iters=6", "optimizer.lr=0.01")
    assert code == 0, log[-4000:]
    assert (f"{save / LATEST} is missing: resuming from {save / 'iter_0000002'}, the newest complete checkpoint"
            in log), log[-4000:]
    assert f"moved {save / 'iter_0000004'} to {save / 'iter_0000004.set-aside'} (incomplete: " in log
    assert f"removing {save / 'iter_0000005.tmp'}, a save abandoned by an earlier run" in log
    assert f"taking over the stale lock {save / 'train.lock'} of pid {dead.pid}" in log
    assert ("LR schedule from the checkpoint, not the config: max_lr 0.002 (config: 0.01), lr_decay_steps 4 "
            "(config: 6)") in log and "checkpoint.override_opt_param_scheduler=true" in log
    reference, resumed = _records(run[1] / "metrics.jsonl"), _records(tmp_path / "metrics.jsonl")
    assert sorted(resumed) == [3, 4, 5, 6]
    assert [(resumed[i]["loss"], resumed[i]["lr"]) for i in (3, 4)] == [
        (reference[i]["loss"], reference[i]["lr"]) for i in (3, 4)
    ]
    assert resumed[6]["lr"] == pytest.approx(MIN_LR)  # the checkpoint's cosine ended at step 4
    assert sorted(p.name for p in save.iterdir()) == sorted(
        [LATEST, "vlm_config.json", "iter_0000002", "iter_0000004.set-aside", "iter_0000006", "iter_0000020.bak"]
    )
    assert (save / LATEST).read_text() == "6"


def test_changed_architecture_and_vocabulary_are_refused_before_the_model(run, tmp_path):
    save = _copy(run, tmp_path)
    code, log = _train(run, tmp_path, save, "model.vocab_size=768", "model.rotary_base=5e5")
    assert code == 2, log[-4000:]
    assert (f"the checkpoints in {save} hold another architecture than this config builds "
            "(language.vocab_size: 640 in the checkpoint, 768 configured; language.rotary_base: 1000000.0 in "
            "the checkpoint, 500000.0 configured)") in log, log[-4000:]
    assert "Traceback" not in log and "resumed from" not in log
    assert not (save / "train.lock").exists()


def test_changed_num_workers_gives_a_message(run, tmp_path):
    save = _copy(run, tmp_path)
    code, log = _train(run, tmp_path, save, "data.num_workers=2")
    assert code == 2, log[-4000:]
    assert ("cannot continue the data stream: the data-loader state was saved with data.num_workers=1, this "
            "run has 2; set data.num_workers=1 to continue the data stream exactly; or set "
            "checkpoint.restart_data_stream=true") in log, log[-4000:]
    assert "Traceback" not in log


def test_deleted_shard_restarts_the_stream_and_new_lr_overrides_the_schedule(run, tmp_path):
    save = _copy(run, tmp_path)
    shutil.copytree(run[1] / "dirty", tmp_path / "dirty")
    dirty = sorted((tmp_path / "dirty").glob("*.tar"))
    dirty[-1].unlink()
    overrides = [o.replace(str(run[1] / "dirty"), str(tmp_path / "dirty")) for o in run[0]]
    log = tmp_path / "resume.log"
    proc = start_training(
        [*overrides, f"checkpoint.save={save}", f"logging.metrics_file={tmp_path / 'metrics.jsonl'}",
         "training.train_iters=6", "optimizer.lr=0.01", "checkpoint.override_opt_param_scheduler=true",
         "checkpoint.restart_data_stream=true"],
        log,
    )
    assert finish(proc, log) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert re.search(r"dataset 3 \(.*dirty, now \d+ shards\) was saved for another shard list or seed.*: the "
                     r"data stream starts afresh \(checkpoint.restart_data_stream\)", text), text[-4000:]
    assert "LR schedule from the config (checkpoint.override_opt_param_scheduler)" in text
    lrs = {i: r["lr"] for i, r in _records(tmp_path / "metrics.jsonl").items()}
    cosine = {n: MIN_LR + (0.01 - MIN_LR) * 0.5 * (1 + math.cos(math.pi * n / 6)) for n in (5, 6)}
    assert lrs == pytest.approx(cosine, rel=1e-9)  # no warm-up: round(0.05 x 6) = 0 steps


@pytest.mark.skipif(os.geteuid() != 0, reason="a small file system to fill needs root (mount -t tmpfs)")
def test_full_disk_names_the_path(run, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(full)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        code, log = _train(run, tmp_path, full / "ckpt", "training.train_iters=1")
    finally:
        subprocess.run(["umount", str(full)], check=True)
    assert code == 1, log[-4000:]
    assert re.search(rf"^v2pe-train: no space left on the device of {full / 'ckpt'}\S* while saving a checkpoint",
                     log, flags=re.M), log[-4000:]
