"""Parallel runtime: process groups, attention backends, context-parallel sharding."""

from megatron_v2pe.parallel.runtime import destroy_model_parallel, initialize

__all__ = ["initialize", "destroy_model_parallel"]
