"""Loss of a tiny GPTModel (stock rope) and V2PEGPTModel (fractional positions) under several layouts.

Layout 1x1 (data parallel over the ranks: every rank holds the whole model) is the single-process
reference; it saves its weights as a Megatron dist checkpoint, which every other layout loads,
resharded, before computing the loss of the same batch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_v2pe.model.config import internlm2_transformer_config
from megatron_v2pe.model.language_model import V2PEGPTModel
from megatron_v2pe.model.layer_specs import v2pe_layer_spec
from megatron_v2pe.parallel import destroy_model_parallel, initialize
from megatron_v2pe.v2pe.positions import RandomDelta, build_positions

VOCAB, SEQ, BATCH = 128, 64, 2
LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2)}


def build(kind: str, tp: int, pp: int):
    config = internlm2_transformer_config(
        4, 64, 4, 2, 128, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
    )
    common = dict(
        config=config, vocab_size=VOCAB, max_sequence_length=SEQ,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
    )
    if kind == "stock":
        return GPTModel(transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                        position_embedding_type="rope", rotary_base=1e6, **common)
    return V2PEGPTModel(transformer_layer_spec=v2pe_layer_spec(), rotary_base=1e6, **common)


def batch() -> dict[str, torch.Tensor]:
    """The same batch on every rank: two sequences, each with two images at random δ."""
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(0, VOCAB, (BATCH, SEQ + 1)))
    mask = np.zeros(SEQ, dtype=bool)
    mask[4:24] = mask[30:58] = True
    positions = [build_positions(mask, RandomDelta(), rng=rng)[0] for _ in range(BATCH)]
    return {"ids": ids[:, :-1], "labels": ids[:, 1:], "positions": torch.from_numpy(np.stack(positions))}


def loss(kind: str, model) -> float:
    """Mean token loss of the batch through Megatron's pipeline schedule (the no-pipelining one at PP=1)."""
    data = batch()

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        if kind == "stock":
            out = model(b["ids"], torch.arange(SEQ).expand(BATCH, SEQ), None, labels=b["labels"])
        else:
            out = model(b["ids"], None, positions=b["positions"], labels=b["labels"])
        return out, lambda output: (output.float().mean(), {"loss": output.float().mean().detach()})

    with torch.no_grad():
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([data]), model=[model],
            num_microbatches=1, seq_length=SEQ, micro_batch_size=BATCH, forward_only=True,
        )
    value = torch.tensor(losses[0]["loss"].item() if losses else 0.0)
    # Only the last pipeline stage has the loss (others hold 0; a cross entropy is >= 0).
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()

    results: dict[str, dict[str, float]] = {}
    initialize(seed=123)
    for kind in ("stock", "v2pe"):
        torch.manual_seed(5)
        model = build(kind, 1, 1).eval()
        results.setdefault(kind, {})["1x1"] = loss(kind, model)
        ckpt = args.workdir / f"ckpt_{kind}"
        if dist.get_rank() == 0:
            ckpt.mkdir()
        dist.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), str(ckpt))
    destroy_model_parallel()

    for name, (tp, pp) in LAYOUTS.items():
        initialize(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=123)
        for kind in ("stock", "v2pe"):
            model = build(kind, tp, pp).eval()
            sharded = model.sharded_state_dict()
            model.load_state_dict(dist_checkpointing.load(sharded, str(args.workdir / f"ckpt_{kind}")))
            results[kind][name] = loss(kind, model)
        destroy_model_parallel()

    if dist.get_rank() == 0:
        args.result.write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
