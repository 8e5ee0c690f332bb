"""The README's main job, shortened: synthesise data, train the tiny VLM with V2PE on CPU, checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys


def test_demo_trains_and_saves_a_checkpoint(tmp_path, installed_package):
    out = tmp_path / "demo"
    metrics = tmp_path / "metrics.jsonl"
    cmd = [sys.executable, "-m", "megatron_v2pe.training.demo", "--out", str(out), "--steps", "40",
           "--samples", "16", "checkpoint.save_interval=40", "logging.log_interval=10",
           f"logging.metrics_file={metrics}"]
    proc = subprocess.run(cmd, cwd=installed_package["cwd"], env=installed_package["env"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "40"
