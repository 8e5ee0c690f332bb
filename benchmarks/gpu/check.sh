#!/usr/bin/env bash
# The GPU check of this project, prepared to run in a few minutes on one H100 (or any CUDA GPU):
#   1. installs what the GPU image lacks (megatron-core, braceexpand) from carried wheels;
#   2. runs the gpu-marked tests (`pytest -m gpu`);
#   3. runs the evaluation throughput benchmark (benchmarks/eval_throughput.py), tiny and 2B-shaped;
#   4. runs the rotary benchmark (benchmarks/gpu/bench_rotary_gpu.py);
#   5. runs the training-step benchmark of the InternVL2-2B-shaped model (benchmarks/gpu/bench_step.py).
# Prompts of 32K-1M tokens have their own script, benchmarks/gpu/long_prefill.sh (6-8 minutes);
# Transformer Engine: check_te.sh; throughput of the torch path, before and after: check_throughput.sh.
# The step limits add up to under 9 minutes.
# Everything goes to benchmarks/results/<date>-<gpu>.md (and to $OUT, when that is set).
#
# Run from anywhere, on the GPU machine:   bash benchmarks/gpu/check.sh [WHEEL_DIR]
# WHEEL_DIR (default: .whl in the repository root) holds the wheels, made on an x86-64 host with
#   python3 -m pip download --no-deps -d .whl megatron-core==0.19.2 braceexpand==0.1.7
# Exits non-zero when a step fails; later steps still run.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "${repo}" || exit 1
# shellcheck source=benchmarks/gpu/lib.sh
. benchmarks/gpu/lib.sh
wheels="${1:-.whl}"
# shellcheck source=benchmarks/gpu/install_wheels.sh
source benchmarks/gpu/install_wheels.sh || exit 1

gpu="$(device_name)" || exit 1
results="$(results_file "")"
write_header "GPU check on ${gpu}" "bash benchmarks/gpu/check.sh${1:+ $1}"

run_step "gpu-marked tests" 150 - "${python}" -m pytest -q -m gpu -p no:cacheprovider tests
run_step "evaluation throughput, tiny" 45 - "${python}" benchmarks/eval_throughput.py
run_step "evaluation throughput, 2B-shaped" 60 - "${python}" benchmarks/eval_throughput.py --preset internvl2_2b \
  --lengths 4096 32768 --chunk 8192
run_step "rotary benchmark" 90 - "${python}" benchmarks/gpu/bench_rotary_gpu.py
run_step "training step benchmark" 180 - "${python}" benchmarks/gpu/bench_step.py
finish
