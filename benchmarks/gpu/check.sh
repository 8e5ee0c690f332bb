#!/usr/bin/env bash
# The GPU check of this project, prepared to run in a few minutes on one H100 (or any CUDA GPU):
#   1. installs what the GPU image lacks (megatron-core, braceexpand) from carried wheels;
#   2. runs the gpu-marked tests (`pytest -m gpu`);
#   3. runs the evaluation throughput benchmark (benchmarks/eval_throughput.py), tiny and 2B-shaped;
#   4. runs the rotary benchmark (benchmarks/gpu/bench_rotary_gpu.py);
#   5. runs the training-step benchmark of the InternVL2-2B-shaped model (benchmarks/gpu/bench_step.py).
# Prompts of 32K-1M tokens have their own script, benchmarks/gpu/long_prefill.sh (6-8 minutes).
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
wheels="${1:-.whl}"
python="${PYTHON:-python3}"
status=0
# shellcheck source=benchmarks/gpu/install_wheels.sh
source "${repo}/benchmarks/gpu/install_wheels.sh" || exit 1

gpu="$("${python}" -c 'import torch; print(torch.cuda.get_device_name(0))')" || {
  echo "no CUDA GPU visible to ${python}" >&2
  exit 1
}
slug="$(tr '[:upper:]' '[:lower:]' <<<"${gpu}" | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')"
command_line="bash benchmarks/gpu/check.sh${1:+ $1}"
results="benchmarks/results/$(date -u +%F)-${slug}.md"
mkdir -p benchmarks/results

{
  echo "# GPU check on ${gpu}, $(date -u '+%F %H:%M UTC')"
  echo
  echo "Command, from the repository root: \`${command_line}\`"
  echo
  echo "- $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
  echo "- $("${python}" -c 'import platform, torch, triton, megatron.core as m
print(f"python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, megatron-core {m.__version__}")')"
  if commit="$(git rev-parse --short HEAD 2>/dev/null)"; then
    git diff --quiet HEAD 2>/dev/null || commit+=" with local changes"
    echo "- commit ${commit}"
  fi
  echo
} >"${results}"

run_step() {
  local title="$1" limit="$2"
  shift 2
  printf "## %s\n\n\`%s\`\n\n\`\`\`\n" "${title}" "$*" >>"${results}"
  PYTHONUNBUFFERED=1 timeout "${limit}" "$@" 2>&1 | tee -a "${results}"
  local rc=$?
  printf "\`\`\`\n\n" >>"${results}"
  if ((rc != 0)); then
    printf '**%s: exit status %s%s**\n\n' "${title}" "${rc}" "$( ((rc == 124)) && echo " (timed out after ${limit} s)")" \
      >>"${results}"
    status=1
  fi
}

run_step "gpu-marked tests" 150 "${python}" -m pytest -q -m gpu -p no:cacheprovider tests
run_step "evaluation throughput, tiny" 45 "${python}" benchmarks/eval_throughput.py
run_step "evaluation throughput, 2B-shaped" 60 "${python}" benchmarks/eval_throughput.py --preset internvl2_2b \
  --lengths 4096 32768 --chunk 8192
run_step "rotary benchmark" 90 "${python}" benchmarks/gpu/bench_rotary_gpu.py
run_step "training step benchmark" 180 "${python}" benchmarks/gpu/bench_step.py

if [[ -n "${OUT:-}" ]]; then
  cp "${results}" "${OUT}/"
fi
echo "results: ${results}"
exit "${status}"
