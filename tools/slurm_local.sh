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
# shellcheck source=tools/slurm_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/slurm_lib.sh"

start_munge() {
  install -d -o munge -g munge -m 0755 /run/munge
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    munge_key
    runuser -u munge -- munged --force
    touch "$MUNGE_MARK"
    for _ in $(seq 50); do munge -n | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
    die "munged did not start"
  fi
}

render_conf() {
  cat <<CONF
$MARKER
ClusterName=kdscale-local
SlurmctldHost=$NODE($ADDR)
$(slurm_conf_common "$LOG_DIR/jobcomp.log" "StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$SPOOL_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log")
NodeName=$NODE NodeAddr=$ADDR $(node_hardware) State=UNKNOWN
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
