# Shared by tools/slurm_local.sh (one node) and tools/local_cluster.sh (namespace hosts); sourced.
# Debian 12 slurm-wlm 22.05 + munge without systemd, cgroups or slurmdbd: see slurm/README.md.
# The sourcing script defines die().

# alive PIDFILE: the daemon in PIDFILE runs (a zombie left for PID 1 to reap counts as dead).
alive() {
  local pid state
  [[ -r $1 ]] || return 1
  pid=$(<"$1")
  [[ -n $pid && -r /proc/$pid/stat ]] || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [[ -n $state && $state != Z ]]
}

wait_pidfile() {  # wait_pidfile FILE LOG: a daemon writes its PID file a moment after forking
  for _ in $(seq 100); do alive "$1" && return 0; sleep 0.1; done
  [[ -r ${2:-} ]] && tail -5 "$2" >&2
  die "no live daemon in $1 after 10 s (log: ${2:-none})"
}

stop_pidfile() {  # stop_pidfile FILE: SIGTERM, wait up to 10 s, then SIGKILL
  alive "$1" || { rm -f "$1"; return 0; }
  local pid; pid=$(<"$1")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do alive "$1" || break; sleep 0.1; done
  alive "$1" && kill -KILL "$pid" 2>/dev/null || true
  rm -f "$1"
}

install_packages() {  # slurm-wlm + munge from apt (Recommends are not needed)
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return 0
  command -v apt-get >/dev/null || die "slurm-wlm is not installed and apt-get is not available"
  local apt=(apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends slurm-wlm munge)
  export DEBIAN_FRONTEND=noninteractive
  "${apt[@]}" >/dev/null || { apt-get -o DPkg::Lock::Timeout=300 update -qq && "${apt[@]}" >/dev/null; } \
    || die "apt-get install slurm-wlm munge failed"
}

munge_key() {  # the one key every munged of this machine uses (made by the Debian postinst)
  [[ -s /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create >/dev/null
}

# This machine's hardware as `slurmd -C` reports it, without the node name and uptime.
node_hardware() {
  local hw
  hw=$(slurmd -C 2>/dev/null | head -1 | sed -E 's/^NodeName=[^ ]+ //; s/ ?UpTime=.*//') || true
  [[ $hw == *CPUs=* ]] || hw="CPUs=$(nproc) RealMemory=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 ))"
  echo "$hw"
}

# slurm_conf_common JOBCOMP_LOG PATH_LINES: the slurm.conf body both set-ups share (munge auth, no
# cgroups or accounting, fast scheduling), with this set-up's state/spool/pid/log lines in place.
slurm_conf_common() {
  cat <<CONF
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
JobCompLoc=$1
MinJobAge=3600
ReturnToService=2
KillWait=5
InactiveLimit=0
Waittime=0
MailProg=/bin/true
$2
SlurmctldDebug=info
SlurmdDebug=info
CONF
}
