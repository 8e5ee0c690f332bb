"""The CPU demo trains: a short run of the V2PE language model brings its loss down."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.parallel.launch import REPO_ROOT


def test_short_demo_run_learns(tmp_path):
    output = tmp_path / "history.json"
    cmd = [sys.executable, "-m", "megatron_v2pe.training.lm_demo", "--steps", "60", "--log-interval", "20",
           "--eval-batches", "1", "--output", str(output)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step    60" in proc.stdout + proc.stderr
    history = json.loads(output.read_text())
    losses = history["loss"]
    assert len(losses) == 60
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)
