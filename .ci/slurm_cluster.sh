#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for `make test-slurm` (tests/test_slurm.py).
#
#   .ci/slurm_cluster.sh install      # apt-get slurm-wlm slurmdbd munge mariadb-server (root; skipped when present)
#   .ci/slurm_cluster.sh start DIR    # munged, MariaDB, slurmdbd, slurmctld, slurmd: all state under DIR
#   .ci/slurm_cluster.sh stop DIR     # stops the daemons started in DIR (by their pid files)
#
# `start` writes DIR/slurm.conf describing this machine (its cores and memory, one partition
# `local`), every daemon on loopback ports of its own, and DIR/env (`export SLURM_CONF=...`):
# source it, and sbatch / squeue / sacct talk to this cluster. `sacct` needs accounting
# storage: Debian's Slurm 22.05 has no text-file one (jobcomp/filetxt logs finished jobs, but
# sacct does not read it), so slurmdbd stores jobs in a MariaDB whose data lie in DIR/mysql.
set -euo pipefail

SLURM_PACKAGES="slurm-wlm slurmdbd munge mariadb-server"
# loopback ports away from Slurm's and MariaDB's defaults (a real installation may run beside)
SLURMCTLD_PORT=${STEVS_SLURMCTLD_PORT:-16817}
SLURMD_PORT=${STEVS_SLURMD_PORT:-16818}
SLURMDBD_PORT=${STEVS_SLURMDBD_PORT:-16819}
MARIADB_PORT=${STEVS_MARIADB_PORT:-16306}
MUNGE_SOCKET=/run/munge/munge.socket.2

install() {
    local tool missing=""
    for tool in slurmctld slurmd slurmdbd sacct munged mariadbd mariadb-install-db; do
        command -v "$tool" >/dev/null || [[ -x /usr/sbin/$tool ]] || missing=1
    done
    if [[ -z $missing ]]; then
        echo "slurm, slurmdbd, munge and mariadb are installed"
        return
    fi
    if [[ $(id -u) != 0 ]]; then
        echo "installing $SLURM_PACKAGES needs root (apt-get); install them, then rerun" >&2
        exit 1
    fi
    apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        $SLURM_PACKAGES >/dev/null
}

# wait_for SECONDS COMMAND...: retry COMMAND every half second until it succeeds
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS > deadline)); then
            echo "timed out waiting for: $*" >&2
            return 1
        fi
        sleep 0.5
    done
}

write_conf() {
    local dir=$1 host node mem_mb
    host=$(hostname -s)
    # this machine as slurmd sees it (sockets, cores, threads: CPUs alone would make Slurm
    # count one core per socket); jobs may ask for its memory less 1 GB for the daemons
    mem_mb=$(($(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 1024))
    node=$(slurmd -C | head -1 | sed "s/RealMemory=[0-9]*/RealMemory=$mem_mb/")
    cat >"$dir/slurm.conf" <<CONF
ClusterName=stevs
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$SLURMCTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
ReturnToService=2
SlurmctldParameters=enable_configless
MinJobAge=600
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=10
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$SLURMDBD_PORT
AccountingStoreFlags=job_comment
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
    cat >"$dir/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$SLURMDBD_PORT
SlurmUser=root
PidFile=$dir/slurmdbd.pid
LogFile=$dir/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MARIADB_PORT
StorageUser=root
StorageLoc=slurm_acct_db
CONF
    chmod 600 "$dir/slurmdbd.conf"
    echo "export SLURM_CONF=$dir/slurm.conf" >"$dir/env"
}

start() {
    local dir=$1
    mkdir -p "$dir/state" "$dir/spool" "$dir/mysql"
    dir=$(cd "$dir" && pwd)
    chmod 700 "$dir"
    write_conf "$dir"
    export SLURM_CONF=$dir/slurm.conf
    # munge on its usual socket (slurmd's first configless fetch knows no other), with a key,
    # pid, seed and log file of its own in DIR
    if [[ -S $MUNGE_SOCKET ]]; then
        echo "a munged already listens on $MUNGE_SOCKET: the test cluster needs this machine" \
            "to itself (stop that munge, or run on a clean machine)" >&2
        exit 1
    fi
    mkdir -p "$(dirname "$MUNGE_SOCKET")"
    dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge.key"
    munged --force --socket="$MUNGE_SOCKET" --key-file="$dir/munge.key" \
        --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munged.seed"
    # MariaDB for slurmdbd: its data in DIR, listening on loopback only
    mariadb-install-db --no-defaults --user=root --datadir="$dir/mysql" \
        --auth-root-authentication-method=normal >"$dir/mariadb-install.log" 2>&1
    mariadbd --no-defaults --user=root --datadir="$dir/mysql" --socket="$dir/mysql.sock" \
        --bind-address=127.0.0.1 --port="$MARIADB_PORT" --pid-file="$dir/mariadb.pid" \
        --log-error="$dir/mariadb.log" --innodb-buffer-pool-size=64M \
        </dev/null >/dev/null 2>&1 &
    wait_for 60 mariadb --no-defaults --socket="$dir/mysql.sock" -u root -e "select 1"
    slurmdbd
    wait_for 60 sacctmgr -n list cluster
    slurmctld
    # configless, as many clusters run it: slurmd fetches the configuration from slurmctld and
    # keeps it in /run/slurm/conf, where commands run inside jobs find it (the SLURM plugin's
    # job steps call srun without SLURM_CONF)
    env -u SLURM_CONF slurmd --conf-server "127.0.0.1:$SLURMCTLD_PORT"
    wait_for 60 bash -c "sinfo -h -o %t | grep -q idle"
    echo "Slurm is up: source $dir/env"
}

stop() {
    local dir=$1 name pid
    # jobs still queued or running (a test that failed half-way) end with the cluster
    if [[ -f $dir/slurmctld.pid ]]; then
        SLURM_CONF=$dir/slurm.conf scancel --full --user="$(id -un)" 2>/dev/null || true
        SLURM_CONF=$dir/slurm.conf wait_for 30 bash -c '[[ -z $(squeue -h) ]]' || true
    fi
    for name in slurmd slurmctld slurmdbd mariadb munged; do
        [[ -f $dir/$name.pid ]] || continue
        pid=$(cat "$dir/$name.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 60); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
        rm -f "$dir/$name.pid"
    done
    # slurmd's configless cache link, when it points into DIR
    if [[ $(readlink -f /run/slurm/conf) == "$dir"/* ]]; then
        rm -f /run/slurm/conf
    fi
}

case "${1:-}" in
install) install ;;
start) start "$2" ;;
stop) stop "$2" ;;
*)
    echo "usage: $0 install | start DIR | stop DIR" >&2
    exit 2
    ;;
esac
