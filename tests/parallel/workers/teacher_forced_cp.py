"""Teacher-forced scoring under context parallelism: every CP rank scores the inputs the test saved,
with the weights the test saved, and rank 0 writes the verdicts of every rank."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

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
    verdicts = teacher_forced_correct(
        model.eval(), saved["questions"], saved["answers"], delta_policy=saved["policy"]
    )
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, verdicts)
    if dist.get_rank() == 0:
        args.result.write_text(json.dumps({"per_rank": gathered}))
    destroy_model_parallel()


if __name__ == "__main__":
    main()
