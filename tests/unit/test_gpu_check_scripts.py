"""The prepared GPU check scripts: shellcheck clean, and clear refusals before any work.

Their full dry runs (`--dry-run`: every step on tiny CPU shapes) take minutes and are run by hand."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "benchmarks" / "gpu").glob("*.sh"))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_shellcheck():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    assert {p.name for p in SCRIPTS} >= {"check.sh", "check_te.sh", "check_throughput.sh", "lib.sh"}
    result = subprocess.run([shellcheck, "-x", *map(str, SCRIPTS)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", ["check_te.sh", "check_throughput.sh"])
def test_unknown_argument_prints_the_usage(script):
    result = _run(f"benchmarks/gpu/{script}", "--frobnicate")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"unknown argument '--frobnicate'; usage: bash benchmarks/gpu/{script} "
                                     + ("[--bundle DIR] " if script == "check_te.sh" else "")
                                     + "[--wheels DIR] [--dry-run]")


def test_throughput_check_takes_no_bundle():
    result = _run("benchmarks/gpu/check_throughput.sh", "--bundle", "/tmp")
    assert result.returncode == 2 and "unknown argument '--bundle'" in result.stderr


def test_missing_bundle_is_refused_before_any_work(tmp_path):
    result = _run("benchmarks/gpu/check_te.sh", "--bundle", str(tmp_path), "--dry-run")
    assert result.returncode == 1
    assert result.stderr.strip() == (f"no install_te.sh in the Transformer Engine bundle '{tmp_path}'; "
                                     "pass --bundle DIR, the folder of the offline Transformer Engine build")


def test_corrupt_bundle_is_refused(tmp_path):
    for name in ("install_te.sh", "te_smoke.py"):
        (tmp_path / name).write_text("true\n")
    (tmp_path / "SHA256SUMS").write_text("0" * 64 + "  install_te.sh\n")
    result = _run("benchmarks/gpu/check_te.sh", "--bundle", str(tmp_path), "--dry-run")
    assert result.returncode == 1 and "does not match its SHA256SUMS" in result.stderr
