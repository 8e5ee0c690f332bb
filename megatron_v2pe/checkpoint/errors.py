"""What goes wrong with checkpoints: the user's to fix (``CheckpointError``), or a failed save."""

from __future__ import annotations

from pathlib import Path

from megatron_v2pe.errors import UsageError


class CheckpointError(UsageError):
    """A checkpoint directory that cannot be used as asked; the message says what to do."""


class UnloadableCheckpoint(CheckpointError):
    """``path`` holds no model this process can load; ``problem`` says why (callers that report
    problems in their own words, like conversion, take it as is)."""

    def __init__(self, path: str | Path, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"cannot load {path}: {problem}")


class CheckpointSaveError(RuntimeError):
    """A save that failed (the previous checkpoint stays the latest); the message names the path."""
