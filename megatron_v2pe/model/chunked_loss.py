"""Cross entropy of the output layer computed over chunks of tokens, never holding [tokens × vocab] logits.

The unfused path builds the logits of every token (32K tokens × 92,553 × 4 bytes ≈ 12 GB in float32 for
the loss, the same again for their gradient). Here the logits of ``chunk_tokens`` tokens at a time are
computed from the hidden states and the output weight, reduced to a log-sum-exp and the target logit, and
dropped; the backward pass recomputes them chunk by chunk (one more output GEMM) to form the gradients.

Semantics are Megatron-Core's ``vocab_parallel_cross_entropy``: the weight holds this tensor-parallel
rank's slice of the vocabulary, maxima, exponential sums and target logits are reduced over the
tensor-parallel group, logits are cast to float32 after the GEMM in the weights' dtype. The hidden states
enter as ``ColumnParallelLinear`` takes them (all-gathered under sequence parallelism, and the input
gradient reduced across the group). Rows past ``real_rows`` of the slice pad the vocabulary to what
the TP size splits (``tp_padding``): their logits are -inf, so they add nothing to the loss and get zero
gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from torch import Tensor


def _vocab_range(weight: Tensor, group) -> tuple[int, int]:
    rows = weight.shape[0]
    start = dist.get_rank(group) * rows if group is not None and dist.get_world_size(group) > 1 else 0
    return start, start + rows


def _all_reduce(tensor: Tensor, group, op=dist.ReduceOp.SUM) -> Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _logits(hidden: Tensor, weight: Tensor, real_rows: int) -> Tensor:
    """float32 logits of this rank's vocabulary slice, -inf past its real rows."""
    logits = (hidden @ weight.t()).float()
    logits[:, real_rows:] = float("-inf")
    return logits


def _local_targets(labels: Tensor, start: int, end: int) -> tuple[Tensor, Tensor]:
    """Labels shifted into this rank's vocabulary slice (0 where outside) and the mask of those inside."""
    inside = (labels >= start) & (labels < end)
    return torch.where(inside, labels - start, 0), inside


class _ChunkedCrossEntropy(torch.autograd.Function):
    """hidden [t, h], weight [v_local, h], labels [t] -> per-token cross entropy [t] (float32)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens, group, real_rows):
        start, end = _vocab_range(weight, group)
        targets, inside = _local_targets(labels, start, end)
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        target_logit = torch.empty_like(lse)
        for s in range(0, hidden.shape[0], chunk_tokens):
            e = min(s + chunk_tokens, hidden.shape[0])
            logits = _logits(hidden[s:e], weight, real_rows)
            picked = logits.gather(1, targets[s:e, None]).squeeze(1)
            target_logit[s:e] = torch.where(inside[s:e], picked, 0.0)
            peak = _all_reduce(logits.max(dim=-1).values, group, dist.ReduceOp.MAX)
            sum_exp = _all_reduce(logits.sub_(peak[:, None]).exp_().sum(dim=-1), group)  # in place: one chunk
            lse[s:e] = peak + sum_exp.log()
            del logits  # before the next chunk's GEMM allocates its own
        _all_reduce(target_logit, group)
        ctx.save_for_backward(hidden, weight, targets, inside, lse)
        ctx.chunk_tokens, ctx.real_rows = chunk_tokens, real_rows
        return lse - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, targets, inside, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, hidden.shape[0], ctx.chunk_tokens):
            e = min(s + ctx.chunk_tokens, hidden.shape[0])
            softmax = _logits(hidden[s:e], weight, ctx.real_rows).sub_(lse[s:e, None]).exp_()
            rows = torch.arange(e - s, device=hidden.device)
            softmax[rows, targets[s:e]] -= inside[s:e].to(softmax.dtype)
            grad_logits = softmax.mul_(grad_loss[s:e, None]).to(weight.dtype)
            grad_hidden[s:e] = grad_logits @ weight
            grad_weight += (grad_logits.t() @ hidden[s:e]).float()
            del softmax, grad_logits
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None


def chunked_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    chunk_tokens: int,
    group=None,
    real_rows: int | None = None,
) -> Tensor:
    """Per-token cross entropy of ``hidden @ weight.T`` against ``labels`` (all [t, ...] flattened to t),
    ``chunk_tokens`` tokens at a time. ``weight`` is this rank's vocabulary slice over ``group``, of which
    the first ``real_rows`` (all if None) are real ids and the rest padding."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    real_rows = weight.shape[0] if real_rows is None else real_rows
    return _ChunkedCrossEntropy.apply(hidden, weight, labels, chunk_tokens, group, real_rows)


class ChunkedLossProcessor:
    """A Megatron-Core ``GPTModel`` output processor: the per-token loss [b, s] from the final hidden
    states [s, b, h] without the logits (``GPTModel.forward(..., output_processor=...)``); the first
    ``real_rows`` rows of the output layer's slice are real ids, the rest padding (all real if None)."""

    def __init__(self, chunk_tokens: int, real_rows: int | None = None):
        self.chunk_tokens = chunk_tokens
        self.real_rows = real_rows

    def __call__(self, *, hidden_states, output_layer, output_weight, labels, config, **_unused) -> Tensor:
        if getattr(config, "use_mup", False):
            raise ValueError("the chunked loss does not scale logits (MuP); set loss_chunk_tokens to null")
        weight = output_layer.weight if output_weight is None else output_weight
        group = output_layer.tp_group
        if output_layer.sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(hidden_states, group=group)
        else:
            hidden_states = copy_to_tensor_model_parallel_region(hidden_states, group=group)
        seq, batch = hidden_states.shape[:2]
        targets = labels.transpose(0, 1).reshape(-1)
        hidden = hidden_states.reshape(seq * batch, -1)
        loss = chunked_cross_entropy(hidden, weight, targets, self.chunk_tokens, group, self.real_rows)
        return loss.view(seq, batch).transpose(0, 1).contiguous()
