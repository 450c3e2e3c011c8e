#!/usr/bin/env bash
# Bring up (or stop) a real two-node Slurm cluster on this one machine, for the slurm tests
# (.ci/run calls `start` before the test suite and `stop` after it).
#
#   slurm/local_cluster.sh start    # install if needed, write slurm.conf, start munge + daemons
#   slurm/local_cluster.sh status   # sinfo
#   slurm/local_cluster.sh stop     # stop the daemons this script started (by PID file) and
#                                   # remove the slurm.conf it wrote
#
# Needs root and Debian/Ubuntu (apt; Debian bookworm ships Slurm 22.05). No systemd: the
# daemons are started by hand. Two slurmd daemons, `slurmd -N n1` and `slurmd -N n2`, listen
# on ports 17001 and 17002 and both have NodeAddr=127.0.0.1: jobs see two nodes (SLURM_NODEID
# 0 and 1), whose names do not resolve as host names (ask Slurm for NodeAddr instead).
# Environment knobs:
#   HM_SLURM_STATE  state, spool, logs and PID files (default /var/lib/hm-slurm)
#   HM_SLURM_CPUS   CPUs each node advertises (default 4; more than the machine has is fine
#                   with SlurmdParameters=config_overrides and lets jobs run side by side)
#   SLURM_CONF      where slurm.conf goes (default /etc/slurm/slurm.conf, where every client
#                   command looks). Another path keeps the cluster private to the shells that
#                   export the same SLURM_CONF (Slurm's clients read that variable).
# A slurm.conf that this script did not write is never overwritten.
set -euo pipefail

STATE=${HM_SLURM_STATE:-/var/lib/hm-slurm}
CPUS=${HM_SLURM_CPUS:-4}
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
export SLURM_CONF=$CONF
MARKER="# written by hybrid-megatron slurm/local_cluster.sh"
NODES=(n1 n2)
PORTS=(17001 17002)
CTLD_HOST=$(hostname -s)

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
        command -v sbatch >/dev/null && command -v munged >/dev/null && return
    echo "installing slurmctld slurmd slurm-client munge (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
    if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        echo "error: $CONF exists and was not written by this script; not touching it." >&2
        exit 1
    fi
    # RealMemory: 40% of what slurmd detects per node (two nodes share the machine; a node
    # declared larger than the machine goes INVALID and srun then hangs instead of failing).
    local mem i nodes
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mem=$((mem * 4 / 10))
    mkdir -p "$(dirname "$CONF")" "$STATE/ctld"
    nodes=""
    for i in "${!NODES[@]}"; do
        mkdir -p "$STATE/slurmd/${NODES[$i]}"
        nodes+="NodeName=${NODES[$i]} NodeAddr=127.0.0.1 Port=${PORTS[$i]} CPUs=$CPUS Sockets=1"
        nodes+=" CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN"$'\n'
    done
    cat >"$CONF" <<CONFEOF
$MARKER
ClusterName=hmlocal
SlurmctldHost=$CTLD_HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# short credential lifetime + fast scheduler passes: requeued jobs restart in ~8 s, not ~3 min
AuthInfo=cred_expire=5
SchedulerParameters=sched_interval=2,bf_interval=1,batch_sched_delay=0
# cgroup plugins need a host-specific cgroup.conf: use the plain ones
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# nodes may advertise more CPUs than the machine has
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
# ended jobs stay visible to scontrol for 10 minutes (the tests read their final state)
MinJobAge=600
KillWait=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
${nodes}PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP
CONFEOF
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return  # already running (ours or someone else's)
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- munged
    touch "$STATE/munged.ours"
    for _ in $(seq 50); do
        munge -n | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    echo "error: munged did not come up" >&2
    exit 1
}

running() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    install_packages
    mkdir -p "$STATE"
    write_conf
    start_munge
    # -c: start from a clean state (job ids restart at 1); -i: ignore unreadable state files
    running "$STATE/slurmctld.pid" || slurmctld -c -i -f "$CONF"
    local node states=""
    for node in "${NODES[@]}"; do
        running "$STATE/slurmd-$node.pid" || slurmd -N "$node" -f "$CONF"
    done
    for _ in $(seq 150); do
        states=$(sinfo -h -N -o '%N=%T' 2>/dev/null | sort -u | tr '\n' ' ' || true)
        if [[ $(grep -o '=idle' <<<"$states" | wc -l) == "${#NODES[@]}" ]]; then
            echo "slurm is up: nodes ${NODES[*]} idle ($CPUS CPUs each); config $CONF, logs in $STATE"
            return
        fi
        sleep 0.2
    done
    echo "error: nodes not idle (${states:-no answer from sinfo}); see $STATE/slurmctld.log" >&2
    exit 1
}

stop_pidfile() {
    local file=$1 name=$2
    if running "$file"; then
        local pid
        pid=$(cat "$file")
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        echo "stopped $name (pid $pid)"
    fi
    rm -f "$file"
}

stop() {
    local node
    for node in "${NODES[@]}"; do
        stop_pidfile "$STATE/slurmd-$node.pid" "slurmd $node"
    done
    stop_pidfile "$STATE/slurmctld.pid" slurmctld
    if [[ -f $STATE/munged.ours ]]; then
        stop_pidfile /run/munge/munged.pid munged
        rm -f "$STATE/munged.ours"
    fi
    # Our slurm.conf goes too: clients would otherwise wait for a controller that is gone.
    if [[ -f $CONF ]] && grep -qF "$MARKER" "$CONF"; then
        rm -f "$CONF"
    fi
}

case ${1:-} in
start) start ;;
stop) stop ;;
status) sinfo ;;
*)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
