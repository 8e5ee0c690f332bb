#!/usr/bin/env bash
# The Transformer Engine check, prepared to run in under 8 minutes on one Hopper GPU (H100/H200):
#   1. installs megatron-core (carried wheels) and the offline Transformer Engine bundle;
#   2. runs the bundle's own smoke test (TE linears, FP8 recipes, fused attention);
#   3. runs the gpu-marked tests with TE present (TE spec vs local spec, InternViT TE spec, TE attention
#      on packed V2PE batches vs the torch backend, FP8 training tracking bf16, ...);
#   4. measures the InternVL2-2B-shaped step at 8K and 32K packs with the `te` spec in bf16 (full
#      recompute as the torch baseline did; selective recompute with the chunked loss) and under each
#      FP8 recipe (step ms, tokens/s, TFLOP/s, MFU against the dense bf16 and FP8 peaks, peak memory,
#      V2PE share).
# Everything goes to benchmarks/results/<date>-<gpu>-te.md (and to $OUT, when that is set), with the
# command and the Transformer Engine version.
#
# Run from the repository root's parent or anywhere, on the GPU machine:
#   bash benchmarks/gpu/check_te.sh [--bundle DIR] [--wheels DIR] [--dry-run]
# --bundle: the Transformer Engine bundle (install_te.sh, te_smoke.py, SHA256SUMS; default .te_bundle,
#   a copy carried next to the checkout, never committed). --wheels: as for check.sh (default .whl).
# --dry-run: on a CPU host, check everything short of the GPU: the bundle's checksums and scripts, the
#   wheels, the selection of gpu-marked tests, each benchmark on tiny shapes, and the time budget; the
#   results go to a temporary file.
# Exits non-zero when a step fails; later steps still run.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "${repo}" || exit 1
# shellcheck source=benchmarks/gpu/lib.sh
. benchmarks/gpu/lib.sh
bundle=.te_bundle
te_site=/tmp/te_site
budget_s=420 # of the 8 minutes: installs and start-up take the rest
parse_args "bash benchmarks/gpu/check_te.sh [--bundle DIR] [--wheels DIR] [--dry-run]" "$@"

# check_bundle: the bundle's files are there and intact (before anything is installed).
check_bundle() {
  local file
  for file in install_te.sh te_smoke.py SHA256SUMS; do
    if [[ ! -f "${bundle}/${file}" ]]; then
      echo "no ${file} in the Transformer Engine bundle '${bundle}'; pass --bundle DIR, the folder of the offline Transformer Engine build" >&2
      return 1
    fi
  done
  (cd "${bundle}" && sha256sum --quiet -c SHA256SUMS) || {
    echo "the bundle '${bundle}' does not match its SHA256SUMS; copy it again" >&2
    return 1
  }
  bash -n "${bundle}/install_te.sh"
}

# install_te: unpack the bundle and put Transformer Engine on the paths (te_env.sh).
install_te() {
  bash "${bundle}/install_te.sh" --target "${te_site}" --python "${python}" >/tmp/te_install.log 2>&1 || {
    tail -n 20 /tmp/te_install.log >&2
    return 1
  }
  # shellcheck disable=SC1091  # written by install_te.sh
  . "${te_site}/te_env.sh"
}

check_bundle || exit 1
# shellcheck source=benchmarks/gpu/install_wheels.sh
source benchmarks/gpu/install_wheels.sh || exit 1
if ((dry_run)); then
  compgen -G "${wheels}/*.whl" >/dev/null || echo "note: no wheels in '${wheels}'; the GPU host needs them" >&2
  te_version="(not installed in a dry run: the bundle is built for the GPU host's torch)"
else
  install_te || exit 1
  te_version="$("${python}" -c 'import torch, transformer_engine as te; print(te.__version__)')" || {
    echo "Transformer Engine does not import after installing the bundle; see /tmp/te_install.log" >&2
    exit 1
  }
fi
gpu="$(device_name)" || exit 1
results="$(results_file -te)"
write_header "Transformer Engine check on ${gpu}" "bash benchmarks/gpu/check_te.sh --bundle ${bundle} --wheels ${wheels}"
echo "- Transformer Engine ${te_version} (offline bundle, $(basename "$(cd "${bundle}" && pwd)"))" >>"${results}"
echo >>"${results}"

out="${OUT:-/tmp}"
bench=("${python}" benchmarks/gpu/bench_step.py --spec te --tokens 8192 32768 --repeats 3)
tiny="--preset tiny --tokens 1024 --repeats 1 --fp8 none"
best=(--recompute selective --loss-chunk 4096)
run_step "Transformer Engine smoke test (the bundle's)" 60 - "${python}" "${bundle}/te_smoke.py" --json "${out}/te_smoke.json"
run_step "gpu-marked tests, with Transformer Engine" 120 "--collect-only" \
  "${python}" -m pytest -q -m gpu -p no:cacheprovider -rs tests
run_step "2B step, te spec, bf16, full recompute" 45 "${tiny}" "${bench[@]}" --recompute full
run_step "2B step, te spec, bf16, selective recompute, chunked loss" 45 "${tiny}" "${bench[@]}" "${best[@]}"
for recipe in delayed tensorwise blockwise; do
  run_step "2B step, te spec, FP8 ${recipe}, selective recompute, chunked loss" 45 "${tiny}" \
    "${bench[@]}" "${best[@]}" --fp8 "${recipe}"
done
check_budget "${budget_s}"
finish
