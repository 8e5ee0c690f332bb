"""The whole training state in one checkpoint: model chunks, optimizer (resharding across
TP/PP/CP/DP) and LR scheduler through Megatron-Core's dist checkpointing, plus per-rank files::

    iter_0000200/train_state/layout.json            the parallel layout the states below belong to
    iter_0000200/train_state/data_dp0000_of_0001.pt data-loader state of each data-parallel rank
    iter_0000200/train_state/rng_rank00000.pt       RNG states of each rank

The data-loader state follows the data-parallel rank, so it is restored whenever the data-parallel
size is unchanged; RNG states only when the whole layout is, else every rank is reseeded from (seed,
iteration).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.filesystem_async import get_write_results_queue
from torch.distributed.checkpoint.api import CheckpointException

from megatron_v2pe.checkpoint.errors import CheckpointError
from megatron_v2pe.checkpoint.layout import (
    TMP_SUFFIX,
    ResumePoint,
    complete_iterations,
    find_checkpoint,
    iteration_dir,
    tidy_save_dir,
    write_manifest,
    write_marker,
)
from megatron_v2pe.checkpoint.lock import SaveDirLock
from megatron_v2pe.checkpoint.log import logger, say
from megatron_v2pe.checkpoint.model_config import check_architecture
from megatron_v2pe.checkpoint.model_only import sharded_model_state
from megatron_v2pe.checkpoint.optimizer_state import align_param_groups, announce_schedule, saved_param_groups
from megatron_v2pe.checkpoint.rng import reseed, rng_states, set_rng_states
from megatron_v2pe.checkpoint.save_errors import explained_save_errors
from megatron_v2pe.model.presets import VLMConfig
from megatron_v2pe.parallel.runtime import ignore_exit_signals

TRAIN_STATE_DIR = "train_state"


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
        with explained_save_errors(tmp):
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
            self._save_train_state(tmp / TRAIN_STATE_DIR, data_state)
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
            with explained_save_errors(self.save_dir or Path.cwd()):
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
        state_dir = point.path / TRAIN_STATE_DIR
        saved = json.loads((state_dir / "layout.json").read_text())
        if saved["data_parallel_size"] != ps.get_data_parallel_world_size():
            say(logging.WARNING, "data-parallel size changed: the data stream restarts from the beginning")
            return None
        dp_size = saved["data_parallel_size"]
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
        announce_schedule(scheduler, loaded["opt_param_scheduler"])
        saved_groups = saved_param_groups(loaded["optimizer"])
        align_param_groups(saved_groups, optimizer.param_groups, scheduler.override_opt_param_scheduler)
        with torch.no_grad():  # the optimizer copies into shards of (fp32) parameters in place
            optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
        self._restore_rng(point.path / TRAIN_STATE_DIR, seed, point.iteration)
        say(logging.INFO, "resumed from %s", point.path)

    def _restore_rng(self, state_dir: Path, seed: int, iteration: int) -> None:
        saved = json.loads((state_dir / "layout.json").read_text())
        current = _layout()
        if saved == current:
            set_rng_states(torch.load(_rng_file(state_dir, dist.get_rank()), weights_only=False))
        else:
            say(
                logging.WARNING, "checkpoint layout %s differs from this run's %s: RNG states reseeded",
                saved, current,
            )
            reseed(seed + iteration)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else "") or type(err).__name__


def _committer(
    root: Path, tmp: Path, final: Path, iteration: int, keep_last: int | None
) -> Callable[[], None]:
    """Rank 0's last steps of a save: list its files, rename the directory, point the marker at it."""

    def commit() -> None:
        if dist.get_rank() != 0:
            return
        with explained_save_errors(tmp):
            write_manifest(tmp)
            os.replace(tmp, final)
            write_marker(root, iteration)
        logger.info("saved checkpoint %s", final)
        if keep_last is not None:
            for old in complete_iterations(root)[:-keep_last]:
                shutil.rmtree(iteration_dir(root, old))

    return commit
