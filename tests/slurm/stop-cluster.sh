#!/usr/bin/env bash
# Stop the single-node test cluster started by start-cluster.sh: cancel its
# jobs, stop slurmd and slurmctld (and munged, if start-cluster.sh started
# it), remove the fake GPU device and the generated /etc/slurm files.
# Idempotent: does nothing harmful when the cluster isn't running.
# The state dir (daemon logs) is kept for post-mortems; start-cluster.sh
# wipes it.
set -uo pipefail

STATE_DIR="${LORANOTES_SLURM_DIR:-/tmp/loranotes-slurm}"
MARKER="# loranotes test cluster"
GPU_DEVICE_FILE="$STATE_DIR/gpu-device"

log() { echo "stop-cluster: $*"; }

# stop_pidfile NAME PIDFILE: TERM the process, wait up to 15 s, then KILL
stop_pidfile() {
    local name=$1 pidfile=$2 pid i
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile" 2>/dev/null || true)
    rm -f "$pidfile"
    if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
        return 0
    fi
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 30); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.5
    done
    log "$name (pid $pid) did not stop, killing it"
    kill -KILL "$pid" 2>/dev/null || true
}

ours() { [ -f "$1" ] && head -n 1 "$1" | grep -qF "$MARKER"; }

# cancel whatever is still queued/running on *this* cluster, so no job
# outlives it (only when the controller answering is ours)
if ours /etc/slurm/slurm.conf && [ -f "$STATE_DIR/slurmctld.pid" ] \
        && command -v scancel >/dev/null 2>&1; then
    jobs=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
        log "cancelling jobs: $(echo $jobs)"
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null || true
        sleep 1
    fi
fi

stop_pidfile slurmd "$STATE_DIR/slurmd.pid"
stop_pidfile slurmctld "$STATE_DIR/slurmctld.pid"
if [ -f "$STATE_DIR/munged.started" ]; then
    stop_pidfile munged "$STATE_DIR/munged.pid"
    rm -f "$STATE_DIR/munged.started"
fi

if [ -f "$GPU_DEVICE_FILE" ]; then
    dev=$(cat "$GPU_DEVICE_FILE")
    [ -c "$dev" ] && rm -f "$dev"
    rm -f "$GPU_DEVICE_FILE"
fi

for f in /etc/slurm/slurm.conf /etc/slurm/gres.conf; do
    if ours "$f"; then
        rm -f "$f"
    fi
done
log "stopped (logs kept in $STATE_DIR)"
exit 0
