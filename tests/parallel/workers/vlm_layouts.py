"""Loss and gradients of the tiny VLM under parallel layouts, against the single-process computation.

The reference (every rank holds the whole model and computes the whole global batch with plain autograd)
gives the loss Σ w·CE / Σ w and every parameter's gradient. Each layout loads the reference weights from
a Megatron dist checkpoint (resharded on load), runs the global batch through ``forward_backward``
(Megatron's schedules, DDP, and the distributed optimizer under data parallelism) and takes one
optimizer step that amounts to SGD with lr = 1: Adam with β1 = β2 = 0 updates by lr·g / (|g| + ε),
which with ε = lr = 1e6 is g to a relative 1e-6·|g| (the distributed optimizer only takes Adam). So the
updated weights are weights - gradient. Those are saved as a dist checkpoint,
loaded back into the single-process layout, and compared: weights_before - weights_after == gradient.
With ``--vocab`` odd, TP 2 pads the vocabulary (``model/tp_padding.py``): the padded rows' gradients
and weights must stay exactly zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from megatron_v2pe.checkpoint.model_only import sharded_model_state
from megatron_v2pe.model.fusions import Fusions
from megatron_v2pe.model.presets import language_transformer_config, vision_transformer_config
from megatron_v2pe.model.vlm import model_chunks, model_inputs, weighted_loss
from megatron_v2pe.parallel import destroy_model_parallel, initialize
from megatron_v2pe.parallel.context_parallel import shard_batch
from megatron_v2pe.training.step import forward_backward
from tests.convert.tiny_models import family_config
from tests.model.vlm_batches import pack, sub_sample

CONFIG = None  # the tiny VLM of --family with a 4-layer language model, set by main()


def four_layer_config(family: str, tower: str, vocab: int | None = None):
    """``tiny()`` with a language family and vision tower of ``tests/convert/tiny_models``, 4 language
    layers (and ``vocab`` ids)."""
    base = family_config(family, tower)
    language = dataclasses.replace(base.language, num_layers=4, vocab_size=vocab or base.language.vocab_size)
    return dataclasses.replace(base, language=language)


PACK_TOKENS = 192
PAD_MULTIPLE = 16  # 2·CP·TP for the largest layout (CP4 with TP2 sequence parallel)

# name -> (tp, pp, cp, vpp, sequence_parallel, distributed_optimizer)
LAYOUTS = {
    "tp2": (2, 1, 1, None, False, False),
    "sp": (2, 1, 1, None, True, False),
    "pp2": (1, 2, 1, None, False, False),
    "pp2_vpp2": (1, 2, 1, 2, False, False),
    "cp2": (1, 1, 2, None, False, False),
    "dp2_distopt": (1, 1, 1, None, False, True),
    "cp4": (1, 1, 4, None, False, False),
    "tp2_cp2": (2, 1, 2, None, False, False),
    "pp2_cp2": (1, 2, 2, None, False, False),
}


def global_batch() -> list:
    """Four packs of image-text sub-samples (fractional δ, sub-samples shorter than 2·CP included)."""
    rng = np.random.default_rng(0)
    layouts = [
        [[5, ("image", 2, 0.25), 7, ("image", 1, 1.0), 4], [3], [9, ("image", 1, 1 / 256), 6]],
        [[3, ("image", 3, 0.5), 11], [6, ("image", 1, 0.125), 2]],
        [[2], [20, ("image", 2, 1 / 16), 5], [4, ("image", 1, 0.5), 4]],
        [[7, ("image", 1, 0.25), 30]],
    ]
    return [pack([sub_sample(CONFIG, rng, s) for s in subs], PAD_MULTIPLE, PACK_TOKENS) for subs in layouts]


# The fused variant of a layout: chunked loss (chunks that do not divide the pack), compiled RMSNorm,
# Megatron's fused SwiGLU.
FUSED = Fusions(loss_chunk_tokens=37, compiled_norm=True)


def build(tp=1, pp=1, cp=1, vpp=None, sp=False, fused=False):
    language = language_transformer_config(
        CONFIG, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp,
        virtual_pipeline_model_parallel_size=vpp, sequence_parallel=sp, calculate_per_token_loss=True,
        bias_activation_fusion=fused,
    )
    vision = vision_transformer_config(CONFIG, tensor_model_parallel_size=tp)
    return model_chunks(CONFIG, language, vision, "reference", FUSED if fused else Fusions())


def reference(workdir: Path):
    """Single-process loss and gradients; saves the initial weights for the other layouts."""
    initialize(seed=11)
    torch.manual_seed(3)
    (model,) = build()
    batches = global_batch()
    numerator = sum(weighted_loss(model(**model_inputs(b)), b.loss_weights)[0] for b in batches)
    total_weight = sum(b.loss_weights.sum() for b in batches)
    loss = numerator / total_weight
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    save(sharded_model_state([model]), workdir / "initial")
    destroy_model_parallel()
    return loss.item(), weights, grads


def save(state: dict, path: Path) -> None:
    if dist.get_rank() == 0:
        path.mkdir()
    dist.barrier()
    dist_checkpointing.save(state, str(path))


def run_layout(name: str, workdir: Path, fused: bool = False) -> float:
    tp, pp, cp, vpp, sp, distopt = LAYOUTS[name]
    initialize(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp,
               virtual_pipeline_model_parallel_size=vpp, seed=11)
    chunks = build(tp, pp, cp, vpp, sp, fused)
    state = sharded_model_state(chunks)
    loaded = dist_checkpointing.load(state, str(workdir / "initial"))
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[f"model{i}"])
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=distopt
    )
    wrapped = [DistributedDataParallel(c.config, ddp_config, c) for c in chunks]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e6, adam_beta1=0.0, adam_beta2=0.0, adam_eps=1e6,
                        weight_decay=0.0, clip_grad=0.0, use_distributed_optimizer=distopt),
        wrapped,
    )
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    cp_rank = ps.get_context_parallel_rank()
    mine = [shard_batch(b, cp, cp_rank, CONFIG.img_context_token_id) for b in global_batch()[dp_rank::dp]]
    vision_error = vision_under_cp_error(chunks[0], global_batch()[0]) if cp > 1 else None
    for w in wrapped:
        w.zero_grad_buffer()
    optimizer.zero_grad()
    result = forward_backward(wrapped, mine)
    padding = padded_rows_nonzero(chunks, "main_grad")
    optimizer.step()
    padding += padded_rows_nonzero(chunks, "data")
    save(sharded_model_state(chunks), workdir / f"after_{name}{'_fused' if fused else ''}")
    destroy_model_parallel()
    return result.loss, vision_error, padding


def padded_rows_nonzero(chunks: list, attribute: str) -> int:
    """Nonzero entries, over all ranks, in the padded vocabulary rows of the embedding and output
    weights' ``attribute`` (their gradient or their values)."""
    count = torch.zeros((), dtype=torch.long)
    for chunk in chunks:
        lm = chunk.language_model
        real = len(lm.vocab_padding.real)
        for name in lm.VOCAB_ROWS:
            param = dict(lm.named_parameters()).get(name)
            if param is not None:
                count += torch.count_nonzero(getattr(param, attribute)[real:])
    dist.all_reduce(count)
    return int(count)


def vision_under_cp_error(model, batch) -> float | None:
    """Max difference between image features encoded spread over the CP ranks and on one rank."""
    if not model.pre_process:
        return None
    with torch.no_grad():
        spread = model.encode_images_context_parallel(batch.pixel_values, ps.get_context_parallel_group())
        alone = model.encode_images(batch.pixel_values)
    return (spread - alone).abs().max().item()


def updated_weights(name: str, workdir: Path, fused: bool = False) -> dict:
    initialize(seed=11)
    (model,) = build()
    path = workdir / f"after_{name}{'_fused' if fused else ''}"
    model.load_state_dict(dist_checkpointing.load(sharded_model_state([model]), str(path))["model0"])
    destroy_model_parallel()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def fused_vs_plain(name: str, workdir: Path, loss: float, after: dict) -> dict:
    """The layout once more with the fused paths: its loss and updated weights (weights - gradient)
    against the plain run of the same layout."""
    fused_loss, _, _ = run_layout(name, workdir, fused=True)
    fused_after = updated_weights(name, workdir, fused=True)
    errors = {n: (fused_after[n] - after[n]).abs().max().item() for n in after}
    worst = max(errors, key=errors.get)
    return {"fused_loss_error": abs(fused_loss - loss), "fused_grad_error": errors[worst], "fused_worst": worst}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--layouts", required=True)
    parser.add_argument("--family", default="internlm2")
    parser.add_argument("--tower", default="300m")
    parser.add_argument("--vocab", type=int, help="a vocabulary of its own (odd: TP 2 pads it)")
    parser.add_argument("--fused", action="store_true", help="also run each layout with FUSED; compare")
    args = parser.parse_args()
    global CONFIG
    CONFIG = four_layer_config(args.family, args.tower, args.vocab)

    ref_loss, weights, grads = reference(args.workdir)
    results = {"reference_loss": ref_loss, "layouts": {}}
    for name in args.layouts.split(","):
        loss, vision_error, padding = run_layout(name, args.workdir)
        after = updated_weights(name, args.workdir)
        errors = {n: (weights[n] - after[n] - grads[n]).abs().max().item() for n in grads}
        worst = max(errors, key=errors.get)
        results["layouts"][name] = {
            "loss": loss, "max_grad_error": errors[worst], "worst_param": worst,
            "max_grad": max(g.abs().max().item() for g in grads.values()),
            "params_compared": len(errors), "vision_cp_error": vision_error, "padding_nonzero": padding,
        }
        if args.fused:
            results["layouts"][name].update(fused_vs_plain(name, args.workdir, loss, after))
    if dist.get_rank() == 0:
        args.result.write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
