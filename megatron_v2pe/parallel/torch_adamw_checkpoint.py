"""Checkpointing Megatron-Core's distributed optimizer around ``torch.optim.AdamW``.

Megatron-Core falls back to torch's AdamW whenever neither Transformer Engine nor apex provides a fused
Adam: on every CPU host, and on GPU hosts without them (a pip install outside the NGC container, the
``torch`` attention backend). Its torch-fallback checkpoint code mishandles torch's per-parameter
``step``; ``install()`` mends it. The mended methods act only on torch's Adam/AdamW states, so
installing it unconditionally leaves TE's and apex's optimizers untouched.
"""

from __future__ import annotations

import threading

import torch

_lock = threading.Lock()
_installed = False


def _mend_distributed_optimizer() -> None:
    """torch keeps ``step`` as a per-parameter state tensor, while TE's and apex's FusedAdam keep it
    in the param group, and Megatron's torch-fallback code mishandles it:

    - ``state_dict`` reads ``step`` from the per-parameter states, which torch creates lazily at the
      first ``step()``: before it (a fresh optimizer about to load a checkpoint) the read fails.
      Create the states as torch's AdamW does at its first step (step 0, zero moments).
    - loading leaves ``step`` out of the checkpointed parameter state and restores it from the param
      groups, as one tensor shared by every parameter (AdamW then increments it once per parameter,
      so a resumed run diverges), and then copies every state tensor from the checkpoint, ``step``
      included: KeyError 'step'. Give each parameter its own copy of the restored ``step`` and copy
      only what the checkpoint holds.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    state_dict = DistributedOptimizer.state_dict
    set_states = DistributedOptimizer._set_main_param_and_optimizer_states

    def state_dict_with_created_states(self):
        if isinstance(self.optimizer, torch.optim.Adam | torch.optim.AdamW):
            for group in self.optimizer.param_groups:
                for param in group["params"]:
                    if not self.optimizer.state[param]:
                        self.optimizer.state[param] = {
                            "step": torch.tensor(0.0),
                            "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                            "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                        }
        return state_dict(self)

    def set_checkpointed_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()  # one tensor per parameter, as torch keeps it
            tensors = {"step": state["step"], **tensors}  # the checkpoint has none: keep the restored one
        set_states(self, model_param, tensors)

    DistributedOptimizer.state_dict = state_dict_with_created_states
    DistributedOptimizer._set_main_param_and_optimizer_states = set_checkpointed_states



def install() -> None:
    """Mend Megatron's distributed optimizer for torch's AdamW (once per process, on any host)."""
    global _installed
    with _lock:
        if not _installed:
            _mend_distributed_optimizer()
            _installed = True
