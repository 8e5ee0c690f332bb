"""A save that fails for want of disk space, named as such (the writers report it in many forms)."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch.distributed.checkpoint.api import CheckpointException

from megatron_v2pe.checkpoint.errors import CheckpointSaveError

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
def explained_save_errors(path: Path) -> Iterator[None]:
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
