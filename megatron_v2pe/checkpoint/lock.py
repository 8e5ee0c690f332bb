"""``train.lock``: the one run that writes into a ``checkpoint.save`` directory."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from megatron_v2pe.checkpoint.errors import CheckpointError
from megatron_v2pe.checkpoint.log import logger

LOCK = "train.lock"


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
