"""What checkpointing tells the user, said once per launch (by rank 0)."""

from __future__ import annotations

import logging
from typing import Any

import torch.distributed as dist

logger = logging.getLogger("megatron_v2pe.checkpoint")


def say(level: int, message: str, *args: Any) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.log(level, message, *args)
