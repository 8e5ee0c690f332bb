"""Where the time and the memory of one training step go: a torch.profiler breakdown of the step of
bench_step.py (same model, pack and variant flags).

Time: every operator's own cost (its CUDA kernels' time on a GPU, its own CPU time on a CPU) is
charged to a part of the model (vision tower, projector, language layers, output layer + loss,
optimizer, data-parallel gradient reduction, other) and to a kind of work (GEMM, attention, norm,
communication, elementwise and the rest). Parts come from profiler ranges opened by module hooks in the
forward pass; a backward operator inherits the part of the forward operator whose autograd node it
runs (the profiler's sequence numbers), recomputed forwards are ranged again. Host gaps: step wall time
minus the summed kernel time (GPU only; an upper bound where kernels overlap on several streams).

Memory: weights, gradient buffers and optimizer state (allocated bytes around their creation on a GPU,
tensor sizes on a CPU), the bytes each part saves for its backward pass (saved-tensor hooks, each
storage counted once; under recompute the recomputed layers' tensors count too, though they live one
layer at a time; the logits and the loss are the output layer's), and the peak.

    python benchmarks/gpu/profile_step.py --tokens 32768                  # on the GPU, 2B shapes
    python benchmarks/gpu/profile_step.py --preset tiny --tokens 1024     # CPU dry run
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_step.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, when not installed

import bench_step
from common import machine_description, print_table

import megatron_v2pe.training.step as step_module
from megatron_v2pe.parallel import initialize

CUDA = torch.cuda.is_available()
PART, KIND = "part: ", "kind: "
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm", "aten::matmul"}
GEMM_KERNELS = ("gemm", "cutlass", "nvjet", "xmma", "cublas")
COMM_NAMES = ("nccl", "all_reduce", "allreduce", "reduce_scatter", "all_gather", "gloo", "c10d")
NORM_OPS = ("rms_norm", "layer_norm")


class SavedBytes:
    """Bytes saved for backward per part (saved-tensor hooks; each storage counted once)."""

    def __init__(self):
        self.bytes, self.seen, self.stack = defaultdict(int), set(), ["other"]

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), tensor.device)
        if key not in self.seen:
            self.seen.add(key)
            self.bytes[self.stack[-1]] += storage.nbytes()
        return tensor


def _ranged(name: str, saved: SavedBytes | None = None):
    """A pair of forward hooks that open and close a profiler range (and set the current part)."""
    handles = []

    def pre(module, args):
        handles.append(torch.ops.profiler._record_function_enter_new(name, None))
        if saved is not None:
            saved.stack.append(name[len(PART):])

    def post(module, args, output):
        torch.ops.profiler._record_function_exit._RecordFunction(handles.pop())
        if saved is not None:
            saved.stack.pop()

    return pre, post


def _hook(module, name: str, saved: SavedBytes | None = None) -> None:
    """Range ``module``'s forward; for a part, also each of its transformer layers, which Megatron's
    full recompute calls again one by one in the backward pass."""
    layers = getattr(getattr(module, "decoder", None), "layers", []) if name.startswith(PART) else []
    for target in (module, *layers):
        pre, post = _ranged(name, saved)
        target.register_forward_pre_hook(pre)
        target.register_forward_hook(post)


def _wrap(owner, attribute: str, name: str, saved: SavedBytes | None = None) -> None:
    """Replace owner.attribute (a function) by itself inside a profiler range."""
    original = getattr(owner, attribute)

    @functools.wraps(original)
    def ranged(*args, **kwargs):
        with record_function(name):
            if saved is not None:
                saved.stack.append(name[len(PART):])
            try:
                return original(*args, **kwargs)
            finally:
                if saved is not None:
                    saved.stack.pop()

    setattr(owner, attribute, ranged)


def instrument(ddp, optimizer, saved: SavedBytes) -> None:
    """Profiler ranges for the parts of the model and the kinds that operator names do not tell."""
    model = ddp.module.module if hasattr(ddp.module, "module") else ddp.module
    _hook(model.vision_model, PART + "vision tower", saved)
    _hook(model.vision_projection, PART + "projector", saved)
    _hook(model.language_model, PART + "language layers", saved)
    _wrap(model.language_model, "_postprocess", PART + "output layer + loss", saved)
    for name, module in model.named_modules():
        if name.endswith("core_attention"):
            _hook(module, KIND + "attention")
        elif name.endswith("layernorm") or "norm" in type(module).__name__.lower():
            _hook(module, KIND + "norm")
    _wrap(optimizer, "step", PART + "optimizer")
    _wrap(step_module, "finalize_grads", PART + "DP gradient reduction")


def _own_cost(event) -> float:
    """µs of work charged to this operator itself."""
    if CUDA:
        return sum(k.duration for k in event.kernels)
    return event.self_cpu_time_total


def _kind(event, ranges: list[str]) -> str:
    name = event.name.lower()
    kernels = " ".join(k.name.lower() for k in event.kernels)
    if any(c in name or c in kernels for c in COMM_NAMES):
        return "communication"
    if event.name in GEMM_OPS or any(g in kernels for g in GEMM_KERNELS):
        return "GEMM"
    kinds = [r for r in ranges if r.startswith(KIND)]
    if kinds:
        return kinds[0][len(KIND):]
    if any(n in name for n in NORM_OPS):
        return "norm"
    return "elementwise and other"


def _ranges(event) -> list[str]:
    """Our range names around ``event``, innermost first."""
    names, parent = [], event.cpu_parent
    while parent is not None:
        if parent.name.startswith((PART, KIND)):
            names.append(parent.name)
        parent = parent.cpu_parent
    return names


def _backward_keys(event):
    """The (sequence number, forward thread) of each autograd node being evaluated around ``event``,
    innermost first (a recomputed forward runs inside the backward of its checkpoint)."""
    parent = event
    while parent is not None:
        if parent.name.startswith("autograd::engine::evaluate_function"):
            yield parent.sequence_nr, parent.fwd_thread
        parent = parent.cpu_parent


def _context(event, forward_ranges: dict) -> list[str]:
    """Our ranges around ``event``, extended by those of the forward operators whose backward it runs
    until a part is known."""
    ranges = _ranges(event)
    for key in _backward_keys(event):
        if any(r.startswith(PART) for r in ranges):
            break
        ranges = ranges + forward_ranges.get(key, [])
    return ranges


def breakdown(events) -> dict:
    """{(part, kind): µs} over the profiled step."""
    forward_ranges = {}
    for event in events:
        if event.sequence_nr >= 0 and not event.name.startswith("autograd::"):
            forward_ranges.setdefault((event.sequence_nr, event.thread), _context(event, forward_ranges))
    costs = defaultdict(float)
    for event in events:
        cost = _own_cost(event)
        if cost <= 0 or event.name.startswith((PART, KIND)):
            continue
        ranges = _context(event, forward_ranges)
        part = next((r[len(PART):] for r in ranges if r.startswith(PART)), "other")
        costs[part, _kind(event, ranges)] += cost
    return costs


def _allocated() -> int:
    return torch.cuda.memory_allocated() if CUDA else 0


def memory_rows(ddp, before_optimizer: int, after_step: int, saved: SavedBytes, peak: float, layers: int) -> list:
    weights = sum(p.numel() * p.element_size() for p in ddp.module.parameters())
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in ddp.buffers)
    rows = [["weights", weights / 2**30], ["gradient buffers (fp32)", grads / 2**30]]
    if CUDA:
        rows.append(["optimizer state (fp32 master + Adam moments)", (after_step - before_optimizer) / 2**30])
    rows += [[f"saved for backward: {part}", n / 2**30] for part, n in sorted(saved.bytes.items())]
    per_layer = saved.bytes["language layers"] / layers
    rows.append([f"saved for backward: per language layer (of {layers})", per_layer / 2**30])
    rows.append(["peak (allocated)" if CUDA else "peak RSS of the process", peak])
    return [[name, f"{gib:.3f}"] for name, gib in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench_step.add_variant_arguments(parser)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--trace", type=Path, default=None, help="also write a Chrome trace here")
    args = parser.parse_args()
    initialize()
    config = bench_step.preset(args.preset)
    ddp, optimizer = bench_step.build(config, args, bf16=CUDA)
    batch, _ = bench_step.synthetic_pack(config, args.tokens, np.random.default_rng(0))
    saved = SavedBytes()
    instrument(ddp, optimizer, saved)
    before_optimizer = _allocated()
    run = functools.partial(bench_step.one_step, ddp, optimizer, batch)
    run()  # warm-up: optimizer state, compiled kernels
    after_step = _allocated()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    saved.bytes.clear(), saved.seen.clear()
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * CUDA
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            run()
            wall_us = 1e6 * (time.perf_counter() - start)
    if CUDA:
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    memory = memory_rows(ddp, before_optimizer, after_step, saved, peak, config.language.num_layers)
    report(args, prof, wall_us, memory)


def report(args, prof, wall_us: float, memory: list) -> None:
    costs = breakdown(prof.events())
    total = sum(costs.values())
    kinds = sorted({k for _, k in costs})
    parts = sorted({p for p, _ in costs}, key=lambda p: -sum(v for (q, _), v in costs.items() if q == p))
    rows = [[part, *(f"{costs.get((part, k), 0) / 1e3:.1f}" for k in kinds),
             f"{sum(costs.get((part, k), 0) for k in kinds) / 1e3:.1f}",
             f"{100 * sum(costs.get((part, k), 0) for k in kinds) / total:.1f}%"] for part in parts]
    rows.append(["all", *(f"{sum(v for (_, q), v in costs.items() if q == k) / 1e3:.1f}" for k in kinds),
                 f"{total / 1e3:.1f}", "100%"])
    unit = "GPU kernel ms" if CUDA else "CPU ms (own time of each operator)"
    print(f"machine: {machine_description()}{', ' + torch.cuda.get_device_name() if CUDA else ''}\n")
    title = f"{args.preset}, {args.tokens:,}-token pack, {bench_step.variant_name(args, CUDA)}"
    print_table(f"where the step's time goes ({unit}): {title}", ["part", *kinds, "total", "share"], rows)
    gap = wall_us - total if CUDA else float("nan")
    print(f"step wall time {wall_us / 1e3:.1f} ms; host gaps (wall - kernel time) "
          + (f"{gap / 1e3:.1f} ms ({100 * gap / wall_us:.1f}%)" if CUDA else "- (CPU run)") + "\n")
    print_table(f"memory (GiB): {title}", ["what", "GiB"], memory)
    if args.trace is not None:
        prof.export_chrome_trace(str(args.trace))
        print(f"trace: {args.trace}")


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
