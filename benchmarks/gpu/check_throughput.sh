#!/usr/bin/env bash
# The throughput check of the PyTorch path (no Transformer Engine), prepared to run in under 8 minutes
# on one H100/H200:
#   1. installs megatron-core (carried wheels) where missing;
#   2. runs the GPU tests of the chunked loss and the compiled RMSNorm (bf16, 2B vocabulary);
#   3. profiles one 32K step of the InternVL2-2B-shaped model as measured before (full recompute):
#      time by part and kind of work, host gaps, memory (benchmarks/gpu/profile_step.py);
#   4. measures the step at 8K and 32K packs before and after: full recompute as before, then with the
#      chunked loss, the compiled RMSNorm and the fused SwiGLU, then with less recompute (selective,
#      half the layers, none);
#   5. profiles the 32K step once more with the fusions and selective recompute.
# Everything goes to benchmarks/results/<date>-<gpu>-throughput.md (and to $OUT, when that is set).
#
#   bash benchmarks/gpu/check_throughput.sh [--wheels DIR] [--dry-run]
# --dry-run: on a CPU host, run every step on tiny shapes (the GPU tests: their selection only) and check
#   the time budget; the results go to a temporary file.
# Exits non-zero when a step fails; later steps still run.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "${repo}" || exit 1
# shellcheck source=benchmarks/gpu/lib.sh
. benchmarks/gpu/lib.sh
budget_s=450
parse_args "bash benchmarks/gpu/check_throughput.sh [--wheels DIR] [--dry-run]" "$@"

# shellcheck source=benchmarks/gpu/install_wheels.sh
source benchmarks/gpu/install_wheels.sh || exit 1
gpu="$(device_name)" || exit 1
results="$(results_file -throughput)"
write_header "Training throughput without Transformer Engine on ${gpu}" "bash benchmarks/gpu/check_throughput.sh --wheels ${wheels}"

bench=("${python}" benchmarks/gpu/bench_step.py --spec torch --tokens 8192 32768 --repeats 3)
profile=("${python}" benchmarks/gpu/profile_step.py --spec torch --tokens 32768)
tiny="--preset tiny --tokens 1024 --repeats 1"
fused=(--loss-chunk 4096 --compiled-norm --fused-swiglu)
run_step "GPU tests of the chunked loss and the compiled norm" 60 "--collect-only" \
  "${python}" -m pytest -q -m gpu -p no:cacheprovider tests/model/test_fusions_gpu.py
run_step "profile, 32K, before (full recompute)" 60 "--preset tiny --tokens 1024" "${profile[@]}" --recompute full
run_step "before: full recompute" 40 "${tiny}" "${bench[@]}" --recompute full
run_step "full recompute, chunked loss" 40 "${tiny}" "${bench[@]}" --recompute full --loss-chunk 4096
run_step "full recompute, all fusions" 40 "${tiny}" "${bench[@]}" --recompute full "${fused[@]}"
run_step "selective recompute (core attention, MLP), all fusions" 40 "${tiny}" "${bench[@]}" \
  --recompute selective:core_attn,mlp \
  "${fused[@]}"
run_step "full recompute of 12 of 24 layers, all fusions" 40 "${tiny}" "${bench[@]}" --recompute block:12 \
  "${fused[@]}"
run_step "no recompute, all fusions" 40 "${tiny}" "${bench[@]}" --recompute none "${fused[@]}"
run_step "profile, 32K, after (selective recompute of core attention and MLP, all fusions)" 60 "--preset tiny --tokens 1024" \
  "${profile[@]}" --recompute selective:core_attn,mlp "${fused[@]}"
check_budget "${budget_s}"
finish
