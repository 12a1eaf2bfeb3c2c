#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for RelayMD's tests and for trying the `slurm`
# provider: `dev-cluster.sh up` installs Debian's slurm-wlm + munge when missing and starts
# munged, slurmctld and slurmd by hand (no systemd needed); `down` stops them by pid file;
# `status` prints sinfo. Idempotent: `up` on a running cluster changes nothing, and a changed
# slurm.conf restarts slurmctld (its saved job state survives). Needs root (as CI is).
# SLURM_DEV_SPOOL / SLURM_DEV_LOG move its state and logs; `down --purge` forgets all jobs.
set -euo pipefail
SPOOL=${SLURM_DEV_SPOOL:-/var/spool/relaymd-slurm}
LOG=${SLURM_DEV_LOG:-/var/log/relaymd-slurm}
NODE=$(hostname -s)   # slurmctld accepts only its own short hostname as SlurmctldHost

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
wait_for() {  # tries, then a command; true once the command succeeds
  local n=$1; shift
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}

install_packages() {
  local pkgs="slurmctld slurmd slurm-client munge"
  dpkg -s $pkgs >/dev/null 2>&1 && return 0
  [ "$(id -u)" = 0 ] || { echo "dev-cluster: installing SLURM needs root" >&2; exit 2; }
  export DEBIAN_FRONTEND=noninteractive
  ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1 || apt-get update -qq
  apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
}

start_munge() {
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
  munge_ok && return 0
  runuser -u munge -- /usr/sbin/munged
  wait_for 50 munge_ok || { echo "dev-cluster: munged did not start" >&2; exit 1; }
}

write_conf() {  # prints 1 when slurm.conf changed
  local mem new=/etc/slurm/slurm.conf.relaymd-new
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  mkdir -p /etc/slurm
  cat >"$new" <<CONF
# Written by RelayMD's deploy/slurm/dev-cluster.sh: one node, root, no cgroups, no accounting.
ClusterName=relaymd-dev
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldPidFile=$SPOOL/slurmctld.pid
SlurmdPidFile=$SPOOL/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=300
KillWait=30
SlurmdTimeout=30
SlurmctldTimeout=30
InactiveLimit=0
MpiDefault=none
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
  if cmp -s "$new" /etc/slurm/slurm.conf 2>/dev/null; then rm -f "$new"; echo 0
  else mv "$new" /etc/slurm/slurm.conf; echo 1; fi
}

node_ready() { case "$(sinfo -h -N -o %T 2>/dev/null | head -1)" in idle|mixed|allocated) return 0;; esac; return 1; }

up() {
  install_packages
  mkdir -p "$SPOOL/ctld" "$SPOOL/d" "$LOG"
  start_munge
  local changed pid
  changed=$(write_conf)
  if [ "$changed" = 1 ] && running "$SPOOL/slurmctld.pid"; then
    pid=$(cat "$SPOOL/slurmctld.pid"); kill "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  fi
  running "$SPOOL/slurmctld.pid" || slurmctld
  wait_for 100 sh -c 'scontrol ping | grep -q UP' || { echo "dev-cluster: slurmctld is not up; see $LOG/slurmctld.log" >&2; exit 1; }
  if [ "$changed" = 1 ] && running "$SPOOL/slurmd.pid"; then scontrol reconfigure; fi
  running "$SPOOL/slurmd.pid" || slurmd
  for _ in $(seq 150); do node_ready && break; sleep 0.2; done
  case "$(sinfo -h -N -o %T)" in down*|drain*) scontrol update NodeName="$NODE" State=RESUME;; esac
  node_ready || { echo "dev-cluster: node $NODE is not ready; see $LOG/slurmd.log" >&2; exit 1; }
  sinfo -N -o '%N %T %c %m'
}

stop_pid() {
  [ -s "$1" ] || return 0
  local pid; pid=$(cat "$1")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$1"
}

down() {
  scancel --quiet --user="$(id -un)" 2>/dev/null || true
  stop_pid "$SPOOL/slurmd.pid"
  stop_pid "$SPOOL/slurmctld.pid"
  stop_pid /run/munge/munged.pid
  [ "${1:-}" = "--purge" ] && rm -rf "$SPOOL"
  return 0
}

case "${1:-}" in
  up) up ;;
  down) shift; down "$@" ;;
  status) sinfo -N -o '%N %T %c %m' && squeue ;;
  *) echo "usage: $0 up | down [--purge] | status" >&2; exit 2 ;;
esac
