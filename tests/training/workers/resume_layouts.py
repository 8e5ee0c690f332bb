"""Resume one checkpoint under several parallel layouts (torchrun, 2 ranks): loss of the next step.

Each layout resumes from the checkpoint (load only, nothing saved) for one step and reports its loss; the
model weights, optimizer state and LR schedule are resharded on load, and the data-loader state
carries over because the data-parallel size (1) is unchanged.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch.distributed as dist

from megatron_v2pe.training.config import load_config
from megatron_v2pe.training.train import train
from tests.training.conftest import TINY_CONFIG

LAYOUTS = {
    "tp2": ["parallel.tensor_model_parallel_size=2"],
    "pp2": ["parallel.pipeline_model_parallel_size=2"],
    "cp2": ["parallel.context_parallel_size=2"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--iterations", type=int, required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    results = {}
    for name, layout in LAYOUTS.items():
        metrics = args.workdir / f"{name}.jsonl"
        config = load_config(
            TINY_CONFIG,
            [
                *args.overrides,
                *layout,
                f"checkpoint.load={args.checkpoint}",
                f"training.train_iters={args.iterations}",
                f"logging.metrics_file={metrics}",
            ],
        )
        train(config)
        if dist.get_rank() == 0:
            results[name] = [json.loads(line) for line in metrics.read_text().splitlines()]
    if dist.get_rank() == 0:
        args.result.write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
