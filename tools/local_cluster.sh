#!/usr/bin/env bash
# A multi-host cluster on this one Linux machine, for tests, CI and trying multi-node submissions.
#
#   tools/local_cluster.sh up [--hosts N]    # N >= 2 hosts (default 3); idempotent; KEY=VALUE lines
#   tools/local_cluster.sh status            # the same lines and one per host; exit 1 unless all up
#   tools/local_cluster.sh down [--force]    # stop what up started; remove every namespace and link
#   tools/local_cluster.sh exec HOST CMD...  # run CMD on HOST (as `ssh HOST CMD` would)
#   tools/local_cluster.sh kill HOST         # lose HOST: cut its link, SIGKILL its every process
#
# Each host (kdscale0 = the head, kdscale1 ...) is a network namespace with its own hostname (a UTS
# namespace), /etc/hosts and node-local /tmp (bind mounts of its own), on the bridge kdscale-br with
# address 10.77.0.(i+1)/24; this machine is 10.77.0.254 on the bridge (the "login node"). No host
# has a default route: traffic stays between the hosts and this machine. Everything else is the one
# disk, as a cluster's shared filesystem would be.
# Slurm: slurmctld on the head and a slurmd per host (NodeName = hostname, NodeAddr = address,
# partition debug), with their own slurm.conf, state, spool and logs under $KDSCALE_CLUSTER_DIR and
# their own munged on the machine's munge key; clients choose it with SLURM_CONF. Ray: `ray start
# --head` on the head (no CPUs: it holds drivers, not actors), `ray start --address` on every other
# host, on ports other than Ray's defaults (a Ray cluster inside a Slurm job keeps those), with
# health checks that declare a lost host dead 3-4 s after it is gone (README, "Multi-host").
# `up` prints the addresses to export:
#
#   HOSTS=kdscale0,kdscale1,kdscale2
#   SLURM_CONF=/run/kdscale-cluster/slurm/slurm.conf
#   RAY_ADDRESS=10.77.0.1:6390        # GCS: ray.init / kdscale cache --ray-address (on a host)
#   RAY_DASHBOARD=http://10.77.0.1:8275   # Jobs API: kdscale submit --launcher ray --address
#
# `up` after `kill HOST` (or any daemon's death) restarts what is missing. `down` stops the daemons
# by their PID files, SIGKILLs whatever still runs on the hosts (job steps, Ray workers), deletes
# the namespaces, links and the state directory; it also cleans up after a failed or interrupted
# `up`. Needs root, iproute2, util-linux; installs slurm-wlm and munge with
# apt-get if missing (tools/slurm_lib.sh); Ray comes from $KDSCALE_CLUSTER_BIN (default .venv/bin).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${KDSCALE_CLUSTER_DIR:-/run/kdscale-cluster}  # not under /tmp: each host has its own
PYBIN=${KDSCALE_CLUSTER_BIN:-$REPO/.venv/bin}
PREFIX=kdscale
SUBNET=10.77.0
LOGIN_ADDR=$SUBNET.254
BRIDGE=$PREFIX-br
PARTITION=debug
RAY_PORT=6390 RAY_DASH_PORT=8275 RAY_CLIENT_PORT=6391 RAY_AGENT_PORT=52375
WAIT_S=${KDSCALE_CLUSTER_WAIT_S:-120}
SLURM_DIR=$STATE/slurm
CONF=$SLURM_DIR/slurm.conf
MUNGE_DIR=$STATE/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
MARKER="# generated-by: kdscale tools/local_cluster.sh"
# Ray's GCS declares a host dead after 3 missed 1-s health checks (Ray's default: 5 × 3 s + 10 s).
RAY_ENV=(RAY_AUTH_MODE=disabled RAY_health_check_initial_delay_ms=1000 RAY_health_check_period_ms=1000
         RAY_health_check_timeout_ms=1000 RAY_health_check_failure_threshold=3)

die() { echo "local_cluster: $*" >&2; exit 1; }
note() { echo "local_cluster: $*" >&2; }
# shellcheck source=tools/slurm_lib.sh
source "$REPO/tools/slurm_lib.sh"

host_name() { echo "$PREFIX$1"; }
host_addr() { echo "$SUBNET.$(($1 + 1))"; }
host_link() { echo "$PREFIX$1-v"; }  # this machine's end of the host's veth pair (in the bridge)
host_index() { [[ $1 =~ ^$PREFIX([0-9]+)$ ]] && echo "${BASH_REMATCH[1]}" || die "no host named $1"; }
# The hosts that exist now, whatever state says (a failed `up` may have made only some of them).
existing_hosts() { ip netns list | awk '{print $1}' | grep -E "^$PREFIX[0-9]+$" | sort -V || true; }

# on_host HOST: ON_HOST becomes the prefix that runs a command in HOST's network, hostname,
# /etc/hosts and /tmp (daemons keep them). Run it as a simple command (so that `&` gives its PID)
# with 9>&- (fd 9 is the lock, which daemons must not hold).
# Shared folders under /tmp (the repo itself, when cloned there, and $KDSCALE_CLUSTER_SHARED, a
# colon-separated list) are bound into the host's /tmp at the same path, so that hosts still see them.
on_host() {
  local share=() binds="" path
  IFS=: read -r -a share <<<"$REPO:${KDSCALE_CLUSTER_SHARED:-}"
  for path in "${share[@]}"; do
    [[ -n $path ]] && path=$(realpath -m "$path") && [[ $path == /tmp/* ]] || continue
    binds+="mkdir -p \"\$0/tmp${path#/tmp}\" && mount --bind $(printf %q "$path") \"\$0/tmp${path#/tmp}\" && "
  done
  ON_HOST=(nsenter --net="/run/netns/$1" --uts="$STATE/uts/$1" -- unshare --mount --propagation slave --
           /bin/sh -c "$binds"'mount --rbind "$0/tmp" /tmp && mount --bind "$0/hosts" /etc/hosts && exec "$@"'
           "$STATE/$1")
}

# What daemons start with: a clean environment (no TMPDIR or SLURM_* of the caller), Ray's settings.
DAEMON_ENV=(env -i "PATH=$PYBIN:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" HOME=/root
            LANG=C.UTF-8 "${RAY_ENV[@]}")

# ---------------------------------------------------------------------------------- network

make_network() {  # make_network N: bridge, then per host: netns, UTS, veth, address, /etc/hosts, /tmp
  local n=$1 i host
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$LOGIN_ADDR/24" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
  mkdir -p "$STATE/uts"
  for ((i = 0; i < n; i++)); do
    host=$(host_name "$i")
    if ! ip netns list | grep -qE "^$host( |$)"; then
      ip netns add "$host"
      ip link add "$(host_link "$i")" type veth peer name eth0 netns "$host"
      ip link set "$(host_link "$i")" master "$BRIDGE"
      ip -n "$host" addr add "$(host_addr "$i")/24" dev eth0
      ip -n "$host" link set lo up
      ip -n "$host" link set eth0 up
    fi
    ip link set "$(host_link "$i")" up  # also brings back a host that `kill` cut off
    if ! mountpoint -q "$STATE/uts/$host"; then
      touch "$STATE/uts/$host"
      unshare --uts="$STATE/uts/$host" hostname "$host"
    fi
    install -d -m 1777 "$STATE/$host/tmp"
    hosts_file "$n" >"$STATE/$host/hosts"
  done
}

hosts_file() {
  echo "127.0.0.1 localhost"
  local i
  for ((i = 0; i < $1; i++)); do echo "$(host_addr "$i") $(host_name "$i")"; done
}

remove_network() {
  local host
  for host in $(existing_hosts); do
    ip netns del "$host" 2>/dev/null || true
  done
  for link in $(ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E "^$PREFIX[0-9]+-v$" || true); do
    ip link del "$link" 2>/dev/null || true  # left by a namespace that could not be deleted
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  if [[ -d $STATE/uts ]]; then
    for host in "$STATE"/uts/*; do umount "$host" 2>/dev/null || true; done
  fi
}

# kill_host_processes HOST: SIGKILL everything running in HOST's network namespace, wait until gone.
kill_host_processes() {
  local host=$1 pids
  for _ in $(seq 100); do
    pids=$(ip netns pids "$host" 2>/dev/null || true)
    [[ -z $pids ]] && return 0
    kill -KILL $pids 2>/dev/null || true
    sleep 0.1
  done
  die "processes on $host survive SIGKILL: $pids"
}

# ---------------------------------------------------------------------------------- munge, Slurm

start_munge() {  # a munged of our own (socket in $MUNGE_DIR), on the machine's one munge key
  install -d -o munge -g munge -m 0755 "$MUNGE_DIR"
  alive "$MUNGE_DIR/munged.pid" && return 0
  munge_key
  runuser -u munge -- munged --socket="$MUNGE_SOCKET" --pid-file="$MUNGE_DIR/munged.pid" \
    --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" 9>&-
  for _ in $(seq 50); do
    munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "munged did not start (log: $MUNGE_DIR/munged.log)"
}

render_conf() {  # render_conf N
  local i hw
  hw=$(node_hardware)
  cat <<CONF
$MARKER
ClusterName=kdscale-hosts
SlurmctldHost=$(host_name 0)($(host_addr 0))
AuthInfo=socket=$MUNGE_SOCKET
$(slurm_conf_common "$SLURM_DIR/log/jobcomp.log" "StateSaveLocation=$SLURM_DIR/ctld
SlurmdSpoolDir=$SLURM_DIR/%n
SlurmctldPidFile=$SLURM_DIR/ctld/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/%n/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd-%n.log")
# A host whose slurmd stops answering is DOWN after 30 s (Slurm's default: 300 s).
SlurmdTimeout=30
CONF
  for ((i = 0; i < $1; i++)); do
    echo "NodeName=$(host_name "$i") NodeAddr=$(host_addr "$i") $hw State=UNKNOWN"
  done
  echo "PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
}

start_slurm() {  # start_slurm N: the conf, slurmctld on the head, a slurmd on every host
  local n=$1 i host new
  install -d -o slurm -g slurm "$SLURM_DIR/ctld" "$SLURM_DIR/log"
  new=$(render_conf "$n")
  if [[ ! -f $CONF || $(<"$CONF") != "$new" ]]; then
    printf '%s\n' "$new" >"$CONF"
    for ((i = 0; i < n; i++)); do stop_pidfile "$SLURM_DIR/$(host_name "$i")/slurmd.pid"; done
    stop_pidfile "$SLURM_DIR/ctld/slurmctld.pid"
  fi
  if ! alive "$SLURM_DIR/ctld/slurmctld.pid"; then
    on_host "$(host_name 0)"
    "${ON_HOST[@]}" "${DAEMON_ENV[@]}" slurmctld -f "$CONF" 9>&-
    wait_pidfile "$SLURM_DIR/ctld/slurmctld.pid" "$SLURM_DIR/log/slurmctld.log"
  fi
  for ((i = 0; i < n; i++)); do
    host=$(host_name "$i")
    install -d "$SLURM_DIR/$host"
    alive "$SLURM_DIR/$host/slurmd.pid" && continue
    on_host "$host"
    "${ON_HOST[@]}" "${DAEMON_ENV[@]}" slurmd -f "$CONF" -N "$host" 9>&-
    wait_pidfile "$SLURM_DIR/$host/slurmd.pid" "$SLURM_DIR/log/slurmd-$host.log"
  done
}

slurm() { SLURM_CONF=$CONF timeout 5 "$@"; }

# ---------------------------------------------------------------------------------- Ray

ray_pidfile() { echo "$STATE/ray/$1.pid"; }

start_ray() {  # start_ray N: the head on host 0 (restarting every worker if it is new), then workers
  local n=$1 i host head
  [[ -x $PYBIN/ray ]] || die "no ray in $PYBIN (run make install, or set KDSCALE_CLUSTER_BIN)"
  mkdir -p "$STATE/ray"
  head=$(host_name 0)
  if ! alive "$(ray_pidfile "$head")"; then
    local workers=()  # they joined the old head
    for ((i = 1; i < n; i++)); do workers+=("$(host_name "$i")"); done
    stop_ray "${workers[@]}"
    start_ray_node "$head" --head --port="$RAY_PORT" --num-cpus=0 --include-dashboard=true \
      --dashboard-host="$(host_addr 0)" --dashboard-port="$RAY_DASH_PORT" \
      --ray-client-server-port="$RAY_CLIENT_PORT"
  fi
  local deadline=$((SECONDS + WAIT_S))  # workers give up on a head that is slow to come up
  until ray_alive_nodes | grep -q "^$(host_addr 0) "; do
    alive "$(ray_pidfile "$head")" || die "ray on $head exited: $(tail -n 1 "$STATE/ray/$head.log")"
    ((SECONDS < deadline)) || die "the Ray head on $head is not up after ${WAIT_S} s (log: $STATE/ray/$head.log)"
    sleep 0.5
  done
  for ((i = 1; i < n; i++)); do
    host=$(host_name "$i")
    alive "$(ray_pidfile "$host")" && continue
    start_ray_node "$host" --address="$(host_addr 0):$RAY_PORT" --num-cpus="$(nproc)"
  done
}

start_ray_node() {  # start_ray_node HOST ARGS...: `ray start --block` in its own session, PID recorded
  local host=$1; shift
  clear_ray "$host"
  local addr; addr=$(host_addr "$(host_index "$host")")
  on_host "$host"
  "${ON_HOST[@]}" "${DAEMON_ENV[@]}" setsid "$PYBIN/ray" start --block --node-ip-address="$addr" \
    --dashboard-agent-listen-port="$RAY_AGENT_PORT" --object-store-memory=200000000 \
    --disable-usage-stats "$@" >"$STATE/ray/$host.log" 2>&1 9>&- &
  echo $! >"$(ray_pidfile "$host")"
}

process_group() {  # process_group PID: its process group (/proc/PID/stat field 5, after "(comm)")
  local stat pgid
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  read -r _ _ pgid _ <<<"${stat##*) }"
  echo "$pgid"
}

clear_ray() {  # clear_ray HOST: SIGKILL what an exited `ray start` on HOST left (its process group)
  local file group pid
  file=$(ray_pidfile "$1")
  [[ -r $file ]] || return 0
  group=$(<"$file")
  for pid in $(ip netns pids "$1" 2>/dev/null); do
    if [[ $(process_group "$pid") == "$group" ]]; then kill -KILL "$pid" 2>/dev/null || true; fi
  done
  rm -f "$file"
}

stop_ray() {  # stop_ray HOST...: SIGTERM each `ray start --block` group (it stops its node), then SIGKILL
  local files=() host
  for host in "$@"; do files+=("$(ray_pidfile "$host")"); done
  stop_groups "${files[@]}"
}

# stop_groups PIDFILE...: SIGTERM each live PID's process group, wait up to 5 s for all, SIGKILL.
stop_groups() {
  local file pids=()
  for file in "$@"; do
    if alive "$file"; then pids+=("$(<"$file")"); kill -TERM -- "-$(<"$file")" 2>/dev/null || true; fi
  done
  for _ in $(seq 50); do
    local left=0
    for file in "$@"; do if alive "$file"; then left=1; fi; done
    ((left)) || break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  rm -f "$@"
}

ray_alive_nodes() {  # "ADDRESS START_MS" of every Ray node the head counts ALIVE
  "$PYBIN/python" - "http://$(host_addr 0):$RAY_DASH_PORT" <<'PY' 2>/dev/null || true
import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1] + "/nodes?view=summary", timeout=3) as reply:
    for node in json.load(reply)["data"]["summary"]:
        if node["raylet"]["state"] == "ALIVE":
            print(node["raylet"]["nodeManagerAddress"], node["raylet"]["startTimeMs"])
PY
}

# ---------------------------------------------------------------------------------- verbs

cluster_lines() {
  local n=$1 i hosts=()
  for ((i = 0; i < n; i++)); do hosts+=("$(host_name "$i")"); done
  local IFS=,
  echo "HOSTS=${hosts[*]}"
  echo "SLURM_CONF=$CONF"
  echo "RAY_ADDRESS=$(host_addr 0):$RAY_PORT"
  echo "RAY_DASHBOARD=http://$(host_addr 0):$RAY_DASH_PORT"
}

# host_problems N: one line per host that is not fully up (empty when the cluster is healthy).
host_problems() {
  local n=$1 i host addr state since ray
  ray=$(ray_alive_nodes)
  for ((i = 0; i < n; i++)); do
    host=$(host_name "$i") addr=$(host_addr "$i")
    ip -o link show "$(host_link "$i")" 2>/dev/null | grep -q '[<,]UP[,>]' || echo "$host: link down"
    alive "$SLURM_DIR/$host/slurmd.pid" || echo "$host: slurmd not running"
    state=$(slurm sinfo -h -N -n "$host" -o %T 2>/dev/null || true)
    case $state in idle|mixed|allocated|completing) ;; *) echo "$host: slurm node ${state:-unknown}";; esac
    alive "$(ray_pidfile "$host")" || echo "$host: ray not running"
    # A live Ray node at the address, started by the current `ray start` (not one lost a moment ago).
    since=$(( $(stat -c %Y "$(ray_pidfile "$host")" 2>/dev/null || echo 0) * 1000 - 1000 ))
    awk -v a="$addr" -v s="$since" '$1 == a && $2 >= s {found = 1} END {exit !found}' <<<"$ray" \
      || echo "$host: no live Ray node at $addr"
  done
}

# daemons_alive N: fail fast, with its log's last line, when a Slurm daemon has died; start Ray
# again where it gave up (`ray start` waits only 30 s for its node to register: too short for a
# loaded machine).
daemons_alive() {
  local n=$1 i host
  alive "$SLURM_DIR/ctld/slurmctld.pid" || die "slurmctld died: $(tail -n 1 "$SLURM_DIR/log/slurmctld.log")"
  for ((i = 0; i < n; i++)); do
    host=$(host_name "$i")
    alive "$SLURM_DIR/$host/slurmd.pid" || die "slurmd on $host died: $(tail -n 1 "$SLURM_DIR/log/slurmd-$host.log")"
    if ! alive "$(ray_pidfile "$host")"; then
      note "starting Ray on $host again: $(tail -n 1 "$STATE/ray/$host.log")"
      start_ray "$n"
    fi
  done
}

wait_ready() {  # wait_ready N: every Slurm node idle and every host a live Ray node, or die naming them
  local n=$1 deadline=$((SECONDS + WAIT_S)) problems i
  while true; do
    daemons_alive "$n"
    problems=$(host_problems "$n")
    [[ -z $problems ]] && return 0
    for ((i = 0; i < n; i++)); do  # a host that came back after `kill` is DOWN until resumed
      grep -q "^$(host_name "$i"): slurm node down" <<<"$problems" \
        && slurm scontrol update NodeName="$(host_name "$i")" State=RESUME 2>/dev/null || true
    done
    ((SECONDS < deadline)) || die "not up after ${WAIT_S} s: $(paste -sd';' <<<"$problems") (logs: $STATE/slurm/log, $STATE/ray)"
    sleep 0.5
  done
}

up() {
  local n=3
  while (($#)); do
    case $1 in
      --hosts) n=${2:-}; shift 2 || die "--hosts needs a number" ;;
      --hosts=*) n=${1#--hosts=}; shift ;;
      *) die "up: unknown argument $1 (usage: up [--hosts N])" ;;
    esac
  done
  [[ $n =~ ^[0-9]+$ ]] && ((n >= 2 && n <= 250)) || die "--hosts $n: expected a number from 2 to 250"
  [[ $(id -u) == 0 ]] || die "must run as root (network namespaces, slurmd)"
  if [[ -f $STATE/cluster.env ]]; then
    local running; running=$(sed -n 's/^N=//p' "$STATE/cluster.env")
    [[ $running == "$n" ]] || die "a cluster of $running hosts is up; run \`$0 down\` first"
    [[ $(sed -n 's/^REPO=//p' "$STATE/cluster.env") == "$REPO" ]] \
      || die "the cluster in $STATE belongs to $(sed -n 's/^REPO=//p' "$STATE/cluster.env"); down it there first"
  fi
  install_packages
  command -v ip >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install \
    -y -qq --no-install-recommends iproute2 >/dev/null || die "iproute2 (ip) is missing and apt-get could not install it"
  mkdir -p "$STATE"
  printf 'N=%s\nREPO=%s\n' "$n" "$REPO" >"$STATE/cluster.env"
  make_network "$n"
  start_munge
  start_slurm "$n"
  start_ray "$n"
  wait_ready "$n"
  cluster_lines "$n"
}

status() {
  [[ -f $STATE/cluster.env ]] || { echo "local_cluster: down"; return 1; }
  local n; n=$(sed -n 's/^N=//p' "$STATE/cluster.env")
  cluster_lines "$n"
  local problems; problems=$(host_problems "$n")
  local i
  for ((i = 0; i < n; i++)); do
    local host; host=$(host_name "$i")
    grep "^$host:" <<<"$problems" || echo "$host: up ($(host_addr "$i"))"
  done
  [[ -z $problems ]]
}

down() {  # down [--force]: --force also takes down a cluster that another checkout brought up
  local host owner
  if [[ -f $STATE/cluster.env && ${1:-} != --force ]]; then
    owner=$(sed -n 's/^REPO=//p' "$STATE/cluster.env")
    [[ $owner == "$REPO" ]] || die "the cluster in $STATE belongs to $owner; down it there, or: $0 down --force"
  fi
  if alive "$SLURM_DIR/ctld/slurmctld.pid"; then
    slurm squeue -h -o %i 2>/dev/null | xargs -r env SLURM_CONF="$CONF" timeout 5 scancel 2>/dev/null || true
  fi
  # Every daemon at once (slurmd and slurmctld lead their own process groups too), then the rest.
  local daemons=()
  for file in "$STATE"/ray/*.pid "$SLURM_DIR"/*/slurmd.pid "$SLURM_DIR/ctld/slurmctld.pid"; do
    if [[ -e $file ]]; then daemons+=("$file"); fi
  done
  ((${#daemons[@]} == 0)) || stop_groups "${daemons[@]}"
  for host in $(existing_hosts); do kill_host_processes "$host"; done
  if [[ -e $MUNGE_DIR/munged.pid ]]; then stop_pidfile "$MUNGE_DIR/munged.pid"; fi
  remove_network
  rm -rf "$STATE"
  note "down"
}

kill_host() {  # a host lost at once: no more packets, no process left (`up` brings it back)
  local host=$1 i
  i=$(host_index "$host")
  ip netns list | grep -qE "^$host( |$)" || die "no host named $host"
  ip link set "$(host_link "$i")" down
  kill_host_processes "$host"
  note "$host lost (link down, every process killed)"
}

# One `up`/`down`/`kill` at a time (a test's safety-net `down` may race an interrupted `up`).
lock() { exec 9>"$STATE.lock"; flock -w 300 9 || die "another local_cluster.sh holds $STATE.lock"; }

case ${1:-} in
  up) shift; lock; up "$@" ;;
  down) shift; lock; down "$@" ;;
  status) status ;;
  exec) [[ $# -ge 3 ]] || die "usage: $0 exec HOST CMD..."; host_index "$2" >/dev/null; on_host "$2"; shift 2; exec "${ON_HOST[@]}" "$@" ;;
  kill) [[ $# -eq 2 ]] || die "usage: $0 kill HOST"; lock; kill_host "$2" ;;
  *) die "usage: $0 up [--hosts N] | down [--force] | status | exec HOST CMD... | kill HOST" ;;
esac
