#!/usr/bin/env bash
# A throw-away one-node SLURM cluster on this machine (tests, CI, trying the sbatch templates).
#
#   tools/slurm_local.sh          # install slurm-wlm + munge if missing, start, wait for the node (idempotent)
#   tools/slurm_local.sh stop     # cancel jobs, stop the daemons (and munged if this script started it)
#
# Needs root and apt-get (Debian/Ubuntu). No systemd, cgroups or slurmdbd: node "localhost" at
# 127.0.0.1, partition "debug", state in /var/spool/slurm{ctld,d}, logs in /var/log/slurm.
# Job state comes from `squeue -t all` / `scontrol show job` (kept MinJobAge=3600 s); no sacct.
set -euo pipefail

NODE=localhost
ADDR=127.0.0.1
PARTITION=debug
CONF=/etc/slurm/slurm.conf
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
LOG_DIR=/var/log/slurm
MUNGE_MARK=/run/munge/.started-by-kdscale
MARKER="# generated-by: kdscale tools/slurm_local.sh"

die() { echo "slurm_local: $*" >&2; exit 1; }

# alive PIDFILE: the daemon in PIDFILE runs (a zombie left for PID 1 to reap counts as dead).
alive() {
  local pid state
  [[ -r $1 ]] || return 1
  pid=$(<"$1")
  [[ -r /proc/$pid/stat ]] || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [[ -n $state && $state != Z ]]
}

wait_pidfile() {  # a daemon writes its PID file a moment after forking
  for _ in $(seq 100); do alive "$1" && return 0; sleep 0.1; done
  die "no live daemon in $1 after 10 s (see $LOG_DIR)"
}

stop_pidfile() {  # stop_pidfile FILE: SIGTERM, wait up to 10 s, then SIGKILL
  alive "$1" || { rm -f "$1"; return 0; }
  local pid; pid=$(<"$1")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do alive "$1" || break; sleep 0.1; done
  alive "$1" && kill -KILL "$pid" 2>/dev/null || true
  rm -f "$1"
}

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return 0
  command -v apt-get >/dev/null || die "slurm-wlm is not installed and apt-get is not available"
  local apt=(apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends slurm-wlm munge)
  export DEBIAN_FRONTEND=noninteractive
  "${apt[@]}" >/dev/null || { apt-get -o DPkg::Lock::Timeout=300 update -qq && "${apt[@]}" >/dev/null; } \
    || die "apt-get install slurm-wlm munge failed"
}

start_munge() {
  install -d -o munge -g munge -m 0755 /run/munge
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    [[ -s /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create >/dev/null
    runuser -u munge -- munged --force
    touch "$MUNGE_MARK"
    for _ in $(seq 50); do munge -n | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
    die "munged did not start"
  fi
}

# The node's hardware as `slurmd -C` reports it, renamed to $NODE and pinned to $ADDR.
node_line() {
  local hw
  hw=$(slurmd -C 2>/dev/null | head -1 | sed -E 's/^NodeName=[^ ]+ //; s/ ?UpTime=.*//') || true
  [[ $hw == *CPUs=* ]] || hw="CPUs=$(nproc) RealMemory=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 ))"
  echo "NodeName=$NODE NodeAddr=$ADDR $hw State=UNKNOWN"
}

render_conf() {
  cat <<CONF
$MARKER
ClusterName=kdscale-local
SlurmctldHost=$NODE($ADDR)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# 0: start a job at once instead of holding it for the next 3-s scheduling pass.
SchedulerParameters=batch_sched_delay=0
# Reject jobs that can never fit at submission instead of leaving them PENDING forever.
EnforcePartLimits=ALL
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
MinJobAge=3600
ReturnToService=2
KillWait=5
InactiveLimit=0
Waittime=0
MailProg=/bin/true
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$SPOOL_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
$(node_line)
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

write_conf() {  # prints "changed" when the file was (re)written
  local new; new=$(render_conf)
  [[ -f $CONF && $(<"$CONF") == "$new" ]] && return 0
  mkdir -p "$(dirname "$CONF")"
  if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then cp "$CONF" "$CONF.bak.$(date +%s)"; fi
  printf '%s\n' "$new" >"$CONF"
  echo changed
}

wait_idle() {
  local deadline=$((SECONDS + 60)) state
  while ((SECONDS < deadline)); do
    alive "$STATE_DIR/slurmctld.pid" || { tail -5 "$LOG_DIR/slurmctld.log" >&2; die "slurmctld died"; }
    alive "$SPOOL_DIR/slurmd.pid" || { tail -5 "$LOG_DIR/slurmd.log" >&2; die "slurmd died"; }
    state=$(timeout 3 sinfo -h -N -n "$NODE" -o %T 2>/dev/null || true)
    case $state in
      idle|mixed|allocated) return 0 ;;
      down*|drain*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.2
  done
  tail -5 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2
  die "node $NODE not idle after 60 s (state: ${state:-none})"
}

start() {
  [[ $(id -u) == 0 ]] || die "must run as root"
  install_packages
  start_munge
  install -d -o slurm -g slurm "$STATE_DIR" "$LOG_DIR"
  install -d "$SPOOL_DIR"
  if [[ $(write_conf) == changed ]]; then
    stop_pidfile "$SPOOL_DIR/slurmd.pid"
    stop_pidfile "$STATE_DIR/slurmctld.pid"
  fi
  alive "$STATE_DIR/slurmctld.pid" || { slurmctld; wait_pidfile "$STATE_DIR/slurmctld.pid"; }
  alive "$SPOOL_DIR/slurmd.pid" || { slurmd -N "$NODE"; wait_pidfile "$SPOOL_DIR/slurmd.pid"; }
  wait_idle
  echo "slurm_local: node $NODE idle (partition $PARTITION)"
}

stop() {
  if alive "$STATE_DIR/slurmctld.pid"; then
    squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
  fi
  stop_pidfile "$SPOOL_DIR/slurmd.pid"
  stop_pidfile "$STATE_DIR/slurmctld.pid"
  if [[ -f $MUNGE_MARK ]]; then
    stop_pidfile /run/munge/munged.pid
    rm -f "$MUNGE_MARK"
  fi
  echo "slurm_local: stopped"
}

case ${1:-start} in
  start) start ;;
  stop) stop ;;
  *) die "usage: $0 [start|stop]" ;;
esac
