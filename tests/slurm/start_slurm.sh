#!/usr/bin/env bash
# Start a private single-node SLURM (munged, slurmctld, slurmd) with everything under DIR,
# no systemd, nothing in /etc touched. For developers and for the test fixture.
#
#   tests/slurm/start_slurm.sh [DIR]          start (default DIR: /tmp/xlmr-slurm); then
#   source DIR/env                            points sbatch, squeue, ... at it (SLURM_CONF)
#   tests/slurm/start_slurm.sh --stop [DIR]   stop its daemons
#
# Runs as root (SlurmUser=root). The node is this machine with the CPUs `slurmd -C` reports;
# partition "debug" lets jobs share CPUs (OverSubscribe=FORCE) and requeue (JobRequeue=1).
set -euo pipefail

stop=0
if [ "${1:-}" = "--stop" ]; then stop=1; shift; fi
DIR=$(realpath -m "${1:-/tmp/xlmr-slurm}")

stop_daemons() {
    for pidfile in "$DIR"/slurmd.pid "$DIR"/slurmctld.pid "$DIR"/munge/munged.pid; do
        if [ -s "$pidfile" ]; then
            pid=$(cat "$pidfile")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
            rm -f "$pidfile"
        fi
    done
}
if [ "$stop" = 1 ]; then stop_daemons; exit 0; fi

for cmd in munged slurmctld slurmd sbatch; do
    command -v "$cmd" >/dev/null || { echo "start_slurm.sh: $cmd not found (tests/slurm/install_slurm.sh installs it)" >&2; exit 3; }
done
[ "$(id -u)" = 0 ] || { echo "start_slurm.sh: must run as root (SlurmUser=root)" >&2; exit 3; }

stop_daemons  # a previous instance in the same DIR
mkdir -p "$DIR"/{state,spool,log,munge}
chmod 700 "$DIR/munge"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
HOST=$(hostname -s)
CPUS=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -1)
MEM=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)

# munge: a fresh key, our own socket
dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1 count=1024 status=none
chmod 400 "$DIR/munge/munge.key"
munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"

cat > "$DIR/slurm.conf" <<CONF
ClusterName=xlmrtest
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's restart (default 120 s)
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait=15
MinJobAge=3600
SlurmctldTimeout=30
SlurmdTimeout=60
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
echo "export SLURM_CONF=$DIR/slurm.conf" > "$DIR/env"
export SLURM_CONF="$DIR/slurm.conf"

slurmctld -c -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"

for _ in $(seq 60); do
    if sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        echo "SLURM up: source $DIR/env (SLURM_CONF=$SLURM_CONF); logs in $DIR/log"
        exit 0
    fi
    sleep 0.5
done
echo "start_slurm.sh: the node did not come up; last log lines:" >&2
tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" "$DIR/log/munged.log" >&2 2>/dev/null || true
exit 4
