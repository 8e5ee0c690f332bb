"""The CPU runtime is scoped: active between ``initialize`` and ``destroy_model_parallel`` only; the
distributed optimizer's repair for torch's AdamW does not depend on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.parallel.launch import REPO_ROOT

PROBE = textwrap.dedent("""
    import json, torch
    from megatron_v2pe.parallel import destroy_model_parallel, initialize

    def probe():
        try:
            placed = str(torch.zeros(2, device="cuda").device)
        except Exception as err:  # torch without CUDA raises here
            placed = type(err).__name__
        try:
            current = str(torch.cuda.current_device())
        except Exception as err:
            current = type(err).__name__
        return {"type": torch.zeros(2).type(), "placed": placed, "current_device": current}

    before = probe()
    initialize(seed=0)
    during = probe()
    destroy_model_parallel()
    after = probe()
    initialize(seed=0)  # a second layout after a destroy gets the runtime back
    again = probe()
    destroy_model_parallel()
    print(json.dumps({"before": before, "during": during, "after": after, "again": again}))
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU runtime is for hosts without CUDA")
def test_cpu_runtime_is_entered_by_initialize_and_left_by_destroy():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    env.pop("MASTER_PORT", None)
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    outside = {"type": "torch.FloatTensor", "placed": seen["before"]["placed"],
               "current_device": seen["before"]["current_device"]}
    assert seen["before"]["placed"] != "cpu" and seen["before"]["current_device"] != "cpu"
    assert seen["after"] == seen["before"] == outside
    inside = {"type": "torch.cuda.FloatTensor", "placed": "cpu", "current_device": "cpu"}
    assert seen["during"] == seen["again"] == inside


def test_torch_adamw_repair_is_installed_whatever_the_device(monkeypatch):
    """Megatron-Core takes torch's AdamW on GPU hosts without TE or apex too: the repair must not be
    tied to the CPU runtime (here: installed while CUDA reports itself available)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron_v2pe.parallel import torch_adamw_checkpoint

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch_adamw_checkpoint, "_installed", False)
    monkeypatch.setattr(DistributedOptimizer, "state_dict", DistributedOptimizer.state_dict)
    monkeypatch.setattr(DistributedOptimizer, "_set_main_param_and_optimizer_states",
                        DistributedOptimizer._set_main_param_and_optimizer_states)
    original = DistributedOptimizer.state_dict
    torch_adamw_checkpoint.install()
    assert DistributedOptimizer.state_dict is not original
    assert DistributedOptimizer.state_dict.__name__ == "state_dict_with_created_states"
