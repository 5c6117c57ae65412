"""One loranotes run per directory: a run that starts jobs holds `.snakemake/loranotes.lock` (its
process id, host, start time and command) until it ends, and another run refuses to start while
that process is alive, saying which one it is.

Snakemake's own lock ("Directory cannot be locked") cannot tell a run that is still going from
one that was killed, so its advice, `snakemake --unlock`, lets two runs write the same outputs
when the first is alive. This lock can: a holder that is no longer running (killed, the machine
restarted) is replaced with a note. A holder on another host (a shared filesystem) cannot be
checked from here: the message says how to check it there.
"""

import datetime
import json
import os
import socket
from pathlib import Path

from errors import LoranotesError

LOCK_FILE = ".snakemake/loranotes.lock"


class RunLockError(LoranotesError):
    """Another run of the pipeline is active in this directory."""


def process_start(pid):
    """When process `pid` started, in clock ticks since boot (/proc/<pid>/stat, field 22), or
    None when there is no such process: a pid reused by a new process has another start."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def this_run(command):
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "process_start": process_start(pid),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command}


def holder(lock_file=LOCK_FILE):
    """The run recorded in the lock file, or None (no file, or unreadable: half-written)."""
    try:
        return json.loads(Path(lock_file).read_text())
    except (OSError, ValueError):
        return None


def is_alive(run):
    """True / False for a holder on this host; None when it runs on another host."""
    if run["host"] != socket.gethostname():
        return None
    start = process_start(run["pid"])
    return start is not None and start == run.get("process_start")


def describe(run):
    return (f"pid {run['pid']} on {run['host']}, started {run['started']}: "
            f"`{run['command']}`")


def active_holder(lock_file=LOCK_FILE):
    """The other run holding the lock, if it may still be running (alive, or on another host)."""
    run = holder(lock_file)
    if run is None or run["pid"] == os.getpid() and run["host"] == socket.gethostname():
        return None
    return run if is_alive(run) is not False else None


def refusal(run, lock_file=LOCK_FILE):
    """The one-line message for a run that may not start because `run` holds the directory."""
    if is_alive(run) is None:
        return (f"another loranotes run may be active in this directory ({describe(run)}); this "
                f"host cannot check a process on {run['host']}: there, `ps -p {run['pid']}` shows "
                f"whether it runs; if it does not, delete {lock_file} and rerun")
    return (f"another loranotes run is active in this directory ({describe(run)}); two runs "
            f"would write the same outputs. Wait for it to end, or stop it (kill {run['pid']}: "
            "training stops at a checkpoint), then rerun. Do not `snakemake --unlock` while it runs")


def acquire(command, lock_file=LOCK_FILE):
    """Hold the lock for this process, or raise RunLockError naming the run that holds it.
    Returns the stale holder it replaced (a run that ended without releasing it), or None."""
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    other = active_holder(lock_file)
    if other:
        raise RunLockError(refusal(other, lock_file))
    stale = holder(lock_file)  # a run that ended without releasing it (killed), or none
    lock_file.unlink(missing_ok=True)  # (also an unreadable one: its writer died)
    try:  # O_EXCL: of two runs starting at once, one creates the file, the other sees it
        descriptor = os.open(lock_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        raise RunLockError(refusal(holder(lock_file) or {
            "pid": "?", "host": "?", "started": "just now", "command": "?"}, lock_file)) from None
    with os.fdopen(descriptor, "w") as f:
        f.write(json.dumps(this_run(command)) + "\n")
    return stale


def release(lock_file=LOCK_FILE):
    """Remove the lock if this process holds it."""
    run = holder(lock_file)
    if run and run["pid"] == os.getpid() and run["host"] == socket.gethostname():
        Path(lock_file).unlink(missing_ok=True)
