"""The parallel layout: the ``parallel:`` section of the training YAML, and its one world-size rule."""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_v2pe.errors import UsageError


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True

    @property
    def model_parallel_sizes(self) -> tuple[int, int, int]:
        """(TP, PP, CP): the ranks one model replica spans are their product."""
        return self.tensor_model_parallel_size, self.pipeline_model_parallel_size, self.context_parallel_size

    @property
    def model_parallel_size(self) -> int:
        return math.prod(self.model_parallel_sizes)

    def check_world_size(self, world_size: int) -> None:
        """Raise UsageError unless ``world_size`` processes hold whole model replicas."""
        if world_size % self.model_parallel_size:
            tp, pp, cp = self.model_parallel_sizes
            n = self.model_parallel_size
            raise UsageError(
                f"world size {world_size} is not divisible by tensor_model_parallel_size x "
                f"pipeline_model_parallel_size x context_parallel_size = {tp} x {pp} x {cp} = {n}; change "
                f"the parallel sizes or launch a multiple of {n} processes"
            )
