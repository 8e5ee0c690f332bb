"""The directories of a training run's ``checkpoint.save``: their names, when a checkpoint is complete,
which one is resumed from or loaded, and making room for a run that starts.

A checkpoint is written under ``.tmp``, listed in ``files.json``, renamed when every rank has finished,
and only then named in the marker: a process killed mid-save leaves the previous checkpoint as the
latest. A checkpoint is complete when every file ``files.json`` lists is there with its size; the
marker says which complete one to resume from, and when it is missing or names an incomplete one, the
newest complete directory is used (and said so). Start-up never deletes a checkpoint directory: with
the lock held (so that no other run can be writing), it removes ``.tmp`` saves, which only a dead run
can have left, and renames later directories that this run would overwrite to ``<name>.set-aside``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from megatron_v2pe.checkpoint.errors import CheckpointError
from megatron_v2pe.checkpoint.log import logger, say

LATEST = "latest_checkpointed_iteration.txt"
TMP_SUFFIX = ".tmp"
MANIFEST = "files.json"
SET_ASIDE = ".set-aside"
_ITERATION = re.compile(r"iter_(\d{7,})")
_TMP = re.compile(r"iter_\d{7,}\.tmp")
_LEGACY_FILES = ("metadata.json", ".metadata", "train_state/layout.json")  # saves from before files.json


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint directory ``path`` cannot be resumed from, or None if it is complete."""
    listed = path / MANIFEST
    if not listed.is_file():
        missing = [name for name in _LEGACY_FILES if not (path / name).is_file()]
        return f"{path / missing[0]} is missing" if missing else None
    try:
        files = json.loads(listed.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{listed} is unreadable"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != size:
            return f"{file} has {file.stat().st_size} bytes, {size} were written (truncated?)"
    return None


def iteration_dirs(root: Path) -> dict[int, Path]:
    """``iter_NNNNNNN`` directories by iteration; other names (``.tmp``, ``.bak`` …) are not checkpoints."""
    found = {}
    for path in root.iterdir() if root.is_dir() else ():
        match = _ITERATION.fullmatch(path.name)
        if match and path.is_dir():
            found[int(match[1])] = path
    return found


def complete_iterations(root: Path) -> list[int]:
    """The iterations of the complete checkpoints under ``root``, oldest first."""
    return sorted(i for i, path in iteration_dirs(root).items() if checkpoint_problem(path) is None)


# --------------------------------------------------------------------------------------------------
# Writing: the manifest, then the marker


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_manifest(directory: Path) -> None:
    """``files.json``: every file of the checkpoint and its size, written last (fsynced)."""
    files = {
        str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()
    }
    _write_synced(directory / MANIFEST, json.dumps({"files": files}, indent=0))


def write_marker(root: Path, iteration: int) -> None:
    """Name ``iteration`` the latest checkpoint of ``root``, atomically."""
    marker = root / (LATEST + TMP_SUFFIX)
    _write_synced(marker, str(iteration))
    os.replace(marker, root / LATEST)


# --------------------------------------------------------------------------------------------------
# Reading: which checkpoint to resume from


def _marker(root: Path) -> tuple[int | None, str]:
    """The marker's iteration (None if absent or unreadable) and what is wrong with it."""
    path = root / LATEST
    if not path.is_file():
        return None, f"{path} is missing"
    text = path.read_text().strip()
    return (int(text), "") if text.isdigit() else (None, f"{path} holds {text!r}, not an iteration")


@dataclass(frozen=True)
class ResumePoint:
    iteration: int
    path: Path


def find_checkpoint(root: str | Path, quiet: bool = False) -> ResumePoint | None:
    """The checkpoint to resume from under ``root``: the marker's if it is complete, else the newest
    complete one (with a warning saying why); None if ``root`` holds no checkpoint at all."""
    root = Path(root)
    dirs = iteration_dirs(root)
    problems = {i: checkpoint_problem(path) for i, path in dirs.items()}
    complete = sorted(i for i, problem in problems.items() if problem is None)
    marked, marker_problem = _marker(root)
    if marked is not None and marked in complete:
        newer = [dirs[i].name for i in complete if i > marked]
        if newer and not quiet:
            say(
                logging.WARNING,
                "%s names iteration %d; the newer complete checkpoint(s) %s are not resumed from (delete "
                "the marker to resume from the newest)",
                root / LATEST, marked, ", ".join(newer),
            )
        return ResumePoint(marked, dirs[marked])
    if marked is not None:
        marker_problem = (
            f"{dirs[marked]}: {problems[marked]}" if marked in dirs
            else f"{root / LATEST} names iteration {marked}, which has no directory"
        )
    if not complete:
        if marked is None and not dirs:
            return None
        found = [p for i, p in sorted(problems.items()) if i != marked]
        raise CheckpointError(
            f"no complete checkpoint to resume from in {root}: "
            + "; ".join([marker_problem] * (marked is not None) + found)
            + "; restore what is missing, or move the directory away to start from scratch"
        )
    point = ResumePoint(complete[-1], dirs[complete[-1]])
    if not quiet:
        say(
            logging.WARNING,
            "%s: resuming from %s, the newest complete checkpoint",
            marker_problem,
            point.path,
        )
    return point


def latest_iteration(root: str | Path | None) -> int | None:
    """The iteration a resume from ``root`` starts after, or None if it holds no checkpoint."""
    point = find_checkpoint(root, quiet=True) if root is not None else None
    return point.iteration if point else None


def resolve_checkpoint(path: str | Path, quiet: bool = True) -> Path:
    """The directory holding the weights: ``path`` itself (a model-only checkpoint), or, for a training
    run's ``checkpoint.save``, the checkpoint a resume would start from."""
    point = find_checkpoint(path, quiet=quiet)
    return Path(path) if point is None else point.path


# --------------------------------------------------------------------------------------------------
# Making room for a run that starts


def _set_aside(path: Path, why: str) -> None:
    """Rename a checkpoint directory out of this run's way, never deleting it."""
    target = path.with_name(path.name + SET_ASIDE)
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{SET_ASIDE}{n}")
    os.replace(path, target)
    logger.warning("moved %s to %s (%s); it is not deleted", path, target, why)


def tidy_save_dir(root: Path, resume_from: int | None) -> None:
    """Rank 0, lock held: remove the saves a dead run left half-written, and move away every checkpoint
    directory after ``resume_from`` (this run would write those iterations again)."""
    for path in root.iterdir():
        if _TMP.fullmatch(path.name) or path.name == LATEST + TMP_SUFFIX:
            logger.warning("removing %s, a save abandoned by an earlier run", path)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for iteration, path in sorted(iteration_dirs(root).items()):
        if iteration > (resume_from or 0):
            problem = checkpoint_problem(path)
            why = f"incomplete: {problem}" if problem else "newer than the checkpoint resumed from"
            _set_aside(path, why)
