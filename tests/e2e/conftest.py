"""The demos run from a non-editable install, outside the checkout, as after ``pip install .``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.parallel.launch import REPO_ROOT


@pytest.fixture(scope="session")
def installed_package(tmp_path_factory) -> dict:
    """The package built and installed (without its dependencies, which this environment has) into a
    directory of its own; returns the environment and working directory to run it with."""
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-compile",
         "--target", str(target), str(REPO_ROOT)],
        env={**os.environ, "TMPDIR": str(build)}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    cwd = tmp_path_factory.mktemp("elsewhere")  # not the checkout: nothing may be found through it
    where = subprocess.run([sys.executable, "-c", "import megatron_v2pe; print(megatron_v2pe.__file__)"],
                           env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert Path(where.stdout.strip()).parent == target / "megatron_v2pe", where.stdout + where.stderr
    assert (target / "megatron_v2pe" / "configs" / "tiny_cpu.yaml").is_file()
    return {"env": env, "cwd": cwd}
