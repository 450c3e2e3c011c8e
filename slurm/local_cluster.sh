#!/usr/bin/env bash
# Bring up (or stop) a real one-node Slurm cluster on this machine, for the slurm tests.
#
#   slurm/local_cluster.sh start    # install if needed, write slurm.conf, start munge + daemons
#   slurm/local_cluster.sh status   # sinfo
#   slurm/local_cluster.sh stop     # stop the daemons this script started (by PID file)
#
# Needs root and Debian/Ubuntu (apt). No systemd: the daemons are started by hand. Facts
# behind each setting: /work/shared/notes/slurm-local.md. Environment knobs:
#   HM_SLURM_STATE  state, spool, logs and PID files (default /var/lib/hm-slurm)
#   HM_SLURM_CPUS   CPUs the node advertises (default 4; more than the machine has is fine
#                   with SlurmdParameters=config_overrides, and lets 4-task jobs run)
# The config goes to /etc/slurm/slurm.conf so every client command finds it; an existing
# slurm.conf that this script did not write is never overwritten.
set -euo pipefail

STATE=${HM_SLURM_STATE:-/var/lib/hm-slurm}
CPUS=${HM_SLURM_CPUS:-4}
CONF=/etc/slurm/slurm.conf
MARKER="# written by hybrid-megatron slurm/local_cluster.sh"
NODE=$(hostname -s)

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
    # RealMemory: 80% of what slurmd detects (a node larger than the machine goes INVALID).
    local mem
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mem=$((mem * 8 / 10))
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/slurmd/$NODE"
    cat >"$CONF" <<CONFEOF
$MARKER
ClusterName=hmlocal
SlurmctldHost=$NODE(127.0.0.1)
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
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
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
    running "$STATE/slurmctld.pid" || slurmctld -c -i
    running "$STATE/slurmd.pid" || slurmd
    for _ in $(seq 100); do
        state=$(sinfo -h -o %T 2>/dev/null | head -n1 || true)
        if [[ $state == idle* ]]; then
            echo "slurm is up: node $NODE idle ($CPUS CPUs); config $CONF, logs in $STATE"
            return
        fi
        sleep 0.2
    done
    echo "error: node not idle (state '${state:-none}'); see $STATE/slurmctld.log" >&2
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
    stop_pidfile "$STATE/slurmd.pid" slurmd
    stop_pidfile "$STATE/slurmctld.pid" slurmctld
    if [[ -f $STATE/munged.ours ]]; then
        stop_pidfile /run/munge/munged.pid munged
        rm -f "$STATE/munged.ours"
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
