#!/usr/bin/env bash
# A one-node Slurm on this host, for tests/slurm/test_slurm.py (and for trying the launchers by hand).
#
#   tests/slurm/start_slurm.sh [STATE_DIR]          install if needed, start, wait until the node is idle
#   tests/slurm/start_slurm.sh --stop [STATE_DIR]   stop the daemons this script started
#   export SLURM_CONF=STATE_DIR/slurm.conf          then sbatch / squeue / scontrol talk to it
#
# STATE_DIR defaults to /tmp/v2pe-slurm. Needs root on Debian or Ubuntu: installs slurm-wlm and munge with
# apt-get when they are missing, then runs munged, slurmctld and slurmd directly (no systemd), with
# everything Slurm writes (config, state, spool, logs, pid files) under STATE_DIR. The system's
# /etc/slurm is not touched and the daemons listen on non-default ports, so a Slurm already installed
# on the host keeps working.
#
# The node: this host (its short name, at 127.0.0.1) with all its CPUs, one partition 'debug'.
# No cgroups (proctrack/linuxproc, task/none) so it also runs inside an unprivileged container, and
# no accounting daemon: finished jobs stay visible to 'scontrol show job' for MinJobAge (1 hour).
#
# Exit status: 0 when Slurm is up, 3 when this host cannot run it (the reason is printed), 1 otherwise.
set -euo pipefail

stop=0
if [[ "${1:-}" == "--stop" ]]; then
  stop=1
  shift
fi
state_dir="${1:-/tmp/v2pe-slurm}"
conf="${state_dir}/slurm.conf"
export SLURM_CONF="${conf}"

cannot_run() {
  echo "start_slurm.sh: cannot run Slurm on this host: $*" >&2
  exit 3
}

stop_daemon() {
  local pidfile="$1" pid
  [[ -s "${pidfile}" ]] || return 0
  pid="$(<"${pidfile}")"
  if kill -0 "${pid}" 2>/dev/null; then
    kill "${pid}"
    for _ in $(seq 50); do
      kill -0 "${pid}" 2>/dev/null || break
      sleep 0.1
    done
  fi
  rm -f "${pidfile}"
}

if ((stop)); then
  stop_daemon "${state_dir}/slurmd.pid"
  stop_daemon "${state_dir}/slurmctld.pid"
  stop_daemon "${state_dir}/munged.pid"
  exit 0
fi

# --- Install -------------------------------------------------------------------------------------------

[[ "$(id -u)" == 0 ]] || cannot_run "needs root (it starts munged, slurmctld and slurmd); running as $(id -un)"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
  || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || cannot_run "Slurm is not installed and there is no apt-get to install slurm-wlm"
  echo "start_slurm.sh: installing slurm-wlm and munge" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# --- munge ---------------------------------------------------------------------------------------------

mkdir -p "${state_dir}"
host="$(hostname -s)"
# Jobs rendezvous at the node's name (MASTER_ADDR comes from the node list), so it must resolve.
if ! getent hosts "${host}" >/dev/null; then
  echo "start_slurm.sh: this host's name '${host}' does not resolve; add it to /etc/hosts" >&2
  exit 1
fi
munge_socket="/run/munge/munge.socket.2"
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --keyfile=/etc/munge/munge.key
  fi
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 0700 /etc/munge
  chmod 0600 /etc/munge/munge.key
  chmod 0755 /run/munge
  rm -f "${munge_socket}"
  runuser -u munge -- /usr/sbin/munged --socket="${munge_socket}" --pid-file=/run/munge/munged.pid
  cp /run/munge/munged.pid "${state_dir}/munged.pid"
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.1
  done
  munge -n | unmunge >/dev/null || { echo "start_slurm.sh: munged does not answer" >&2; exit 1; }
fi

# --- Slurm ---------------------------------------------------------------------------------------------

mkdir -p "${state_dir}/state" "${state_dir}/spool"
cat >"${conf}.new" <<EOF
ClusterName=v2pe-test
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=${state_dir}/state
SlurmdSpoolDir=${state_dir}/spool
SlurmctldPidFile=${state_dir}/slurmctld.pid
SlurmdPidFile=${state_dir}/slurmd.pid
SlurmctldLogFile=${state_dir}/slurmctld.log
SlurmdLogFile=${state_dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MinJobAge=3600
KillWait=30
NodeName=${host} NodeAddr=127.0.0.1 CPUs=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
EOF
if [[ -f "${conf}" ]] && cmp -s "${conf}" "${conf}.new"; then
  rm "${conf}.new"
else
  # A new configuration needs fresh daemons.
  stop_daemon "${state_dir}/slurmd.pid"
  stop_daemon "${state_dir}/slurmctld.pid"
  mv "${conf}.new" "${conf}"
fi

running() { [[ -s "$1" ]] && kill -0 "$(<"$1")" 2>/dev/null; }
running "${state_dir}/slurmctld.pid" || slurmctld -f "${conf}"
running "${state_dir}/slurmd.pid" || slurmd -f "${conf}" -N "${host}"

# Up when the controller answers and the node takes jobs (idle, or busy with an earlier test's jobs).
for _ in $(seq 60); do
  node_state="$(sinfo --noheader --nodes="${host}" --format=%T 2>/dev/null || true)"
  case "${node_state}" in
    idle | mixed | allocated | completing) exit 0 ;;
    down* | drain*) scontrol update nodename="${host}" state=resume 2>/dev/null || true ;;
  esac
  sleep 0.5
done
echo "start_slurm.sh: the node did not become idle (state: '${node_state:-no answer}'); logs:" >&2
tail -n 20 "${state_dir}/slurmctld.log" "${state_dir}/slurmd.log" >&2 || true
exit 1
