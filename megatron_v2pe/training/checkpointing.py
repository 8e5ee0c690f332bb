"""Checkpoints that resume exactly, survive a crash mid-save and never lose a complete checkpoint.

Layout under ``checkpoint.save`` (Megatron-LM's names)::

    latest_checkpointed_iteration.txt      the last complete checkpoint (replaced atomically)
    train.lock                             host, pid (and Slurm job) of the run that writes here
    vlm_config.json                        the architecture the checkpoints hold
    iter_0000200/                          Megatron-Core dist checkpoint (torch_dist): model chunks,
                                           optimizer (resharding across TP/PP/CP/DP), LR scheduler
        files.json                         every file of the checkpoint and its size (written last)
        train_state/layout.json            the parallel layout the states below belong to
        train_state/data_dp0000_of_0001.pt data-loader state of each data-parallel rank
        train_state/rng_rank00000.pt       RNG states of each rank
    iter_0000300.tmp/                      a save in progress (never read)

A checkpoint is written under ``.tmp``, listed in ``files.json``, renamed when every rank has finished,
and only then named in the marker: a process killed mid-save leaves the previous checkpoint as the
latest. A checkpoint is complete when every file ``files.json`` lists is there with its size; the
marker says which complete one to resume from, and when it is missing or names an incomplete one, the
newest complete directory is used (and said so). Start-up never deletes a checkpoint directory: with
the lock held (so that no other run can be writing), it removes ``.tmp`` saves, which only a dead run
can have left, and renames later directories that this run would overwrite to ``<name>.set-aside``.

The data-loader state follows the data-parallel rank, so it is restored whenever the data-parallel
size is unchanged; RNG states only when the whole layout is, else every rank is reseeded from (seed,
iteration).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.filesystem_async import get_write_results_queue
from megatron.core.optimizer.optimizer import param_group_identifier_keys
from torch.distributed.checkpoint.api import CheckpointException

from megatron_v2pe.convert.checks import config_differences
from megatron_v2pe.model.presets import VLMConfig
from megatron_v2pe.model.vlm import sharded_model_state
from megatron_v2pe.parallel.runtime import ignore_exit_signals
from megatron_v2pe.training.config import ConfigError

logger = logging.getLogger("megatron_v2pe.training")

LATEST = "latest_checkpointed_iteration.txt"
TMP_SUFFIX = ".tmp"
MANIFEST = "files.json"
LOCK = "train.lock"
SET_ASIDE = ".set-aside"
_ITERATION = re.compile(r"iter_(\d{7,})")
_TMP = re.compile(r"iter_\d{7,}\.tmp")
_LEGACY_FILES = ("metadata.json", ".metadata", "train_state/layout.json")  # saves from before files.json
_SCHEDULE_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")  # per-group values the LR scheduler sets


class CheckpointError(ConfigError):
    """A checkpoint directory that cannot be used as configured; the message says what to do."""


class CheckpointSaveError(RuntimeError):
    """A save that failed (the previous checkpoint stays the latest); the message names the path."""


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _say(level: int, message: str, *args: Any) -> None:
    if _rank0():
        logger.log(level, message, *args)


# --------------------------------------------------------------------------------------------------
# The directory: which checkpoints are complete, which one to resume from


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


def _iteration_dirs(root: Path) -> dict[int, Path]:
    """``iter_NNNNNNN`` directories by iteration; other names (``.tmp``, ``.bak`` …) are not checkpoints."""
    found = {}
    for path in root.iterdir() if root.is_dir() else ():
        match = _ITERATION.fullmatch(path.name)
        if match and path.is_dir():
            found[int(match[1])] = path
    return found


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
    dirs = _iteration_dirs(root)
    problems = {i: checkpoint_problem(path) for i, path in dirs.items()}
    complete = sorted(i for i, problem in problems.items() if problem is None)
    marked, marker_problem = _marker(root)
    if marked is not None and marked in complete:
        newer = [dirs[i].name for i in complete if i > marked]
        if newer and not quiet:
            _say(
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
        _say(
            logging.WARNING, "%s: resuming from %s, the newest complete checkpoint", marker_problem, point.path
        )
    return point


def latest_iteration(root: str | Path | None) -> int | None:
    """The iteration a resume from ``root`` starts after, or None if it holds no checkpoint."""
    point = find_checkpoint(root, quiet=True) if root is not None else None
    return point.iteration if point else None


def check_architecture(root: str | Path, model: VLMConfig) -> None:
    """Refuse to resume into another architecture (the ``vlm_config.json`` beside the checkpoints)."""
    from megatron_v2pe.convert.checkpoint import MODEL_CONFIG_FILE, config_from_dict  # (imports this module)

    saved = Path(root) / MODEL_CONFIG_FILE
    if not saved.is_file():
        return
    differences = config_differences(config_from_dict(json.loads(saved.read_text())), model)
    if differences:
        raise CheckpointError(
            f"the checkpoints in {root} hold another architecture than this config builds "
            f"({'; '.join(d.replace(' expected', ' configured') for d in differences)}): resume with the "
            "model settings they were trained with, or choose another checkpoint.save"
        )


# --------------------------------------------------------------------------------------------------
# Owning the save directory


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class SaveDirLock:
    """``train.lock`` in the save directory: one writing run at a time. A lock is stale when its run is
    provably gone: the same host and no such process, or an earlier run of the same Slurm job (a job is
    requeued only after all its processes ended)."""

    def __init__(self, root: Path):
        self.path = root / LOCK
        self.me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        self.held = False

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            self.held = True
            return

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            host, pid, job = holder["host"], int(holder["pid"]), holder.get("slurm_job_id")
        except FileNotFoundError:
            return  # released meanwhile
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(
                f"{self.path} is unreadable: another run may own this checkpoint.save; if none does, "
                "delete the file"
            ) from None
        same_job = job is not None and job == self.me["slurm_job_id"]
        if not (same_job or host == self.me["host"] and not _alive(pid)):
            raise CheckpointError(
                f"checkpoint.save {self.path.parent} is in use by another run (pid {pid} on {host}"
                + (f", Slurm job {job}" if job else "")
                + f", since {holder.get('since')}); stop it or choose another checkpoint.save "
                f"(if that run is gone, delete {self.path})"
            )
        logger.warning(
            "taking over the stale lock %s of pid %d on %s (no longer running)", self.path, pid, host
        )
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


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
    for iteration, path in sorted(_iteration_dirs(root).items()):
        if iteration > (resume_from or 0):
            problem = checkpoint_problem(path)
            why = f"incomplete: {problem}" if problem else "newer than the checkpoint resumed from"
            _set_aside(path, why)


# --------------------------------------------------------------------------------------------------
# Parallel layout, RNG


def _layout() -> dict[str, int]:
    return {
        "world_size": dist.get_world_size(),
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "context_parallel_size": ps.get_context_parallel_world_size(),
        "data_parallel_size": ps.get_data_parallel_world_size(),
    }


def _data_file(state_dir: Path, dp_rank: int, dp_size: int) -> Path:
    return state_dir / f"data_dp{dp_rank:04d}_of_{dp_size:04d}.pt"


def _rng_file(state_dir: Path, rank: int) -> Path:
    return state_dir / f"rng_rank{rank:05d}.pt"


def rng_states() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(states["tracker"])


def reseed(seed: int) -> None:
    """Every RNG this process uses, from one seed (model-parallel regions as Megatron derives them)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _first_of_data_parallel_rank() -> bool:
    """One writer per data-parallel rank: every TP/PP/CP rank of it holds the same data-loader state."""
    return (
        ps.get_tensor_model_parallel_rank() == 0
        and ps.get_pipeline_model_parallel_rank() == 0
        and ps.get_context_parallel_rank() == 0
    )


def _on_rank0(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 only; its result, or its CheckpointError, on every rank."""
    result: list[Any] = [None, None]
    if dist.get_rank() == 0:
        try:
            result[0] = fn()
        except CheckpointError as err:
            result[1] = str(err)
    dist.broadcast_object_list(result, src=0)
    if result[1] is not None:
        raise CheckpointError(result[1])
    return result[0]


_writers_ignore_signals = False


def _writers_ignore_exit_signals() -> None:
    """Slurm signals every process of a step: the async writer (forked per save) and the queue server
    it reports through (started here, by fork, instead of spawned at the first save) must leave it to
    the training process, which finishes the step and saves."""
    global _writers_ignore_signals
    if not _writers_ignore_signals:
        os.register_at_fork(after_in_child=ignore_exit_signals)
        _writers_ignore_signals = True
    get_write_results_queue("fork")


# --------------------------------------------------------------------------------------------------
# Saving and loading


class Checkpointer:
    """Saves and loads the full training state; one per run (it owns the save directory's lock and the
    async-save queue). Call ``close`` at the end."""

    def __init__(
        self,
        save_dir: str | None,
        *,
        keep_last: int | None = None,
        async_save: bool = False,
        optimizer_sharding: str = "fully_reshardable",
    ):
        self.save_dir = Path(save_dir) if save_dir else None
        self.keep_last = keep_last
        self.metadata = {"distrib_optim_sharding_type": optimizer_sharding}
        self.lock = SaveDirLock(self.save_dir) if self.save_dir is not None else None
        if self.lock is not None:
            _on_rank0(self._take_save_dir)
        if async_save:
            _writers_ignore_exit_signals()
        self.async_queue = AsyncCallsQueue() if async_save else None

    def _take_save_dir(self) -> None:
        self.save_dir.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()

    def close(self) -> None:
        """Commit what is still being written, then give the save directory free."""
        try:
            self.finalize(blocking=True)
        finally:
            if self.lock is not None:
                self.lock.release()

    def find(self, root: str | None, model: VLMConfig) -> ResumePoint | None:
        """The checkpoint this run resumes from (checked against the model to be built), with the save
        directory cleared of whatever this run would overwrite; before any model exists."""

        def on_rank0() -> ResumePoint | None:
            point = find_checkpoint(root) if root else None
            if point is not None:
                check_architecture(root, model)
            if self.save_dir is not None:
                tidy_save_dir(self.save_dir, point.iteration if point else None)
            return point

        return _on_rank0(on_rank0)

    # -- saving ----------------------------------------------------------------------------------

    def save(
        self,
        iteration: int,
        model_chunks: list,
        optimizer,
        scheduler,
        data_state: dict[str, Any],
        common: dict[str, Any],
    ) -> None:
        """Write the checkpoint of ``iteration`` (collective). With async save, the tensors are written
        in the background and the checkpoint becomes the latest once ``finalize`` sees it done."""
        assert self.save_dir is not None
        final = iteration_dir(self.save_dir, iteration)
        tmp = final.with_name(final.name + TMP_SUFFIX)
        with _explained_save_errors(tmp):
            if dist.get_rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            dist.barrier()
            model_state = sharded_model_state(model_chunks)
            state = {
                **model_state,
                "optimizer": optimizer.sharded_state_dict(model_state, metadata=self.metadata),
                "opt_param_scheduler": scheduler.state_dict(),
                "iteration": iteration,
                **common,
            }
            request = dist_checkpointing.save(
                state, str(tmp), async_sharded_save=self.async_queue is not None, async_strategy="mcore"
            )  # Megatron-Core's own writer (the default, "nvrx", needs nvidia-resiliency-ext)
            self._save_train_state(tmp / "train_state", data_state)
        commit = _committer(self.save_dir, tmp, final, iteration, self.keep_last)
        if self.async_queue is None:
            dist.barrier()
            commit()
            dist.barrier()
        else:
            request.add_finalize_fn(commit)
            self.async_queue.schedule_async_request(request)

    def finalize(self, blocking: bool = False) -> None:
        """Commit the async saves that have finished (collective; call once per step and at the end)."""
        if self.async_queue is not None:
            with _explained_save_errors(self.save_dir or Path.cwd()):
                self.async_queue.maybe_finalize_async_calls(blocking=blocking)

    def _save_train_state(self, state_dir: Path, data_state: dict[str, Any]) -> None:
        state_dir.mkdir(exist_ok=True)
        if dist.get_rank() == 0:
            (state_dir / "layout.json").write_text(json.dumps(_layout()))
        torch.save(rng_states(), _rng_file(state_dir, dist.get_rank()))
        if _first_of_data_parallel_rank():
            torch.save(
                data_state,
                _data_file(state_dir, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()),
            )

    # -- loading ---------------------------------------------------------------------------------

    def data_state(self, point: ResumePoint) -> dict[str, Any] | None:
        """This data-parallel rank's data-loader state; None if the data-parallel size changed (the data
        stream restarts)."""
        saved = json.loads((point.path / "train_state" / "layout.json").read_text())
        if saved["data_parallel_size"] != ps.get_data_parallel_world_size():
            _say(logging.WARNING, "data-parallel size changed: the data stream restarts from the beginning")
            return None
        state_dir, dp_size = point.path / "train_state", saved["data_parallel_size"]
        return torch.load(_data_file(state_dir, ps.get_data_parallel_rank(), dp_size), weights_only=False)

    def load(self, point: ResumePoint, model_chunks: list, optimizer, scheduler, seed: int) -> None:
        """Model, optimizer, LR schedule and RNG states of ``point``."""
        model_state = sharded_model_state(model_chunks)
        state = {
            **model_state,
            "optimizer": optimizer.sharded_state_dict(model_state, is_loading=True, metadata=self.metadata),
        }
        try:
            loaded = dist_checkpointing.load(state, str(point.path))
        except (Exception, CheckpointException) as err:  # torch's and Megatron's readers raise many kinds
            raise CheckpointError(f"cannot read checkpoint {point.path}: {_first_line(err)}") from err
        if loaded["iteration"] != point.iteration:
            raise CheckpointError(
                f"{point.path} holds iteration {loaded['iteration']}, its name says {point.iteration}"
            )
        for i, chunk in enumerate(model_chunks):
            chunk.load_state_dict(loaded[f"model{i}"])
        _announce_schedule(scheduler, loaded["opt_param_scheduler"])
        saved_groups = _saved_param_groups(loaded["optimizer"])
        _align_param_groups(saved_groups, optimizer.param_groups, scheduler.override_opt_param_scheduler)
        with torch.no_grad():  # the optimizer copies into shards of (fp32) parameters in place
            optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
        self._restore_rng(point.path / "train_state", seed, point.iteration)
        _say(logging.INFO, "resumed from %s", point.path)

    def _restore_rng(self, state_dir: Path, seed: int, iteration: int) -> None:
        saved = json.loads((state_dir / "layout.json").read_text())
        current = _layout()
        if saved == current:
            set_rng_states(torch.load(_rng_file(state_dir, dist.get_rank()), weights_only=False))
        else:
            _say(
                logging.WARNING, "checkpoint layout %s differs from this run's %s: RNG states reseeded",
                saved, current,
            )
            reseed(seed + iteration)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else "") or type(err).__name__


def _announce_schedule(scheduler, saved: dict[str, Any]) -> None:
    """Say which LR / weight-decay schedule the resumed run follows when config and checkpoint differ."""
    configured = scheduler.state_dict()
    differ = [k for k in configured if k != "num_steps" and k in saved and configured[k] != saved[k]]
    if not differ:
        return
    both = ", ".join(f"{k} {saved[k]} (config: {configured[k]})" for k in differ)
    if scheduler.override_opt_param_scheduler:
        _say(logging.INFO, "LR schedule from the config (checkpoint.override_opt_param_scheduler), not "
             "the checkpoint's: %s; it continues at step %d", both, saved["num_steps"])
    else:
        _say(logging.WARNING, "LR schedule from the checkpoint, not the config: %s; set "
             "checkpoint.override_opt_param_scheduler=true to follow the config's", both)


def _saved_param_groups(optimizer_state: dict[str, Any]) -> list[dict[str, Any]]:
    """The parameter groups of a loaded (possibly chained) optimizer state."""
    states = optimizer_state if isinstance(optimizer_state, list) else [optimizer_state]
    return [g for s in states for g in s.get("optimizer", {}).get("param_groups", [])]


def _align_param_groups(saved: list[dict], current: list[dict], use_current: bool) -> None:
    """Megatron pairs saved and current parameter groups by their settings, the LR schedule's values
    among them (so a new optimizer.lr finds no group). Pair them by the rest, and give both the
    schedule values of the side that is used."""

    def identity(group: dict) -> tuple:
        return tuple(group.get(k) for k in param_group_identifier_keys if k not in _SCHEDULE_KEYS)

    by_identity = {identity(g): g for g in current}
    for group in saved:
        match = by_identity.get(identity(group))
        if match is not None:
            source, target = (match, group) if use_current else (group, match)
            target.update({k: source[k] for k in _SCHEDULE_KEYS if k in source})


_NEARLY_FULL = 16 << 20  # bytes free after a failed write: the write filled the device


def _is_no_space(err: BaseException, path: Path) -> bool:
    """Whether a failed save ran out of space. Megatron's writer reports an OSError of its worker
    threads as a bare 'Worker failure ... <class RuntimeError>', so a device left (nearly) full by the
    failed write counts too."""
    cause: BaseException | None = err
    for _ in range(20):
        if cause is None:
            break
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        cause = cause.__cause__ or cause.__context__
    existing = next(p for p in (path, *path.parents) if p.exists())
    return shutil.disk_usage(existing).free < _NEARLY_FULL


@contextmanager
def _explained_save_errors(path: Path) -> Iterator[None]:
    """A full disk, named as such."""
    try:
        yield
    except (Exception, CheckpointException) as err:  # torch's CheckpointException is a BaseException
        if not _is_no_space(err, path):
            raise
        raise CheckpointSaveError(
            f"no space left on the device of {path} while saving a checkpoint: free space there or set "
            "checkpoint.save to another file system (the previous checkpoint is still the latest; the "
            "half-written save is removed on the next start)"
        ) from err


def _write_manifest(directory: Path) -> None:
    """``files.json``: every file of the checkpoint and its size, written last (fsynced)."""
    files = {
        str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()
    }
    with open(directory / MANIFEST, "w") as f:
        json.dump({"files": files}, f, indent=0)
        f.flush()
        os.fsync(f.fileno())


def _committer(
    root: Path, tmp: Path, final: Path, iteration: int, keep_last: int | None
) -> Callable[[], None]:
    """Rank 0's last steps of a save: list its files, rename the directory, point the marker at it."""

    def commit() -> None:
        if dist.get_rank() != 0:
            return
        with _explained_save_errors(tmp):
            _write_manifest(tmp)
            os.replace(tmp, final)
            marker = root / (LATEST + TMP_SUFFIX)
            with open(marker, "w") as f:
                f.write(str(iteration))
                f.flush()
                os.fsync(f.fileno())
            os.replace(marker, root / LATEST)
        logger.info("saved checkpoint %s", final)
        if keep_last is not None:
            complete = sorted(i for i, p in _iteration_dirs(root).items() if checkpoint_problem(p) is None)
            for old in complete[:-keep_last]:
                shutil.rmtree(iteration_dir(root, old))

    return commit


def load_model_weights(path: str, model_chunks: list, optimizer) -> None:
    """Model weights only, fresh optimizer state: a converted Hugging Face model, or a checkpoint
    directory (its latest iteration) to fine-tune from."""
    point = find_checkpoint(path)
    source = point.path if point is not None else Path(path)
    loaded = dist_checkpointing.load(sharded_model_state(model_chunks), str(source))
    for i, chunk in enumerate(model_chunks):
        chunk.load_state_dict(loaded[f"model{i}"])
    optimizer.reload_model_params()  # the fp32 main copies of bf16 parameters
    logger.info("loaded model weights from %s", source)
