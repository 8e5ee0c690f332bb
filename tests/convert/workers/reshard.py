"""Load converted (TP=1) dist checkpoints at TP=2, PP=2, double every weight, save them again (one pair of
``--sources`` / ``--targets`` per architecture, each read from its ``vlm_config.json``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps

from megatron_v2pe.checkpoint.model_config import config_from_dict
from megatron_v2pe.model.presets import language_transformer_config, vision_transformer_config
from megatron_v2pe.model.vlm import InternVLModel
from megatron_v2pe.parallel import initialize


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--sources", type=Path, nargs="+", required=True)
    parser.add_argument("--targets", type=Path, nargs="+", required=True)
    args = parser.parse_args()

    initialize(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, seed=0)
    params = {}
    for source, target in zip(args.sources, args.targets, strict=True):
        config = config_from_dict(json.loads((source / "vlm_config.json").read_text()))
        params[str(source)] = double(config, source, target)
    if dist.get_rank() == 0:
        args.result.write_text(json.dumps({"params_on_rank0": params}))


def double(config, source: Path, target: Path) -> int:
    """Load ``source`` at this layout, double every weight, save to ``target``; this rank's parameters."""
    model = InternVLModel(
        config,
        language_transformer_config(config, tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
        vision_transformer_config(config, tensor_model_parallel_size=2),
        attention_backend="reference",
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    )
    loaded = dist_checkpointing.load({"model0": model.sharded_state_dict()}, str(source))
    model.load_state_dict(loaded["model0"])
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(2)
    if dist.get_rank() == 0:
        target.mkdir()
    dist.barrier()
    dist_checkpointing.save({"model0": model.sharded_state_dict()}, str(target))
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":  # dist checkpointing spawns worker processes that import this file
    main()
