# shellcheck shell=bash
# shellcheck disable=SC2154,SC2034  # results and gpu are set by the caller; wheels is read by install_wheels.sh
# Shared by the GPU check scripts (sourced): arguments, the results file, timed steps (the carried
# wheels: install_wheels.sh).
# Defaults: python ($PYTHON or python3), wheels (.whl), dry_run (0); the caller sets results (the
# results file) and gpu.
#
# A step runs with its own time limit and appends its command and output to the results file. Under
# --dry-run (on a CPU host) a step runs a tiny stand-in instead: the same command with CPU arguments
# appended (argparse keeps the last value of a repeated flag), or, where nothing of it can run without
# a GPU, it is only listed. Either way its GPU limit counts towards the planned total.

python="${PYTHON:-python3}"
wheels=.whl
dry_run=0
status=0
planned_s=0

# parse_args USAGE ARGS...: --wheels DIR, --dry-run and, where the caller has set bundle, --bundle DIR.
parse_args() {
  local usage="$1"
  shift
  while (($#)); do
    case "$1" in
    --wheels) wheels="${2:?--wheels needs a directory}" && shift ;;
    --dry-run) dry_run=1 ;;
    *)
      if [[ "$1" != --bundle || -z "${bundle+set}" ]]; then
        echo "unknown argument '$1'; usage: ${usage}" >&2
        exit 2
      fi
      bundle="${2:?--bundle needs a directory}" && shift
      ;;
    esac
    shift
  done
}

# results_file NAME_SUFFIX: benchmarks/results/<date>-<gpu><suffix>.md, or a temporary file under --dry-run.
results_file() {
  if ((dry_run)); then
    mktemp -t "dry-run$1-XXXX.md"
  else
    mkdir -p benchmarks/results
    echo "benchmarks/results/$(date -u +%F)-$(slug "${gpu}")$1.md"
  fi
}

# device_name: the GPU's name ("CPU dry run" under --dry-run); fails without a CUDA GPU.
device_name() {
  if ((dry_run)); then
    echo "CPU dry run"
    return 0
  fi
  "${python}" -c 'import torch; print(torch.cuda.get_device_name(0))' || {
    echo "no CUDA GPU visible to ${python}" >&2
    return 1
  }
}

# slug NAME: lower-case words joined by dashes ("NVIDIA H200" -> nvidia-h200).
slug() {
  tr '[:upper:]' '[:lower:]' <<<"$1" | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//'
}

# write_header TITLE COMMAND: the first lines of the results file (machine, versions, commit).
write_header() {
  {
    echo "# $1, $(date -u '+%F %H:%M UTC')"
    echo
    echo "Command, from the repository root: \`$2\`"
    echo
    if ! ((dry_run)); then
      echo "- $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
    fi
    echo "- $("${python}" -c 'import platform, torch, triton, megatron.core as m
print(f"python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, megatron-core {m.__version__}")')"
    local commit
    if commit="$(git rev-parse --short HEAD 2>/dev/null)"; then
      git diff --quiet HEAD 2>/dev/null || commit+=" with local changes"
      echo "- commit ${commit}"
    fi
    echo
  } >"${results}"
}

# run_step TITLE LIMIT CPU_ARGS COMMAND...: run COMMAND for at most LIMIT seconds. CPU_ARGS: what
# --dry-run appends to COMMAND to run it on a CPU ("-": list it only).
run_step() {
  local title="$1" limit="$2" cpu_args="$3"
  shift 3
  planned_s=$((planned_s + limit))
  local command=("$@")
  if ((dry_run)); then
    if [[ "${cpu_args}" == "-" ]]; then
      printf "## %s (%s s on the GPU)\n\n\`%s\`\n\nlisted only: needs the GPU\n\n" "${title}" "${limit}" "$*" \
        >>"${results}"
      return 0
    fi
    local extra=()
    read -r -a extra <<<"${cpu_args}"
    command+=("${extra[@]}")
    limit="${DRY_RUN_LIMIT:-900}"
  fi
  printf "## %s\n\n\`%s\`\n\n\`\`\`\n" "${title}" "${command[*]}" >>"${results}"
  echo "== ${title} (limit ${limit} s)" >&2
  PYTHONUNBUFFERED=1 timeout "${limit}" "${command[@]}" 2>&1 | tee -a "${results}"
  local rc="${PIPESTATUS[0]}"
  printf "\`\`\`\n\n" >>"${results}"
  if ((rc != 0)); then
    printf '**%s: exit status %s%s**\n\n' "${title}" "${rc}" "$( ((rc == 124)) && echo " (timed out after ${limit} s)")" \
      >>"${results}"
    status=1
  fi
}

# check_budget SECONDS: fail when the steps' GPU limits add up to more.
check_budget() {
  echo "planned GPU time: ${planned_s} s of the steps' limits (budget $1 s)" | tee -a "${results}"
  if ((planned_s > $1)); then
    echo "the steps' limits add up to ${planned_s} s, over the $1 s budget: shorten them" >&2
    status=1
  fi
}

# finish: copy the results to $OUT (when set), say where they are, exit with the status.
finish() {
  if [[ -n "${OUT:-}" ]]; then
    cp "${results}" "${OUT}/"
  fi
  echo "results: ${results}"
  exit "${status}"
}
