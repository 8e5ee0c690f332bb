# shellcheck shell=bash
# What every job in this directory shares; sourced by the sbatch scripts (it runs nothing by itself).
#
#   v2pe_setup            go to the repository, export the rendezvous, thread and NCCL environment, choose
#                         between the container and bare metal, print a summary to the job log
#   v2pe_srun CMD...      run CMD as one task per allocated task slot (one per GPU) and wait for it,
#                         passing preemption signals on to the tasks
#   v2pe_requeue_if_timed_out
#                         after a step that stopped because the time limit came near: requeue the job
#
# Processes: srun starts --ntasks-per-node tasks on every node; each task exports RANK, WORLD_SIZE and
# LOCAL_RANK from SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID and execs CMD, so the training driver
# sees the environment torchrun would give it. Rank 0 listens on MASTER_ADDR (the first node of the
# allocation) at MASTER_PORT (derived from the job id, so jobs sharing a node do not collide, and the
# same after a requeue). Tasks must see all GPUs of their node (LOCAL_RANK picks one): do not add
# --gpus-per-task or --gpu-bind to the step.
#
# Environment (set before sbatch; sbatch passes the submitting shell's environment on):
#   V2PE_ROOT              the repository checkout, on a file system the nodes share
#                          (default: the directory sbatch was called from)
#   V2PE_CONTAINER_IMAGE   image for pyxis/enroot: a .sqsh file or a registry reference such as
#                          nvcr.io#nvidia/pytorch:25.06-py3 (docker/README.md builds one with this package)
#   V2PE_CONTAINER_MOUNTS  more mounts, pyxis syntax: /data:/data,/ckpt:/ckpt (the checkout is always
#                          mounted at its own path, and the job runs from it)
#   V2PE_USE_CONTAINER     auto (default: the container when an image is given), 1 (require one), 0 (bare
#                          metal, with the Python of the submitting environment)
#   V2PE_PYTHON            the interpreter (default: python3 from PATH; the container's own in a container)
#   NCCL_IB_HCA, NCCL_SOCKET_IFNAME, NCCL_IB_GID_INDEX, NCCL_IB_TIMEOUT ...
#                          cluster specific and passed through untouched: NCCL finds InfiniBand HCAs by
#                          itself; name them (e.g. NCCL_IB_HCA=mlx5_0,mlx5_1,...) to leave out a storage
#                          NIC, name the bootstrap interface where the default route is not the fabric,
#                          and set the GID index on RoCE. The job log lists every NCCL_* variable in force.

v2pe_setup() {
  : "${SLURM_JOB_ID:?v2pe_setup runs inside a Slurm job (sbatch)}"
  V2PE_ROOT="${V2PE_ROOT:-${SLURM_SUBMIT_DIR}}"
  if [[ ! -f "${V2PE_ROOT}/megatron_v2pe/__init__.py" ]]; then
    echo "v2pe: ${V2PE_ROOT} is not the megatron_v2pe checkout; set V2PE_ROOT or submit from the checkout" >&2
    return 2
  fi
  cd "${V2PE_ROOT}" || return
  export V2PE_ROOT

  # Rendezvous for torch.distributed (env:// initialisation).
  local nodes
  mapfile -t nodes < <(scontrol show hostnames "${SLURM_JOB_NODELIST}")
  export MASTER_ADDR="${nodes[0]}"
  export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"

  # srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05); each rank gets its share of cores.
  if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
    export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK}"
  fi
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
  # The checkout's code runs, in the container too (it comes first on the path), also for tools/ scripts.
  export PYTHONPATH="${V2PE_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
  export PYTHONUNBUFFERED=1
  # Everything the job needs is on disk: tokenizers and configs come from paths, never from a hub.
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

  # Megatron overlaps tensor/sequence-parallel communication with compute by issuing kernels in order on
  # a single hardware queue.
  export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  # Frees NCCL buffers when the collective ends instead of through the caching allocator's stream
  # tracking (lower peak memory in long-context steps).
  export TORCH_NCCL_AVOID_RECORD_STREAMS="${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"
  # Triton kernels (the fused V2PE rotary) compile once per node, not into a shared home directory.
  export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton-cache-$(id -u)}"

  V2PE_SRUN_ARGS=(--kill-on-bad-exit=1)
  case "${V2PE_USE_CONTAINER:-auto}" in
    auto) V2PE_USE_CONTAINER=$([[ -n "${V2PE_CONTAINER_IMAGE:-}" ]] && echo 1 || echo 0) ;;
    0 | 1) ;;
    *) echo "v2pe: V2PE_USE_CONTAINER is '${V2PE_USE_CONTAINER}'; use auto, 1 or 0" >&2; return 2 ;;
  esac
  if ((V2PE_USE_CONTAINER)); then
    : "${V2PE_CONTAINER_IMAGE:?V2PE_USE_CONTAINER=1 needs V2PE_CONTAINER_IMAGE}"
    local mounts="${V2PE_ROOT}:${V2PE_ROOT}${V2PE_CONTAINER_MOUNTS:+,${V2PE_CONTAINER_MOUNTS}}"
    V2PE_SRUN_ARGS+=(
      --container-image="${V2PE_CONTAINER_IMAGE}"
      --container-mounts="${mounts}"
      --container-workdir="${V2PE_ROOT}"
      --no-container-mount-home
    )
    V2PE_PYTHON="${V2PE_PYTHON:-python}"
  else
    V2PE_PYTHON="${V2PE_PYTHON:-python3}"
  fi
  export V2PE_PYTHON

  echo "v2pe: job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}), restart ${SLURM_RESTART_COUNT:-0}," \
    "${SLURM_JOB_NUM_NODES} node(s) ${SLURM_JOB_NODELIST}, ${SLURM_NTASKS} task(s)," \
    "rendezvous ${MASTER_ADDR}:${MASTER_PORT}"
  if ((V2PE_USE_CONTAINER)); then
    echo "v2pe: container ${V2PE_CONTAINER_IMAGE}, mounts ${mounts}"
  else
    echo "v2pe: bare metal, $(command -v "${V2PE_PYTHON}" || echo "${V2PE_PYTHON} (not on this node's PATH)")"
  fi
  env | grep -E '^NCCL_' | sort | sed 's/^/v2pe: /' || true
}

# Signals, and how they reach the tasks (the driver: finish the step, save a checkpoint, exit 0):
#   USR1 to this batch shell   #SBATCH --signal=B:USR1@<seconds> before the time limit, or by hand with
#                              'scancel --batch --signal=USR1 JOB': passed to srun, which passes it to every
#                              task; the job is requeued afterwards (v2pe_requeue_if_timed_out).
#   USR1 or TERM to the tasks  'scancel --signal=USR1 JOB' (checkpoint and stop, no requeue), 'scancel JOB'
#                              (TERM, then KILL after the cluster's KillWait), or Slurm's own preemption
#                              (TERM, then KILL after the partition's GraceTime; Slurm requeues). The shell only has to outlive the step: it waits and passes the
#                              signal on, which reaches a task at most twice and is harmless.
v2pe_srun() {
  V2PE_TIMED_OUT=0
  # The single quotes are intended: the variables expand inside each task, not here.
  # shellcheck disable=SC2016
  srun "${V2PE_SRUN_ARGS[@]}" bash -c \
    'export RANK="${SLURM_PROCID}" WORLD_SIZE="${SLURM_NTASKS}" LOCAL_RANK="${SLURM_LOCALID}"; exec "$@"' \
    v2pe-task "$@" &
  V2PE_STEP_PID=$!
  trap 'V2PE_TIMED_OUT=1; echo "v2pe: USR1: stopping the step for a requeue"; kill -USR1 "${V2PE_STEP_PID}" 2>/dev/null || true' USR1
  trap 'echo "v2pe: TERM: stopping the step"; kill -TERM "${V2PE_STEP_PID}" 2>/dev/null || true' TERM
  local status
  # 'wait' returns early when a trapped signal arrives; keep waiting until the step has really ended.
  while :; do
    status=0
    wait "${V2PE_STEP_PID}" || status=$?
    kill -0 "${V2PE_STEP_PID}" 2>/dev/null || break
  done
  trap - USR1 TERM
  echo "v2pe: step exited with status ${status}"
  return "${status}"
}

v2pe_requeue_if_timed_out() {
  if ((V2PE_TIMED_OUT)); then
    echo "v2pe: requeueing job ${SLURM_JOB_ID}; it resumes from the checkpoint just saved"
    scontrol requeue "${SLURM_JOB_ID}"
  fi
}
