"""Checkpoints that resume exactly and survive a crash mid-save.

Layout under ``checkpoint.save`` (Megatron-LM's names)::

    latest_checkpointed_iteration.txt      the last complete checkpoint (replaced atomically)
    iter_0000200/                          Megatron-Core dist checkpoint (torch_dist): model chunks,
                                           optimizer (resharding across TP/PP/CP/DP), LR scheduler
        train_state/layout.json            the parallel layout the states below belong to
        train_state/data_dp0000_of_0001.pt data-loader state of each data-parallel rank
        train_state/rng_rank00000.pt       RNG states of each rank
    iter_0000300.tmp/                      a save in progress (never read; removed on the next start)

A checkpoint is written under ``.tmp``, renamed when every rank has finished, and only then named in
the marker: a process killed mid-save leaves the previous checkpoint as the latest. The data-loader
state follows the data-parallel rank, so it is restored whenever the data-parallel size is unchanged;
RNG states only when the whole layout is, else every rank is reseeded from (seed, iteration).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

from megatron_v2pe.model.vlm import sharded_model_state

logger = logging.getLogger("megatron_v2pe.training")

LATEST = "latest_checkpointed_iteration.txt"
TMP_SUFFIX = ".tmp"


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | Path | None) -> int | None:
    """The iteration of the last complete checkpoint under ``root``, or None."""
    if root is None or not (Path(root) / LATEST).is_file():
        return None
    text = (Path(root) / LATEST).read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{Path(root) / LATEST} holds {text!r}, not an iteration number")
    return int(text)


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



@dataclass
class Resumed:
    iteration: int
    data_state: dict[str, Any] | None  # None: the data-parallel size changed, the data stream restarts


class Checkpointer:
    """Saves and loads the full training state; one per run (it owns the async-save queue)."""

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
        self.async_queue = AsyncCallsQueue() if async_save else None
        if self.save_dir is not None and dist.get_rank() == 0:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            _remove_incomplete(self.save_dir)
        dist.barrier()

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
        request = dist_checkpointing.save(state, str(tmp), async_sharded_save=self.async_queue is not None)
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

    def load(self, root: str, model_chunks: list, optimizer, scheduler, seed: int) -> Resumed | None:
        """Restore everything from the latest checkpoint under ``root``; None if there is none."""
        iteration = latest_iteration(root)
        if iteration is None:
            return None
        path = iteration_dir(root, iteration)
        model_state = sharded_model_state(model_chunks)
        state = {
            **model_state,
            "optimizer": optimizer.sharded_state_dict(model_state, is_loading=True, metadata=self.metadata),
        }
        loaded = dist_checkpointing.load(state, str(path))
        for i, chunk in enumerate(model_chunks):
            chunk.load_state_dict(loaded[f"model{i}"])
        with torch.no_grad():  # the optimizer copies into shards of (fp32) parameters in place
            optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
        if loaded["iteration"] != iteration:
            raise ValueError(f"{path} holds iteration {loaded['iteration']}, the marker says {iteration}")
        data_state = self._load_train_state(path / "train_state", seed, iteration)
        logger.info("resumed from %s", path)
        return Resumed(iteration, data_state)

    def _load_train_state(self, state_dir: Path, seed: int, iteration: int) -> dict[str, Any] | None:
        saved = json.loads((state_dir / "layout.json").read_text())
        current = _layout()
        if saved == current:
            set_rng_states(torch.load(_rng_file(state_dir, dist.get_rank()), weights_only=False))
        else:
            logger.warning(
                "checkpoint layout %s differs from this run's %s: RNG states reseeded", saved, current
            )
            reseed(seed + iteration)
        if saved["data_parallel_size"] != current["data_parallel_size"]:
            logger.warning("data-parallel size changed: the data stream restarts from the beginning")
            return None
        dp_file = _data_file(state_dir, ps.get_data_parallel_rank(), current["data_parallel_size"])
        return torch.load(dp_file, weights_only=False)


def load_model_weights(path: str, model_chunks: list, optimizer) -> None:
    """Model weights only, fresh optimizer state: a converted Hugging Face model, or a checkpoint
    directory (its latest iteration) to fine-tune from."""
    iteration = latest_iteration(path)
    source = iteration_dir(path, iteration) if iteration is not None else Path(path)
    loaded = dist_checkpointing.load(sharded_model_state(model_chunks), str(source))
    for i, chunk in enumerate(model_chunks):
        chunk.load_state_dict(loaded[f"model{i}"])
    optimizer.reload_model_params()  # the fp32 main copies of bf16 parameters
    logger.info("loaded model weights from %s", source)


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


def _remove_incomplete(root: Path) -> None:
    """Saves that never reached the marker: in progress (.tmp) or renamed but not yet named latest."""
    latest = latest_iteration(root) or 0
    for path in root.glob("iter_*"):
        if path.name.endswith(TMP_SUFFIX) or int(path.name.removeprefix("iter_")) > latest:
            logger.warning("removing %s, a save that did not complete", path)
            shutil.rmtree(path)


def _committer(
    root: Path, tmp: Path, final: Path, iteration: int, keep_last: int | None
) -> Callable[[], None]:
    """Rank 0's last steps of a save: rename the finished directory, then point the marker at it."""

    def commit() -> None:
        if dist.get_rank() != 0:
            return
        os.replace(tmp, final)
        marker = root / (LATEST + TMP_SUFFIX)
        with open(marker, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(marker, root / LATEST)
        logger.info("saved checkpoint %s", final)
        if keep_last is not None:
            done = sorted(p for p in root.glob("iter_*") if not p.name.endswith(TMP_SUFFIX))
            for old in done[:-keep_last]:
                shutil.rmtree(old)

    return commit
