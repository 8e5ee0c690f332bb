"""Forward and backward of one global batch through Megatron-Core's pipeline schedules.

The loss is Σ w·CE / Σ w with the denominator summed over every micro-batch of every data- and
context-parallel rank, so a token weighs the same whatever the layout. Σ w is known from
the data before the forward pass, so each micro-batch's loss is divided by the global Σ w up front; the
schedules then run with ``calculate_per_token_loss`` (no averaging over micro-batches or ranks) and
gradients are summed across data- and context-parallel ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from megatron_v2pe.batch import PackedBatch
from megatron_v2pe.model.vlm import model_inputs, weighted_loss
from megatron_v2pe.parallel.runtime import current_device


@dataclass
class StepLoss:
    loss: float  # Σ w·CE / Σ w over the global batch
    weight: float  # Σ w over the global batch
    tokens: int  # supervised tokens over the global batch


def finalize_grads(model, num_tokens=None, **kwargs) -> None:
    """Megatron's gradient finalisation (DP/CP reduction, SP layer-norm and embedding sync) without
    its per-token rescaling: the losses are already divided by the global Σ w."""
    finalize_model_grads(model, None, **kwargs)


def global_loss_weight(batches: Sequence[PackedBatch]) -> torch.Tensor:
    local = torch.stack([b.loss_weights.to(torch.float64).sum() for b in batches]).sum()
    total = local.to(current_device())
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return total


def forward_backward(model_chunks: list, batches: Sequence[PackedBatch], forward_only: bool = False) -> StepLoss:
    """Run this rank's micro-batches (already sharded for context parallelism) through the schedule.

    Gradients accumulate in the DDP buffers; the caller steps the optimizer."""
    config = get_model_config(model_chunks[0])
    if not config.calculate_per_token_loss:
        raise ValueError("build the TransformerConfig with calculate_per_token_loss=True (see training/step.py)")
    lengths = {b.num_tokens for b in batches}
    if len(lengths) > 1 and not config.variable_seq_lengths:
        raise ValueError(f"micro-batches of different lengths {sorted(lengths)}: pad packs to one length "
                         "or set variable_seq_lengths=True in the TransformerConfig")
    config.finalize_model_grads_func = finalize_grads
    weight_total = global_loss_weight(batches).to(torch.float32)
    device = current_device()

    def forward_step(data_iterator, model):
        batch = next(data_iterator).to(device)
        output = model(**model_inputs(batch))

        def loss_func(per_token_loss):
            numerator, denominator = weighted_loss(per_token_loss, batch.loss_weights)
            supervised = (batch.loss_weights > 0).sum().to(torch.int)
            report = torch.stack([numerator.detach(), denominator.detach(), supervised.to(numerator.dtype)])
            return numerator / weight_total, supervised, {"sums": report}

        return output, loss_func

    iterators = [iter(batches) for _ in model_chunks]
    results = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(model_chunks) > 1 else iterators[0],
        model=model_chunks,
        num_microbatches=len(batches),
        seq_length=batches[0].num_tokens * batches[0].cp_size,
        micro_batch_size=1,
        forward_only=forward_only,
    )
    return _reduce_losses(results, device)


def _reduce_losses(results: list[dict], device) -> StepLoss:
    """Sum the last stage's (Σ w·CE, Σ w, tokens) over micro-batches and DP x CP, then share it with
    every pipeline stage."""
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for result in results:
        sums += result["sums"].to(device, torch.float64)
    dist.all_reduce(sums, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    dist.all_reduce(sums, group=parallel_state.get_pipeline_model_parallel_group())
    numerator, weight, tokens = sums.tolist()
    return StepLoss(loss=numerator / weight if weight else float("nan"), weight=weight, tokens=int(tokens))
