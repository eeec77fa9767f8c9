#!/usr/bin/env bash
# A real SLURM cluster of three compute nodes on this one machine, for the cluster tests
# (Debian's slurm-wlm, as root, no systemd):
#   tests/slurm/cluster.sh start    install if needed, configure, start munged, slurmctld and
#                                   the nodes n1..n3; wait until every node is idle
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

# Whether the pid file names a live process of that program (not a stale pid reused).
alive() {
  local pidfile=$1 program=$2 pid
  [ -s "$pidfile" ] || return 1
  pid=$(cat "$pidfile")
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$program" ]
}

daemons() {  # pid file and program of each daemon, in stop order
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
  for _ in $(seq 20); do munge -n | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
  if ! alive "$RUN/slurmctld.pid" slurmctld; then
    # -c: a test cluster starts without the jobs of an earlier life.
    /usr/sbin/slurmctld -c
  fi
  for _ in $(seq 30); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
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
  if alive "$RUN/slurmctld.pid" slurmctld && [ -n "$(squeue -h -t active -o %i 2>/dev/null)" ]; then
    scancel --state=PENDING >/dev/null 2>&1 || true
    squeue -h -t active -o %i | xargs -r scancel >/dev/null 2>&1 || true
    for _ in $(seq 20); do
      [ -z "$(squeue -h -t active -o %i 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
  local pidfile program pid
  while read -r pidfile program; do
    if alive "$pidfile" "$program"; then
      pid=$(cat "$pidfile")
      kill "$pid"
      for _ in $(seq 40); do [ -d "/proc/$pid" ] || break; sleep 0.25; done
      if [ -d "/proc/$pid" ]; then kill -KILL "$pid" 2>/dev/null || true; fi
      [ "${1:-}" = quiet ] || echo "stopped $program ($(basename "$pidfile" .pid))"
    fi
    rm -f "$pidfile"
  done < <(daemons)
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
