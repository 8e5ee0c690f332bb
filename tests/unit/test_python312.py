"""tools/python312 finds a Python 3.12 the way a fresh host offers one (README's commands and CI use it)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "python312"


def _executable(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


def _fake_python(path: Path, version: str) -> None:
    """Answers the version probe as `version` would, and otherwise says who it is and what it got."""
    major, minor = version.split(".")[:2]
    _executable(path, f'case "$2" in *version_info*) [ "{major}.{minor}" = 3.12 ]; exit $?;; esac\n'
                      f'echo "{path} $*"')


def _run(bin_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(bin_dir)}
    return subprocess.run(["/bin/sh", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=30)


def _pyenv(tmp_path: Path, versions: list[str]) -> Path:
    """A pyenv whose python3.12 shim fails because no 3.12 is selected, as on a fresh pyenv host."""
    bin_dir, root = tmp_path / "bin", tmp_path / "pyenv"
    listing = "\\n".join(versions)
    _executable(bin_dir / "pyenv", f'case "$1" in versions) printf "{listing}\\n";; root) echo {root};; esac')
    _executable(bin_dir / "python3.12", 'echo "pyenv: python3.12: command not found" >&2; exit 127')
    for version in versions:
        _fake_python(root / "versions" / version / "bin" / "python3.12", version)
    return bin_dir


def test_python312_on_path_is_used_with_the_arguments(tmp_path):
    _fake_python(tmp_path / "bin" / "python3.12", "3.12.4")
    result = _run(tmp_path / "bin", "-m", "venv", ".venv")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{tmp_path / 'bin' / 'python3.12'} -m venv .venv"


def test_pyenv_newest_312_when_the_shim_does_not_run(tmp_path):
    bin_dir = _pyenv(tmp_path, ["3.11.7", "3.12.1", "3.12.10", "3.12.9", "3.13.0"])
    result = _run(bin_dir, "-V")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{tmp_path / 'pyenv' / 'versions' / '3.12.10' / 'bin' / 'python3.12'} -V"


def test_no_312_anywhere_is_one_line_and_exit_1(tmp_path):
    bin_dir = _pyenv(tmp_path, ["3.11.7", "3.13.0"])
    if any(Path(p).exists() for p in ("/usr/local/bin/python3.12", "/usr/bin/python3.12")):
        pytest.skip("this host has a system Python 3.12, which the script rightly finds")
    result = _run(bin_dir, "-V")
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("no Python 3.12 found") and "pyenv install 3.12" in lines[0]
