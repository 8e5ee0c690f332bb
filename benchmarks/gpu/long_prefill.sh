#!/usr/bin/env bash
# Long-prompt inference on one GPU: the InternVL2-2B shapes in bf16, torch attention backend, batch 1,
# chunked prefill of 32K, 128K, 256K and 1M-token prompts into the preallocated KV cache (prefill and
# decode tokens/s, KV cache, peak memory above weights + cache), and batched decoding of 8 x ~512-token
# prompts with the KV cache against recomputation. About 6-8 minutes on an H200 (the 1M prefill is
# most of it); every length is printed as soon as it is measured.
#
#   bash benchmarks/gpu/long_prefill.sh            # on the GPU machine
#   bash benchmarks/gpu/long_prefill.sh --dry-run  # tiny model, short prompts: checks the script anywhere
# megatron-core and braceexpand come from the wheels in ${WHEELS:-.whl} where missing (as for check.sh).
#
# Results go to benchmarks/results/<date>-<gpu>-long-prefill.{md,json} (and to $OUT, when that is set).
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "${repo}" || exit 1
python="${PYTHON:-python3}"
wheels="${WHEELS:-.whl}"
# shellcheck source=benchmarks/gpu/install_wheels.sh
source "${repo}/benchmarks/gpu/install_wheels.sh" || exit 1
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
if [[ "${1:-}" == "--dry-run" ]]; then
  args=(--preset tiny --lengths 512 2048 --chunk 256 --decode-tokens 4 --batch 2 --prompt-tokens 64 --new-tokens 4)
  slug="dry-run"
else
  args=(--preset internvl2_2b --lengths 32768 131072 262144 1048576 --chunk 16384 --decode-tokens 16
        --batch 8 --prompt-tokens 512 --new-tokens 32)
  gpu="$("${python}" -c 'import torch; print(torch.cuda.get_device_name(0))')" || {
    echo "no CUDA GPU visible to ${python}" >&2
    exit 1
  }
  slug="$(tr '[:upper:]' '[:lower:]' <<<"${gpu}" | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')"
fi
results="benchmarks/results/$(date -u +%F)-${slug}-long-prefill"
mkdir -p benchmarks/results
command_line="${python} benchmarks/eval_throughput.py ${args[*]} --json ${results}.json"
{
  echo "# Long-prompt inference, $(date -u '+%F %H:%M UTC')"
  echo
  echo "Command, from the repository root: \`bash benchmarks/gpu/long_prefill.sh${1:+ $1}\`, which runs"
  echo "\`${command_line}\`"
  echo
  echo "- $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
  echo "- commit $(git rev-parse --short HEAD 2>/dev/null)"
  echo
  echo '```'
} >"${results}.md"
PYTHONUNBUFFERED=1 ${command_line} 2>&1 | grep -v -i 'warn' | tee -a "${results}.md"
rc=${PIPESTATUS[0]}
echo '```' >>"${results}.md"
((rc == 0)) || echo "**exit status ${rc}**" >>"${results}.md"
if [[ -n "${OUT:-}" ]]; then
  cp "${results}".* "${OUT}/" 2>/dev/null
fi
echo "results: ${results}.md"
exit "${rc}"
