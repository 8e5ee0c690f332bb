"""A small synthetic dataset with its tokenizer, and a way to run the trainer in its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_v2pe.training.demo import synthesise

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO_ROOT / "examples" / "configs" / "tiny_cpu.yaml"


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> tuple[list[Path], Path]:
    """(manifests, tokenizer) of a few short samples per family, 56-px images (the tiny tile)."""
    return synthesise(tmp_path_factory.mktemp("synth"), samples=12, context_tokens=(192, 320))


def tiny_overrides(synth_data, **extra) -> list[str]:
    """Overrides of tiny_cpu.yaml for short test runs: small packs, a fixed padding multiple (so that
    packs are the same under every layout up to CP=2 x TP=2), no progress bar."""
    manifests, tokenizer = synth_data
    values = {
        "data.datasets": "[" + ",".join(f"{{shards: '{m}'}}" for m in manifests) + "]",
        "data.tokenizer": str(tokenizer),
        "data.max_seq_len": 512,
        "data.max_tiles": 24,
        "data.pad_multiple": 8,
        "data.num_workers": 1,
        "logging.log_interval": 1,
        "logging.progress_bar": "false",
        **extra,
    }
    return [f"{key}={value}" for key, value in values.items()]


def train_command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "megatron_v2pe.training.train", "--config", str(TINY_CONFIG), *overrides]


def start_training(overrides: list[str], log: Path, own_process_group: bool = False) -> subprocess.Popen:
    """The trainer in a subprocess; in a process group of its own (id = its pid) if asked, so that a
    signal can reach all its processes, as Slurm sends it."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    with open(log, "w") as out:
        return subprocess.Popen(
            train_command(overrides), cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=own_process_group,
        )


def finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"training did not finish in {timeout} s:\n{log.read_text()[-4000:]}") from None


def losses(metrics: Path) -> dict[int, float]:
    """Iteration -> loss, from the metrics file (JSON round-trips floats exactly)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {r["iteration"]: r["loss"] for r in records}
