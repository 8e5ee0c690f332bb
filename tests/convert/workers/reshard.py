"""Load a converted (TP=1) dist checkpoint at TP=2, PP=2, double every weight, save it again."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps

from megatron_v2pe.model.presets import language_transformer_config, tiny, vision_transformer_config
from megatron_v2pe.model.vlm import InternVLModel
from megatron_v2pe.parallel import initialize


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--target", type=Path, required=True)
    args = parser.parse_args()

    initialize(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, seed=0)
    config = tiny()
    model = InternVLModel(
        config,
        language_transformer_config(config, tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
        vision_transformer_config(config, tensor_model_parallel_size=2),
        attention_backend="reference",
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    )
    model.load_state_dict(
        dist_checkpointing.load({"model0": model.sharded_state_dict()}, str(args.source))["model0"]
    )
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(2)
    if dist.get_rank() == 0:
        args.target.mkdir()
    dist.barrier()
    dist_checkpointing.save({"model0": model.sharded_state_dict()}, str(args.target))
    if dist.get_rank() == 0:
        args.result.write_text(json.dumps({"params_on_rank0": sum(p.numel() for p in model.parameters())}))


if __name__ == "__main__":  # dist checkpointing spawns worker processes that import this file
    main()
