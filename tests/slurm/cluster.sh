#!/usr/bin/env bash
# A real SLURM cluster of three compute nodes on this one machine, for the cluster tests
# (Debian's slurm-wlm, as root, no systemd):
#   tests/slurm/cluster.sh start    install if needed, configure, start munged, slurmctld and
#                                   the nodes n1..n3; wait until every node takes jobs
#   tests/slurm/cluster.sh stop     cancel the jobs left, stop every daemon by its pid file
#   tests/slurm/cluster.sh status   each daemon and each node's state (exit 1 if one is not up)
# Each node is its own slurmd in its own UTS namespace (`hostname` in a job prints n1, n2 or
# n3) on its own loopback address and port; the nodes share the host's file system, as the
# nodes of a cluster share one parallel file system. One CPU per node, so concurrent jobs
# land on different nodes. There is no slurmdbd: Snakemake must ask squeue for job states.
# start is idempotent: it starts only what is not running (everything anew if this script's
# configuration changed) and resumes nodes left down by an unclean stop.
set -euo pipefail
RUN=/run/dcmsort-slurm  # pid files
LOGS=/var/log/slurm
CONF=/etc/slurm/slurm.conf  # the jobstep plugin strips SLURM_CONF, so it must live here
MUNGE_PID=/run/munge/munged.pid
NODES=(n1 n2 n3)
NODE_LIST="n[1-${#NODES[@]}]"

install() {
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
  fi
}

slurm_conf() {
  # Every node reports the whole machine's memory; CR_CPU schedules CPUs only, so a job's
  # --mem is checked against RealMemory but not consumed.
  local mem i
  mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 3 / 4 ))
  cat <<CONF
ClusterName=dcmsort-test
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# The controller listens on its loopback address only. (NoInAddrAny would bind each slurmd
# to its node's address too, but then an srun inside a job never gets its I/O connection.)
CommunicationParameters=NoCtldInAddrAny
StateSaveLocation=/var/spool/slurmctld
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmctldLogFile=$LOGS/slurmctld.log
# %n: the node's name, so each slurmd has its own spool, pid file and log.
SlurmdSpoolDir=/var/spool/slurmd-%n
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmdLogFile=$LOGS/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
# Without slurmdbd finished jobs must stay visible to squeue long enough to be polled.
MinJobAge=600
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
CONF
  for i in "${!NODES[@]}"; do
    echo "NodeName=${NODES[i]} NodeHostname=${NODES[i]} NodeAddr=127.0.0.$((i + 2))" \
      "Port=$((6821 + i)) CPUs=1 RealMemory=$mem State=UNKNOWN"
  done
  echo "PartitionName=debug Nodes=$NODE_LIST Default=YES MaxTime=INFINITE State=UP"
}

# Whether pid is a live process of that program: not a stale pid reused, nor a killed one
# that init has not reaped yet (a zombie).
running() {
  local pid=$1 program=$2 comm stat
  read -r comm stat < <(ps -o comm=,stat= -p "$pid" 2>/dev/null) || return 1
  [ "$comm" = "$program" ] && [ "${stat:0:1}" != Z ]
}

alive() {  # whether the pid file names a live process of that program
  [ -s "$1" ] && running "$(cat "$1")" "$2"
}

daemons() {  # pid file and program of each daemon
  local node
  for node in "${NODES[@]}"; do echo "$RUN/slurmd-$node.pid slurmd"; done
  echo "$RUN/slurmctld.pid slurmctld"
  echo "$MUNGE_PID munged"
}

nodes_up() {  # every node answers and takes jobs
  local states
  states=$(sinfo -h -N -o '%N %T' 2>/dev/null) || return 1
  [ "$(grep -cE ' (idle|mixed|allocated|completing)$' <<<"$states")" -eq "${#NODES[@]}" ]
}

wait_for() {  # name, a test command, a log to show if it never passes
  for _ in $(seq 30); do
    if sh -c "$2" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  echo "slurm: $1 did not come up; see $3" >&2
  tail -n 20 "$3" >&2 || true
  return 1
}

start() {
  install
  mkdir -p /etc/slurm /var/spool/slurmctld "$LOGS" "$RUN" /run/munge /var/lib/munge /var/log/munge
  local wanted node i
  wanted=$(slurm_conf)
  if [ "$wanted" != "$(cat "$CONF" 2>/dev/null)" ]; then
    stop quiet
    echo "$wanted" >"$CONF"
  fi
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  fi
  chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
  chmod 400 /etc/munge/munge.key

  if ! alive "$MUNGE_PID" munged; then
    runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PID"
  fi
  # Every SLURM command waits and retries for long when munge does not answer.
  wait_for "munged" "munge -n | unmunge" /var/log/munge/munged.log
  if ! alive "$RUN/slurmctld.pid" slurmctld; then
    # -c: a test cluster starts without the jobs of an earlier life.
    /usr/sbin/slurmctld -c
  fi
  wait_for "slurmctld" "scontrol ping | grep -q UP" "$LOGS/slurmctld.log"
  for node in "${NODES[@]}"; do
    if ! alive "$RUN/slurmd-$node.pid" slurmd; then
      mkdir -p "/var/spool/slurmd-$node"
      # Its own UTS namespace: the node's hostname is its name; the daemon stays in it.
      unshare --uts /bin/sh -c "hostname $node && exec /usr/sbin/slurmd -N $node"
    fi
  done

  for i in $(seq 60); do
    if nodes_up; then
      echo "slurm: $(sinfo -h -o '%D nodes (%N), %c CPU each, partition %P') up"
      return 0
    fi
    # A node that a killed slurmd left down or drained stays so until resumed.
    if [ "$i" -gt 2 ]; then
      sinfo -h -N -t down,drained,draining,fail -o '%N' 2>/dev/null | sort -u \
        | while read -r node; do
          scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
        done
    fi
    sleep 1
  done
  echo "slurm: the nodes did not come up; see $LOGS/" >&2
  sinfo -N >&2 || true
  tail -n 20 "$LOGS"/slurmctld.log "$LOGS"/slurmd-*.log >&2 || true
  return 1
}

stop() {
  # Jobs left running would leave their slurmstepd behind the stopped slurmd.
  if alive "$MUNGE_PID" munged && alive "$RUN/slurmctld.pid" slurmctld \
    && [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
    squeue -h -o %i | xargs -r scancel || true
    for _ in $(seq 20); do
      [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
  # TERM to all, then wait for each.
  local pidfile program pid stopping=()
  while read -r pidfile program; do
    if alive "$pidfile" "$program"; then
      pid=$(cat "$pidfile")
      kill "$pid" || true
      stopping+=("$pid $program $(basename "$pidfile" .pid)")
    fi
    rm -f "$pidfile"
  done < <(daemons)
  local entry name
  for entry in "${stopping[@]}"; do
    read -r pid program name <<<"$entry"
    for _ in $(seq 40); do running "$pid" "$program" || break; sleep 0.25; done
    if running "$pid" "$program"; then kill -KILL "$pid" || true; fi
    [ "${1:-}" = quiet ] || echo "stopped $program ($name)"
  done
}

status() {
  local pidfile program up=0
  while read -r pidfile program; do
    if alive "$pidfile" "$program"; then
      echo "$(basename "$pidfile" .pid): running (pid $(cat "$pidfile"))"
    else
      echo "$(basename "$pidfile" .pid): not running"
      up=1
    fi
  done < <(daemons)
  if [ "$up" -eq 0 ]; then
    sinfo -N -o '%N %T %c %o' || up=1
    nodes_up || up=1
  fi
  return "$up"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
