"""The V2PE demo with tiny settings: both runs train, every length is evaluated, the outputs are complete.
Checks the structure of what it writes, not the size of the effect (that needs the full run)."""

from __future__ import annotations

import json
import subprocess
import sys

MULTIPLES = ("1x", "2x", "4x", "8x")


def _run(installed: dict, out, steps: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "megatron_v2pe.eval.demo",
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--train-samples",
        "16",
        "--eval-samples",
        "2",
        "--train-images",
        "8",
        "--batch",
        "2",
        *extra,
    ]
    return subprocess.run(cmd, check=False, cwd=installed["cwd"], env=installed["env"], capture_output=True,
                          text=True, timeout=300)


def test_eval_demo_trains_both_models_and_reports_every_length(tmp_path, installed_package):
    out = tmp_path / "v2pe_demo"
    proc = _run(installed_package, out, steps=6)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["models"]) == {"v2pe", "baseline"}
    assert summary["train_policies"] == {"v2pe": "random", "baseline": "none"}
    window = summary["trained_window"]
    assert summary["eval_policies"] == {"v2pe": f"auto:{window}", "baseline": "none"}
    for name, rows in summary["models"].items():
        assert list(rows) == list(MULTIPLES)
        for key, row in rows.items():
            assert 0.0 <= row["accuracy"] <= 1.0 and row["samples"] == 2
            # the prompt is about `multiple` times the longest training sample
            assert 0.7 * row["multiple"] * window <= row["prompt_tokens"] <= row["multiple"] * window, (
                key,
                row,
            )
            if name == "baseline":
                assert row["delta"] == 1.0
        assert len(summary["losses"][name]) == 6
        written = json.loads((out / name / "checkpoints" / "vlm_config.json").read_text())
        assert written["language"]["rotary_base"] == summary["rotary_base"] == 5000.0
    v2pe = summary["models"]["v2pe"]
    # auto keeps every position inside the trained window, with a smaller δ for longer inputs
    assert all(row["last_position"] <= window for row in v2pe.values())
    deltas = [v2pe[key]["delta"] for key in MULTIPLES]
    assert deltas == sorted(deltas, reverse=True) and deltas[-1] < 1.0
    assert summary["models"]["baseline"]["8x"]["last_position"] > window
    assert (out / "accuracy_vs_length.png").stat().st_size > 0
    assert "baseline" in proc.stdout and "δ auto" in proc.stdout
    # a second run reuses the checkpoints and the data
    again = _run(installed_package, out, steps=6)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    assert again.stdout.count("reusing the checkpoint") == 2
    # other settings in the same directory are refused rather than mixed with the old runs
    other = _run(installed_package, out, 6, "--rotary-base", "500")
    assert other.returncode != 0 and "trained with other settings" in other.stderr, other.stderr[-3000:]
