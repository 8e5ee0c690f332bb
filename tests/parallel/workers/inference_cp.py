"""Inference under context parallelism: every CP rank generates (chunked prefill into the sharded KV
cache, then decoding) and scores teacher-forced the inputs the test saved, with the weights it saved;
rank 0 writes every rank's tokens, step logits and verdicts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_v2pe.eval.generation import generate
from megatron_v2pe.eval.teacher_forced import teacher_forced_correct
from megatron_v2pe.model.presets import language_transformer_config, tiny, vision_transformer_config
from megatron_v2pe.model.vlm import InternVLModel
from megatron_v2pe.parallel import destroy_model_parallel, initialize

CONFIG = tiny()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--cp", type=int, required=True)
    args = parser.parse_args()
    initialize(context_parallel_size=args.cp, seed=0)
    saved = torch.load(args.workdir / "inputs.pt", weights_only=False)
    model = InternVLModel(
        CONFIG,
        language_transformer_config(CONFIG, context_parallel_size=args.cp),
        vision_transformer_config(CONFIG),  # the tower runs whole tiles; the VLM spreads them over CP
        attention_backend="reference",
    )
    model.load_state_dict(saved["state"])
    model.eval()
    mine = {"generated": [], "verdicts": []}
    for run in saved["generate"]:
        out = generate(model, saved["questions"], run["steps"], delta_policy=run["policy"],
                       prefill_chunk=run["chunk"], keep_logits=True)
        mine["generated"].append({"tokens": out.tokens, "logits": out.step_logits})
    for run in saved["score"]:
        verdicts = teacher_forced_correct(
            model, saved["questions"], run["answers"], delta_policy=run["policy"], prefill_chunk=run["chunk"]
        )
        mine["verdicts"].append(verdicts)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() == 0:
        torch.save(gathered, args.workdir / "per_rank.pt")
        args.result.write_text(json.dumps({"ranks": len(gathered)}))
    destroy_model_parallel()


if __name__ == "__main__":
    main()
