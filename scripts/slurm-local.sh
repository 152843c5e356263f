#!/usr/bin/env bash
# slurm-local.sh: a single-node Slurm (with munge) on this Debian/Ubuntu machine, for trying
# the batch scripts (scripts/sbatch-sweep.sh) without a cluster. Run as root.
#
#   scripts/slurm-local.sh [start]   install slurm-wlm + munge if needed, write
#                                    /etc/slurm/slurm.conf, start munged, slurmctld, slurmd
#   scripts/slurm-local.sh stop      stop slurmd, slurmctld, munged (SIGTERM by PID file)
#   scripts/slurm-local.sh status    exit 0 iff sinfo answers and the node is usable
#
# Works without systemd: the daemons are started directly, each writing a PID file under /run.
# No cgroups (proctrack/linuxproc, task/none), no accounting (use squeue / scontrol show job,
# not sacct), everything addressed by 127.0.0.1. Partition "debug", one node advertising
# CPUS (default 4; env SLURM_LOCAL_CPUS) and ~90 % of the machine's memory.
# Any failure: one line "slurm-local: ..." on stderr, exit status 2. Running it twice is fine.
set -euo pipefail
set -o errtrace  # the ERR trap below also covers functions

CONF=/etc/slurm/slurm.conf
MARK="# written by scripts/slurm-local.sh"
PARTITION=debug
CPUS=${SLURM_LOCAL_CPUS:-4}
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
LOGDIR=/var/log/slurm
INSTALL_LOG=/var/log/slurm-local-install.log

die() { echo "slurm-local: $*" >&2; exit 2; }
say() { echo "slurm-local: $*"; }
trap 'die "unexpected failure (line $LINENO: $BASH_COMMAND)"' ERR

# The node's name: the short hostname if Slurm can use it, else "localnode". slurmctld only
# runs where SlurmctldHost names this host, or is "localhost".
HOST=$(hostname -s 2>/dev/null || true)
if [[ $HOST =~ ^[A-Za-z][A-Za-z0-9-]{0,62}$ ]]; then
    NODE=$HOST
    CTLD_HOST=$HOST
else
    NODE=localnode
    CTLD_HOST=localhost
fi

# alive PIDFILE COMM: print the PID if the file names a live process called COMM.
alive() {
    local pid comm
    [[ -r $1 ]] || return 1
    pid=$(tr -dc '0-9' <"$1" 2>/dev/null || true)
    [[ -n $pid ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    [[ $comm == "$2" ]] || return 1
    echo "$pid"
}

node_state() {  # the node's state as sinfo reports it (lower case), or nothing
    timeout 10 sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1 | tr '[:upper:]' '[:lower:]' || true
}

usable() {
    case "$(node_state)" in
        idle | mixed | allocated) return 0 ;;
        *) return 1 ;;
    esac
}

ready_line() {
    local cpus mem
    cpus=$(timeout 10 sinfo -h -N -n "$NODE" -o '%c' 2>/dev/null | head -n1 || true)
    mem=$(timeout 10 sinfo -h -N -n "$NODE" -o '%m' 2>/dev/null | head -n1 || true)
    say "$1 (partition $PARTITION, node $NODE, ${cpus:-?} CPUs, ${mem:-?} MB)"
}

need_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (try: sudo $0 ${1:-start})"
}

install_pkgs() {
    local need=0 cmd
    for cmd in slurmctld slurmd sinfo sbatch munged munge unmunge; do
        command -v "$cmd" >/dev/null 2>&1 || need=1
    done
    [[ $need -eq 0 ]] && return 0
    command -v apt-get >/dev/null 2>&1 || die "slurm/munge not installed and no apt-get here (Debian/Ubuntu only)"
    say "installing slurm-wlm and munge (log: $INSTALL_LOG)"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q slurm-wlm munge >"$INSTALL_LOG" 2>&1; then
        apt-get update -qq >>"$INSTALL_LOG" 2>&1 || true
        apt-get install -y -q slurm-wlm munge >>"$INSTALL_LOG" 2>&1 \
            || die "apt-get install slurm-wlm munge failed (see $INSTALL_LOG)"
    fi
    for cmd in slurmctld slurmd sinfo munged; do
        command -v "$cmd" >/dev/null 2>&1 || die "installed, but $cmd is still missing (see $INSTALL_LOG)"
    done
}

munge_setup() {
    getent passwd munge >/dev/null || die "no munge user (the munge package should create it)"
    install -d -m 0700 -o munge -g munge /etc/munge
    install -d -m 0755 -o munge -g munge /run/munge
    install -d -m 0700 -o munge -g munge /var/log/munge /var/lib/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile=/etc/munge/munge.key >/dev/null 2>&1 \
                || die "mungekey could not create /etc/munge/munge.key"
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none \
                || die "could not create /etc/munge/munge.key"
        fi
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
}

start_munge() {
    munge_setup
    if ! alive "$MUNGE_PID" munged >/dev/null; then
        runuser -u munge -- munged >/dev/null 2>&1 || die "munged did not start (see /var/log/munge/munged.log)"
    fi
    for _ in $(seq 1 20); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    die "munge does not work (munge -n | unmunge fails; see /var/log/munge/munged.log)"
}

write_conf() {  # write slurm.conf; return 0 if it changed
    local mem_kb real_mem defmem new
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    [[ -n $mem_kb ]] || die "cannot read MemTotal from /proc/meminfo"
    real_mem=$((mem_kb * 9 / 10 / 1024))          # MB, 90 % of the machine
    defmem=$((real_mem / CPUS))                   # a job without --mem gets its CPUs' share
    new=$(cat <<EOF
$MARK (single node, no cgroups, no accounting)
ClusterName=local
SlurmctldHost=$CTLD_HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$defmem
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldTimeout=120
SlurmdTimeout=300
KillWait=30
InactiveLimit=0
MinJobAge=300
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$real_mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
)
    install -d -m 0755 /etc/slurm
    if [[ -f $CONF ]] && [[ $(cat "$CONF") == "$new" ]]; then
        return 1
    fi
    if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
        cp -p "$CONF" "$CONF.bak.$(date +%Y%m%d%H%M%S)"
    fi
    printf '%s\n' "$new" >"$CONF.tmp"
    chmod 0644 "$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
    return 0
}

# stop_daemon PIDFILE COMM: SIGTERM the process the PID file names (if it is COMM) and wait
# for it to exit. Never by name: a reused PID or another program is left alone.
stop_daemon() {
    local pid
    pid=$(alive "$1" "$2") || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 60); do   # up to 30 s; slurmctld drops its PID file before it exits
        kill -0 "$pid" 2>/dev/null || return 0
        [[ $(cat "/proc/$pid/comm" 2>/dev/null || true) == "$2" ]] || return 0
        sleep 0.5
    done
    die "$2 (PID $pid) did not exit within 30 s of SIGTERM"
}

do_stop() {
    need_root stop
    stop_daemon "$SLURMD_PID" slurmd
    stop_daemon "$CTLD_PID" slurmctld
    stop_daemon "$MUNGE_PID" munged
    say "stopped"
}

do_start() {
    need_root start
    install_pkgs
    local changed=0
    write_conf && changed=1
    if [[ $changed -eq 0 ]] && alive "$MUNGE_PID" munged >/dev/null \
        && alive "$CTLD_PID" slurmctld >/dev/null && alive "$SLURMD_PID" slurmd >/dev/null && usable; then
        ready_line "already running"
        return 0
    fi
    if [[ $changed -eq 1 ]]; then  # a new configuration: restart what runs with the old one
        stop_daemon "$SLURMD_PID" slurmd
        stop_daemon "$CTLD_PID" slurmctld
    fi
    install -d -m 0755 /var/spool/slurmctld /var/spool/slurmd "$LOGDIR"
    start_munge
    if ! alive "$CTLD_PID" slurmctld >/dev/null; then
        slurmctld >/dev/null 2>&1 || die "slurmctld did not start (see $LOGDIR/slurmctld.log)"
    fi
    if ! alive "$SLURMD_PID" slurmd >/dev/null; then
        slurmd -N "$NODE" >/dev/null 2>&1 || die "slurmd did not start (see $LOGDIR/slurmd.log)"
    fi
    local state resumed=0
    for _ in $(seq 1 40); do  # ~20 s
        alive "$CTLD_PID" slurmctld >/dev/null || die "slurmctld exited (see $LOGDIR/slurmctld.log)"
        alive "$SLURMD_PID" slurmd >/dev/null || die "slurmd exited (see $LOGDIR/slurmd.log)"
        state=$(node_state)
        case "$state" in
            idle | mixed | allocated)
                ready_line ready
                return 0
                ;;
            *drain* | down*)
                if [[ $resumed -eq 0 ]]; then
                    scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
                    resumed=1
                fi
                ;;
        esac
        sleep 0.5
    done
    die "node $NODE not usable after 20 s (sinfo state: ${state:-no answer}; see $LOGDIR/slurmctld.log, $LOGDIR/slurmd.log)"
}

do_status() {
    command -v sinfo >/dev/null 2>&1 || die "not installed (no sinfo)"
    local state
    state=$(node_state)
    case "$state" in
        idle | mixed | allocated) ready_line running ;;
        "") die "not running (sinfo does not answer)" ;;
        *) die "node $NODE is $state" ;;
    esac
}

case "${1:-start}" in
    start) do_start ;;
    stop) do_stop ;;
    status) do_status ;;
    -h | --help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) die "unknown command ${1} (use start, stop or status)" ;;
esac
