#!/usr/bin/env bash
# Start a single-node SLURM cluster for the tests, without systemd:
#   munged (as user munge) -> slurmctld -> slurmd -N localhost
# with one node "localhost" and one fake GPU (a device made with mknod) in
# one partition (default "debug").
#
# The node *advertises* 16 CPUs and 128 GB (at least as many CPUs as this
# machine has), so that profiles/slurm/config.yaml is submitted exactly as a
# user would submit it (train asks for 8 CPUs and 64 GB). Nothing is
# enforced (no cgroups, SlurmdParameters=config_overrides): like the GPU,
# the numbers are only what the scheduler books; jobs share the real cores.
#
# Needs root and the Debian packages from tests/slurm/install.sh.
# Idempotent: stops a cluster left by an earlier run, wipes the state dir
# and starts from scratch. Stop it with tests/slurm/stop-cluster.sh.
#
# Knobs (environment):
#   LORANOTES_SLURM_DIR        state dir (default /tmp/loranotes-slurm)
#   LORANOTES_SLURM_PARTITION  partition name (default debug)
#   LORANOTES_SLURM_TIMEOUT    seconds to wait for the node (default 60)
#   LORANOTES_SLURM_NODE_CPUS  CPUs the node advertises (default 16)
#   LORANOTES_SLURM_NODE_MEM_MB  memory it advertises (default 128000)
#   LORANOTES_SLURM_JOB_CPUS   real CPUs the jobs may run on (default 2):
#       slurmd is pinned to them with taskset and its jobs inherit that, so a
#       job's `--cores all` (and so a rule's threads, and torch's thread count)
#       is min(threads, 2) on any machine: the same as the tests' local
#       `--cores 2` run, whose numbers the SLURM run must reproduce.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE_DIR="${LORANOTES_SLURM_DIR:-/tmp/loranotes-slurm}"
PARTITION="${LORANOTES_SLURM_PARTITION:-debug}"
TIMEOUT="${LORANOTES_SLURM_TIMEOUT:-60}"
CTLD_PORT="${LORANOTES_SLURMCTLD_PORT:-6817}"
SLURMD_PORT="${LORANOTES_SLURMD_PORT:-6818}"
MARKER="# loranotes test cluster"
GPU_DEVICE=/dev/loranotes-fake-gpu0

log() { echo "start-cluster: $*"; }

dump_logs() {
    local f
    for f in "$STATE_DIR/slurmctld.log" "$STATE_DIR/slurmd.log" \
             /var/log/munge/munged.log; do
        if [ -f "$f" ]; then
            echo "----- last lines of $f -----" >&2
            tail -n 30 "$f" >&2
        fi
    done
    echo "----- sinfo -----" >&2
    timeout 5 sinfo -N -l >&2 2>&1 || true
    timeout 5 scontrol show node localhost >&2 2>&1 || true
}

die() {
    echo "start-cluster: ERROR: $*" >&2
    dump_logs
    exit 1
}

# ---------------------------------------------------------------- checks
if [ "$(id -u)" -ne 0 ]; then
    echo "start-cluster: ERROR: must run as root (daemons, mknod, /etc/slurm)" >&2
    exit 1
fi
missing=""
for bin in munged slurmctld slurmd sinfo sbatch squeue scontrol srun; do
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] \
        || missing="$missing $bin"
done
if [ -n "$missing" ]; then
    echo "start-cluster: ERROR: missing:$missing" >&2
    echo "start-cluster: install them with: bash tests/slurm/install.sh" >&2
    exit 1
fi
export PATH="$PATH:/usr/sbin:/sbin"

for f in /etc/slurm/slurm.conf /etc/slurm/gres.conf; do
    if [ -e "$f" ] && ! head -n 1 "$f" | grep -qF "$MARKER"; then
        echo "start-cluster: ERROR: $f exists and was not written by this" \
             "script; refusing to overwrite a real cluster's configuration" >&2
        exit 1
    fi
done

# ------------------------------------------------- clean slate every time
LORANOTES_SLURM_DIR="$STATE_DIR" bash "$HERE/stop-cluster.sh" >/dev/null || true
rm -rf "$STATE_DIR"
mkdir -p "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd"
chmod 755 "$STATE_DIR"

# ------------------------------------------------------------ node sizing
CPUS="${LORANOTES_SLURM_NODE_CPUS:-16}"
[ "$CPUS" -lt "$(nproc)" ] && CPUS=$(nproc)
MEM_MB="${LORANOTES_SLURM_NODE_MEM_MB:-128000}"

# ------------------------------------------------------------ fake GPU
if [ ! -c "$GPU_DEVICE" ]; then
    rm -f "$GPU_DEVICE"
    mknod -m 666 "$GPU_DEVICE" c 1 3 \
        || { echo "start-cluster: ERROR: mknod $GPU_DEVICE failed" >&2; exit 1; }
fi
echo "$GPU_DEVICE" > "$STATE_DIR/gpu-device"

# ------------------------------------------------------------ config files
mkdir -p /etc/slurm
sed -e "s|@STATE_DIR@|$STATE_DIR|g" -e "s|@CPUS@|$CPUS|g" \
    -e "s|@MEM_MB@|$MEM_MB|g" -e "s|@PARTITION@|$PARTITION|g" \
    -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" \
    "$HERE/slurm.conf.in" > /etc/slurm/slurm.conf
sed -e "s|@GPU_DEVICE@|$GPU_DEVICE|g" "$HERE/gres.conf.in" > /etc/slurm/gres.conf
chmod 644 /etc/slurm/slurm.conf /etc/slurm/gres.conf
cp /etc/slurm/slurm.conf /etc/slurm/gres.conf "$STATE_DIR/"

# ------------------------------------------------------------ munge
if ! id munge >/dev/null 2>&1; then
    echo "start-cluster: ERROR: no user 'munge' (is the munge package installed?)" >&2
    exit 1
fi
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
chown munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 700 /etc/munge /var/lib/munge /var/log/munge
chmod 755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating munge key"
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key

if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged already running, reusing it"
else
    log "starting munged"
    runuser -u munge -- munged --force \
        || die "munged failed to start"
    for _ in $(seq 1 20); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.25
    done
    munge -n | unmunge >/dev/null || die "munge does not answer"
    cp /run/munge/munged.pid "$STATE_DIR/munged.pid"
    touch "$STATE_DIR/munged.started"
fi

# ------------------------------------------------------------ slurm daemons
log "starting slurmctld"
slurmctld -c >"$STATE_DIR/slurmctld.stdout" 2>&1 \
    || die "slurmctld failed to start"
JOB_CPUS="${LORANOTES_SLURM_JOB_CPUS:-2}"
real_cpus=$(nproc)
[ "$JOB_CPUS" -gt "$real_cpus" ] && JOB_CPUS=$real_cpus
log "starting slurmd (jobs run on CPUs 0-$((JOB_CPUS - 1)))"
taskset -c "0-$((JOB_CPUS - 1))" slurmd -N localhost >"$STATE_DIR/slurmd.stdout" 2>&1 \
    || die "slurmd failed to start"

# ------------------------------------------------------------ wait for node
deadline=$(( $(date +%s) + TIMEOUT ))
state=""
resumed=0
while :; do
    state=$(timeout 5 sinfo -h -n localhost -o %T 2>/dev/null | head -n 1 || true)
    case "$state" in
        idle|mixed|allocated) break ;;
        drain*|down*)
            # a node drained by an earlier bad config stays drained
            if [ "$resumed" -lt 3 ]; then
                log "node is '$state', resuming it"
                timeout 5 scontrol update nodename=localhost state=resume || true
                resumed=$((resumed + 1))
            fi
            ;;
    esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
        die "node 'localhost' not idle after ${TIMEOUT}s (state: '${state:-no answer}')"
    fi
    sleep 0.5
done
log "node localhost is $state (advertises $CPUS CPUs, ${MEM_MB} MB, 1 fake GPU;" \
    "jobs really run on $JOB_CPUS CPUs; partition $PARTITION)"

# ------------------------------------------------------------ smoke test
out=$(timeout 60 srun -p "$PARTITION" -n 1 --gpus=1 --mem=100 -t 1 \
        printenv CUDA_VISIBLE_DEVICES 2>&1) \
    || die "smoke test 'srun --gpus=1' failed: $out"
log "smoke test ok: a --gpus=1 job saw CUDA_VISIBLE_DEVICES=$out"
timeout 10 scontrol show config | grep -E "^(ClusterName|MinJobAge|SchedulerParameters) " || true
sinfo
