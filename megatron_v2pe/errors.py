"""User errors: a mistake in what was asked for (a configuration, a path, an argument), not a fault.

Validators raise ``UsageError`` with a message that says what is wrong and what to change; every command
line entry point runs through ``run_command``, which prints that message as one line on rank 0 (the other
ranks of a launch have the same message: they exit quietly) and exits with code 2, argparse's code for a
bad command line. Anything else is a fault and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable

USAGE_EXIT_CODE = 2


class UsageError(ValueError):
    """Something the user asked for cannot run; the message says what to change."""


class OutputExists(UsageError, FileExistsError):
    """An output path that is already there: outputs are never overwritten."""


def is_lead_rank() -> bool:
    """Rank 0 of a torchrun launch, or a lone process (read from the environment: no process group)."""
    return int(os.environ.get("RANK", "0")) == 0


def run_command(prog: str, command: Callable[[], int]) -> int:
    """``command()``'s exit code, or 2 after printing its UsageError as ``prog: error: message``."""
    try:
        return command()
    except UsageError as err:
        if is_lead_rank():
            print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        return USAGE_EXIT_CODE


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse reports anything else, with exit code 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def check_paths_exist(args: argparse.Namespace, flags: Iterable[str]) -> None:
    """Every input path given for ``flags`` (argparse destinations) exists, or a UsageError naming it."""
    for flag in flags:
        path = getattr(args, flag, None)
        if path is not None and not os.path.exists(path):
            raise UsageError(f"--{flag.replace('_', '-')} {path} does not exist; check the path")
