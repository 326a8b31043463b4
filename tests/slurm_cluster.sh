#!/usr/bin/env bash
# A throwaway one-node SLURM cluster on localhost, for testing the SLURM profile for real.
#
#   tests/slurm_cluster.sh install          # root: apt-get install the Debian packages (once per machine)
#   tests/slurm_cluster.sh start ROOT       # start munged, MariaDB, slurmdbd, slurmctld, slurmd under ROOT
#   . ROOT/env.sh                           # SLURM_CONF and a PATH whose `srun` finds the config
#   tests/slurm_cluster.sh stop ROOT        # cancel every job, stop the daemons by pid, remove ROOT
#
# ROOT must not exist yet (or be empty): every start is fresh (an old StateSaveLocation leaves the node
# DRAINED). The node "$(hostname -s)" has the machine's CPUs, a `cpu` partition (the default) and a `gpu`
# partition; it declares two GPUs as a generic resource backed by placeholder device files, so
# `--gpus=1` is scheduled for real (CUDA_VISIBLE_DEVICES / SLURM_STEP_GPUS set in the job) although no GPU
# exists. Accounting runs through slurmdbd + MariaDB, so `sacct` (which the Snakemake plugin polls) works.
# Every daemon talks over 127.0.0.1 on a free port picked at start (no name resolution needed) and keeps its
# files under ROOT; nothing under /etc is touched. Exit status 77 means "cannot run here" (not root, packages missing), with the reason on stderr.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
COMMANDS=(slurmctld slurmd slurmdbd sbatch srun sacct sacctmgr scontrol sinfo squeue scancel munged munge
          mariadbd mariadb-install-db mariadb)

die() { echo "slurm_cluster: $*" >&2; exit 1; }
cannot() { echo "slurm_cluster: cannot run here: $*" >&2; exit 77; }
log() { echo "slurm_cluster: $*" >&2; }

missing_commands() {
    local c missing=()
    for c in "${COMMANDS[@]}"; do command -v "$c" >/dev/null 2>&1 || missing+=("$c"); done
    echo "${missing[*]:-}"
}

preflight() {
    [[ $(id -u) == 0 ]] || cannot "the daemons run as root here (SlurmUser=root); run as root"
    local missing
    missing=$(missing_commands)
    [[ -z $missing ]] || cannot "missing $missing; install with: tests/slurm_cluster.sh install (apt-get install ${PACKAGES[*]})"
    command -v python3 >/dev/null || cannot "python3 is needed to pick free ports"
}

cmd_install() {
    [[ $(id -u) == 0 ]] || cannot "apt-get needs root"
    if [[ -z $(missing_commands) ]]; then log "packages already installed"; return 0; fi
    command -v apt-get >/dev/null || cannot "no apt-get: install ${PACKAGES[*]} with your package manager"
    log "installing ${PACKAGES[*]}"
    # no daemon is started by the packages' scripts where policy-rc.d forbids it (containers);
    # this harness starts its own under ROOT either way
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || cannot "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >&2 \
        || cannot "apt-get install ${PACKAGES[*]} failed"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2; shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || { log "timed out after ${limit}s waiting for $what"; return 1; }
        sleep 0.2
    done
}

free_ports() {  # free_ports N: N distinct currently free TCP ports on localhost
    python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

node_memory_mb() {  # RealMemory slurmd sees, less 2 GiB for the system (at least 1 GiB)
    local real
    real=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
    [[ -n $real ]] || die "could not read RealMemory from slurmd -C"
    echo $(( real > 3072 ? real - 2048 : 1024 ))
}

cmd_start() {
    local root=${1:-}
    [[ -n $root ]] || die "usage: $0 start ROOT"
    preflight
    if [[ -e $root ]] && [[ -n $(ls -A "$root") ]]; then die "$root exists and is not empty (each start needs a fresh folder)"; fi
    mkdir -p "$root"
    root=$(cd "$root" && pwd)
    # a start that fails half-way stops what it started (logs kept for the post-mortem)
    START_ROOT=$root
    trap 'rc=$?; if ((rc != 0)); then log "start failed: stopping what was started; logs in $START_ROOT/log"; cmd_stop "$START_ROOT" --keep || true; fi' EXIT
    local host cpus mem ctld_port slurmd_port dbd_port db_port
    host=$(hostname -s)
    cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -1)
    mem=$(node_memory_mb)
    read -r ctld_port slurmd_port dbd_port db_port < <(free_ports 4)
    mkdir -p "$root"/{etc,munge,db,state,spool,log,run,bin,dev}
    echo "made by tests/slurm_cluster.sh start; removed by tests/slurm_cluster.sh stop" >"$root/.slurm_cluster"
    chmod 755 "$root" "$root/munge"   # munged wants its socket's folder world-readable, not writable

    # -- placeholder GPU device files (the device numbers of /dev/null)
    mknod "$root/dev/gpu0" c 1 3 && mknod "$root/dev/gpu1" c 1 3 \
        || cannot "mknod is not permitted here (the placeholder GPU device files)"

    # -- munge: a fresh key and a private socket
    dd if=/dev/urandom of="$root/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$root/munge/munge.key"
    local sock=$root/munge/munge.socket
    munged --force --socket="$sock" --key-file="$root/munge/munge.key" --pid-file="$root/run/munged.pid" \
        --log-file="$root/log/munged.log" --seed-file="$root/munge/munged.seed" \
        || { cat "$root/log/munged.log" >&2 || true; die "munged did not start"; }
    wait_for 10 munged bash -c "munge -n -S '$sock' | unmunge -S '$sock'"

    # -- MariaDB for slurmdbd: TCP on a free port of 127.0.0.1 only, a password of its own
    local db_pass
    db_pass=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
    mariadb-install-db --no-defaults --user=root --datadir="$root/db/data" --skip-test-db \
        --auth-root-authentication-method=socket >"$root/log/mariadb-install.log" 2>&1 \
        || { tail -20 "$root/log/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
    (setsid mariadbd --no-defaults --user=root --datadir="$root/db/data" --socket="$root/db/mysqld.sock" \
        --port="$db_port" --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$root/run/mariadbd.pid" \
        --log-error="$root/log/mariadbd.log" --innodb-buffer-pool-size=32M --skip-log-bin \
        </dev/null >/dev/null 2>&1 &)
    wait_for 30 mariadbd mariadb --no-defaults -S "$root/db/mysqld.sock" -u root -e "select 1" \
        || { tail -20 "$root/log/mariadbd.log" >&2; die "mariadbd did not start"; }
    mariadb --no-defaults -S "$root/db/mysqld.sock" -u root -e \
        "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$db_pass';
         GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"

    # -- configuration
    cat >"$root/etc/slurm.conf" <<EOF
# generated by tests/slurm_cluster.sh; throwaway test cluster
ClusterName=layerscope
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$sock
CredType=cred/munge
StateSaveLocation=$root/state
SlurmdSpoolDir=$root/spool/slurmd-%n
SlurmctldPidFile=$root/run/slurmctld.pid
SlurmdPidFile=$root/run/slurmd.pid
SlurmctldLogFile=$root/log/slurmctld.log
SlurmdLogFile=$root/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
ReturnToService=2
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmdTimeout=60
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
AccountingStoragePass=$sock
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$host NodeAddr=127.0.0.1 NodeHostname=$host CPUs=$cpus RealMemory=$mem Gres=gpu:2 State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$host Default=NO MaxTime=INFINITE State=UP
EOF
    cat >"$root/etc/gres.conf" <<EOF
AutoDetect=off
Name=gpu File=$root/dev/gpu[0-1]
EOF
    cat >"$root/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$sock
DbdHost=$host
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=root
PidFile=$root/run/slurmdbd.pid
LogFile=$root/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=slurm
StoragePass=$db_pass
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$root/etc/slurmdbd.conf"
    export SLURM_CONF=$root/etc/slurm.conf

    # The executor plugin's job step drops every SLURM_* variable (SLURM_CONF too) before its inner
    # `srun`: this wrapper, first on PATH, puts the config back.
    cat >"$root/bin/srun" <<EOF
#!/bin/sh
export SLURM_CONF=$root/etc/slurm.conf
exec $(command -v srun) "\$@"
EOF
    chmod 755 "$root/bin/srun"
    cat >"$root/env.sh" <<EOF
export SLURM_CONF=$root/etc/slurm.conf
export PATH=$root/bin:\$PATH
EOF

    # -- daemons (each daemonizes and writes its pid file)
    slurmdbd || die "slurmdbd did not start (see $root/log/slurmdbd.log)"
    wait_for 30 slurmdbd sacctmgr -n list cluster \
        || { tail -20 "$root/log/slurmdbd.log" >&2; die "slurmdbd is not answering"; }
    sacctmgr -i add cluster layerscope >/dev/null
    slurmctld -i || die "slurmctld did not start (see $root/log/slurmctld.log)"
    wait_for 30 slurmctld scontrol ping \
        || { tail -20 "$root/log/slurmctld.log" >&2; die "slurmctld is not answering"; }
    slurmd -N "$host" || die "slurmd did not start (see $root/log/slurmd.log)"
    wait_for 30 "node $host to be idle" bash -c "sinfo -h -n '$host' -o %T | grep -qx idle" \
        || { sinfo -N -l >&2 || true; tail -20 "$root/log/slurmd.log" >&2; die "node $host is not idle"; }
    trap - EXIT
    log "cluster up in $root (partitions: $(sinfo -h -o %P | tr '\n' ' '))"
    echo "$root/env.sh"
}

stop_pidfile() {  # stop_pidfile FILE NAME: TERM, wait up to 15 s, then KILL
    local file=$1 name=$2 pid
    [[ -s $file ]] || return 0
    pid=$(cat "$file")
    [[ $pid =~ ^[0-9]+$ ]] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 15))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name ($pid) ignored SIGTERM: killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
}

cmd_stop() {
    local root=${1:-} keep=${2:-}
    [[ -n $root ]] || die "usage: $0 stop ROOT [--keep]"
    [[ -d $root ]] || { log "$root does not exist: nothing to stop"; return 0; }
    root=$(cd "$root" && pwd)
    [[ -f $root/.slurm_cluster ]] || die "$root is not a cluster folder made by this script (no .slurm_cluster)"
    export SLURM_CONF=$root/etc/slurm.conf
    if [[ -f $SLURM_CONF && -s $root/run/slurmctld.pid ]] && kill -0 "$(cat "$root/run/slurmctld.pid")" 2>/dev/null; then
        scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
        wait_for 30 "jobs to end" bash -c '[[ -z $(squeue -h -t RUNNING,PENDING,COMPLETING,SUSPENDED -o %i) ]]' || true
    fi
    stop_pidfile "$root/run/slurmd.pid" slurmd
    stop_pidfile "$root/run/slurmctld.pid" slurmctld
    stop_pidfile "$root/run/slurmdbd.pid" slurmdbd
    stop_pidfile "$root/run/mariadbd.pid" mariadbd
    stop_pidfile "$root/run/munged.pid" munged
    if [[ $keep == --keep ]]; then log "stopped; files kept in $root"; else rm -rf "$root"; log "stopped; $root removed"; fi
}

cmd_status() {
    local root=${1:-}
    [[ -n $root ]] || die "usage: $0 status ROOT"
    export SLURM_CONF=$root/etc/slurm.conf
    sinfo && squeue
}

case ${1:-} in
    install) cmd_install ;;
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    status) shift; cmd_status "$@" ;;
    check) preflight; echo "ok" ;;
    *) echo "usage: $0 install | check | start ROOT | stop ROOT [--keep] | status ROOT" >&2; exit 2 ;;
esac
