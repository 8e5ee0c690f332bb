"""Parallel runtime: process groups, attention backends, context-parallel sharding."""

from megatron_v2pe.parallel.runtime import current_device, destroy_model_parallel, initialize

__all__ = ["current_device", "destroy_model_parallel", "initialize"]
