"""The optimizer and LR schedule: the ``optimizer:`` section of the training YAML, whose knobs carry
Megatron-Core's names, so that Megatron's OptimizerConfig takes those it shares as they are."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from megatron.core import optimizer as megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


@dataclass
class OptimizerConfig:
    optimizer: Literal["adam"] = "adam"  # AdamW (decoupled weight decay), as Megatron-Core names it
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_decay_style: Literal["constant", "linear", "cosine", "inverse-square-root"] = "cosine"
    lr_warmup_fraction: float | None = None  # of train_iters; else lr_warmup_iters
    lr_warmup_iters: int = 0
    lr_warmup_init: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0

    def warmup_iters(self, train_iters: int) -> int:
        if self.lr_warmup_fraction is not None:
            return round(self.lr_warmup_fraction * train_iters)
        return self.lr_warmup_iters


_MEGATRON_FIELDS = {f.name for f in dataclasses.fields(megatron_optimizer.OptimizerConfig)}


def build_optimizer(
    config: OptimizerConfig,
    wrapped: list,
    *,
    train_iters: int,
    params_dtype: torch.dtype,
    use_distributed_optimizer: bool,
    override_scheduler: bool,
) -> tuple:
    """AdamW (decoupled weight decay; biases and norms excluded) and the warm-up + decay schedule;
    ``override_scheduler``: on resume, this schedule rather than the checkpoint's."""
    shared = {k: v for k, v in dataclasses.asdict(config).items() if k in _MEGATRON_FIELDS}
    optimizer = megatron_optimizer.get_megatron_optimizer(
        megatron_optimizer.OptimizerConfig(
            **shared,
            bf16=params_dtype == torch.bfloat16,
            params_dtype=params_dtype,
            use_distributed_optimizer=use_distributed_optimizer,
        ),
        wrapped,
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=config.lr_warmup_init,
        max_lr=config.lr,
        min_lr=config.min_lr,
        lr_warmup_steps=min(config.warmup_iters(train_iters), train_iters - 1),
        lr_decay_steps=train_iters,
        lr_decay_style=config.lr_decay_style,
        start_wd=config.weight_decay,
        end_wd=config.weight_decay,
        wd_incr_steps=train_iters,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=not override_scheduler,
        override_opt_param_scheduler=override_scheduler,
    )
    return optimizer, scheduler
