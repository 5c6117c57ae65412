"""Jobs that start warm.

Each job of a Snakemake run is a fresh Python process, and before doing any work a training or
generation job imports torch, transformers and peft: 7.8 s of a 2-core machine's time when idle,
14.5 s when busy (bench/startup.py), paid by every one of the default DAG's ~25 jobs. So a job's
entry (scripts/jobs/<script>.py) calls `run_job("<script>", snakemake)`, which asks a warm process
to run `<script>.main(snakemake)` in a fork of itself, with the job's working directory,
environment and standard streams, and exits with the fork's exit status. The warm process has the
libraries imported but none of loranotes' own modules, so every job runs the code as it is now.

The first job finds no warm process: it runs cold, in its own process, and starts one in the
background for the jobs that follow. A warm process serves the jobs of one user, one Python, one
set of library versions and one environment (the socket's name is a digest of them), and exits
after IDLE_SECONDS without a job.

Off, every job cold, under SLURM (the jobs run on other machines), where a GPU is visible (a fork
must not inherit a CUDA driver state; on a GPU the imports are a small share of a job), where
Python cannot fork, and with LORANOTES_WARM_START=0.

Signals reach the job: SIGINT, SIGTERM and SIGHUP sent to the entry process are passed on to the
fork, and a fork whose entry process is gone (killed with SIGKILL) is sent SIGTERM.
"""

import atexit
import fcntl
import hashlib
import importlib
import importlib.metadata
import logging
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

JOBS = Path(__file__).resolve().parent
SCRIPTS = JOBS.parent
IDLE_SECONDS = 300  # on a busy 2-core machine, 60 s can pass between two heavy jobs
# Jobs whose script imports torch: they wait for a warm process that is starting (it is further
# along than a cold start of their own would be); the others run cold meanwhile.
TORCH_SCRIPTS = {"build_model", "generate", "train"}
WARMING_WAIT_SECONDS = 120
# What a warm process imports before it takes jobs: what build_model, the first job that waits for
# it, needs, and what unpickles a job's request: 8 s on an idle 2-core machine, where importing
# PRELOAD_LATER too took 11.7 s.
PRELOAD = [
    "numpy",
    "torch",
    "transformers",
    "transformers.modeling_utils",
    "transformers.tokenization_utils_fast",
    "transformers.models.llama.modeling_llama",
    "transformers.models.qwen3.modeling_qwen3",
    "snakemake.script",
]
# The other jobs' libraries, imported once the warm process takes jobs, whenever none is waiting:
# while the first build_model pretrains (15 s). A job that starts before they are all in imports
# the rest itself.
PRELOAD_LATER = [
    "pandas",
    "bitsandbytes",
    "peft",
    "jinja2",
    "scipy.stats",  # compare_variants's t-tests
    "matplotlib.pyplot",  # the plots (plot_loss picks the Agg backend itself)
]
# The versions that name a warm process: a changed library needs a new one.
LIBRARIES = ["torch", "transformers", "peft", "bitsandbytes", "pandas", "numpy", "snakemake"]
# Variables no library reads when it is imported: a job gets them, they do not name a warm
# process (loranotes' own are read by the job; the shell's change with the directory).
JOB_TIME_VARIABLES = ("LORANOTES_COMMAND", "LORANOTES_CONFIG_FILES", "PWD", "OLDPWD", "SHLVL", "_")
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
HEADER = struct.Struct("!Q")  # length of the pickled request
REPLY = struct.Struct("!ci")  # b"P", pid of the fork; then b"X", its wait status


def disabled_reason(environ=os.environ):
    """Why jobs start cold here, or None when they may start warm."""
    if environ.get("LORANOTES_WARM_START", "1") == "0":
        return "LORANOTES_WARM_START=0"
    if "SLURM_JOB_ID" in environ:
        return "a SLURM job"
    if not hasattr(os, "fork") or not hasattr(socket, "AF_UNIX"):
        return "no fork() here"
    if any(Path("/dev").glob("nvidia[0-9]*")) and environ.get("CUDA_VISIBLE_DEVICES") not in ("", "-1"):
        return "a GPU is visible"
    return None


def _version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def server_key(environ=os.environ):
    """The digest that names the warm process this job may use."""
    identity = {
        "python": [sys.executable, sys.version],
        "libraries": {name: _version(name) for name in LIBRARIES},
        "server_code": Path(__file__).read_bytes(),
        "environment": {k: v for k, v in environ.items() if k not in JOB_TIME_VARIABLES},
    }
    return hashlib.sha256(pickle.dumps(identity)).hexdigest()[:20]


def runtime_dir():
    """A directory only this user can enter (sockets, locks and the warm processes' logs)."""
    directory = Path(tempfile.gettempdir()) / f"loranotes-warm-{os.getuid()}"
    directory.mkdir(mode=0o700, exist_ok=True)
    info = directory.lstat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise OSError(f"{directory} is not private to this user")
    return directory


def run_job(script, snakemake):
    """Run scripts/<script>.py's main(snakemake) warm if a warm process answers, else cold; exit
    with its exit status."""
    # scripts/ first: the entries here are named after the modules they run.
    sys.path[:] = [str(SCRIPTS)] + [p for p in sys.path if Path(p or ".").resolve() not in (SCRIPTS, JOBS)]
    if disabled_reason() is None:
        status = _run_warm(script, snakemake)
        if status is not None:
            exit_like(status)
    importlib.import_module(script).main(snakemake)


def _run_warm(script, snakemake):
    """The job's wait status if a warm process ran it, else None (after starting one)."""
    try:
        paths = server_paths(runtime_dir(), server_key())
    except OSError:
        return None
    status = _try_server(paths, script, snakemake)
    if status is None:
        start_server(paths)
        if script in TORCH_SCRIPTS and wait_until_warm(paths):
            status = _try_server(paths, script, snakemake)
    return status


def _try_server(paths, script, snakemake):
    try:
        return run_in_server(paths["socket"], script, snakemake)
    except (FileNotFoundError, ConnectionRefusedError):
        return None  # no warm process (yet), or one that just ended


def wait_until_warm(paths, seconds=WARMING_WAIT_SECONDS):
    """True once the starting warm process listens; False if none is starting or it takes too long."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if paths["socket"].exists():
            return True
        if not _server_alive(paths):
            return False
        time.sleep(0.1)
    return False


def _server_alive(paths):
    """Whether a warm process holds the lock (it does from its start to its end)."""
    lock = _take_lock(paths)
    if lock is None:
        return True
    os.close(lock)
    return False


def _take_lock(paths):
    """The descriptor of the warm process's lock, taken; None while a warm process holds it."""
    lock = os.open(paths["lock"], os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        return None
    return lock


def server_paths(directory, key):
    return {name: directory / f"{key}.{name}" for name in ("socket", "lock", "log")}


def run_in_server(socket_path, script, snakemake):
    """The wait status of the job run in the warm process at socket_path; None when the warm
    process did not start it (the caller then runs it cold)."""
    request = pickle.dumps(
        {
            "script": script,
            "snakemake": pickle.dumps(snakemake),  # unpickled in the fork only
            "cwd": os.getcwd(),
            "environ": dict(os.environ),
            "sys_path": list(sys.path),
            "argv": list(sys.argv),
        }
    )
    forwarding = SignalForwarding()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.connect(str(socket_path))
            socket.send_fds(connection, [HEADER.pack(len(request))], [0, 1, 2])
            connection.sendall(request)
            reply = _receive(connection, REPLY.size)
            if reply is None:
                return None
            forwarding.to(REPLY.unpack(reply)[1])
            reply = _receive(connection, REPLY.size)
    finally:
        forwarding.end()
    if reply is None:
        sys.exit("loranotes: the warm process ended before the job did; run again (LORANOTES_WARM_START=0 turns warm starts off)")
    return REPLY.unpack(reply)[1]


class SignalForwarding:
    """SIGINT, SIGTERM and SIGHUP sent to the entry process, passed on to the job's fork. Set up
    before the request is sent: a signal that comes before the fork's pid does is passed on once
    it is known, or, if the warm process never starts the job, taken by the entry itself when
    forwarding ends (the job then runs cold, or not at all)."""

    def __init__(self):
        self.pid, self.pending = None, []
        self.previous = {number: signal.signal(number, self._received) for number in FORWARDED_SIGNALS}

    def _received(self, number, _frame):
        if self.pid is None:
            self.pending.append(number)
        else:
            _signal_fork(self.pid, number)

    def to(self, pid):
        self.pid = pid
        for number in self.pending:
            _signal_fork(pid, number)
        self.pending.clear()

    def end(self):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        for number in self.pending:  # for a job that never started warm
            os.kill(os.getpid(), number)


def _signal_fork(pid, number):
    try:
        os.kill(pid, number)
    except ProcessLookupError:
        pass


def _receive(connection, size):
    """Exactly size bytes, or None at end of stream."""
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def exit_like(status):
    """Exit as the fork did: with its exit code, or killed by its signal."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
    os._exit(os.waitstatus_to_exitcode(status))


def start_server(paths):
    """Start a warm process in the background unless one is starting or running."""
    lock = _take_lock(paths)
    if lock is None:
        return  # one is starting or running
    # No warm process lives (we hold its lock): a socket here is a killed one's, and a job that
    # saw it would take it for the new one's, find nobody listening and start cold.
    paths["socket"].unlink(missing_ok=True)
    with open(paths["log"], "ab") as log:
        # The warm process holds the lock (its inherited copy of this file) while it lives.
        subprocess.Popen(
            [sys.executable, __file__, str(paths["socket"]), str(lock)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=[lock],
            start_new_session=True,
            cwd="/",
        )
    os.close(lock)


def serve(socket_path, lock, idle_seconds=IDLE_SECONDS):
    """Import PRELOAD, then fork a job for each request until idle_seconds pass without one,
    importing PRELOAD_LATER meanwhile. lock: the file descriptor of the lock it holds while it
    lives; it writes its pid there."""
    started = time.monotonic()
    # Stopped (pkill, a logout), it removes its socket on the way out (the forks reset this).
    signal.signal(signal.SIGTERM, lambda number, _frame: sys.exit(128 + number))
    os.ftruncate(lock, 0)
    os.pwrite(lock, str(os.getpid()).encode(), 0)
    for name in PRELOAD:
        _preload(name)
    print(f"{time.strftime('%F %T')} pid {os.getpid()}: warm after {time.monotonic() - started:.1f} s", flush=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bound and listening under a temporary name, then renamed: a socket that exists accepts
    # connections.
    listener.bind(f"{socket_path}.{os.getpid()}")
    listener.listen(16)
    os.rename(f"{socket_path}.{os.getpid()}", socket_path)
    later = list(PRELOAD_LATER)
    jobs = {}  # pid -> Job
    last_activity = time.monotonic()
    try:
        while jobs or time.monotonic() - last_activity < idle_seconds:
            ready = _wait(listener, jobs, timeout=0 if later else 1.0)
            if listener in ready:
                connection, _ = listener.accept()
                job = _start_job(listener, connection)
                if job is not None:
                    jobs[job.pid] = job
            for pid, status in _ended(jobs):
                print(f"{time.strftime('%F %T')} job {pid}: exit status {os.waitstatus_to_exitcode(status)}", flush=True)
                job = jobs.pop(pid)
                job.close()
                with job.connection as connection:
                    try:
                        connection.sendall(REPLY.pack(b"X", status))
                    except OSError:
                        pass  # its entry process is gone
                last_activity = time.monotonic()
            if not ready and later:
                _preload(later.pop(0))
                if not later:
                    print(f"{time.strftime('%F %T')} all imported after {time.monotonic() - started:.1f} s", flush=True)
    finally:
        socket_path.unlink(missing_ok=True)
        listener.close()


def _preload(name):
    try:
        importlib.import_module(name)
    except ImportError:
        pass  # an optional library (bitsandbytes) that is not installed


class Job:
    """A forked job: its pid, the connection to its entry process, and a descriptor that becomes
    readable when it ends (a pidfd; None where there is none, and then it is polled)."""

    POLL_SECONDS = 0.2

    def __init__(self, pid, connection):
        self.pid, self.connection = pid, connection
        try:
            self.ended_fd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # not Linux 5.3+ / Python 3.9+
            self.ended_fd = None

    def close(self):
        if self.ended_fd is not None:
            os.close(self.ended_fd)


def _wait(listener, jobs, timeout):
    """What became ready within `timeout` seconds: the listener (a request) or an ended job's
    descriptor. A job's end is seen as it happens, not at the next poll: the entry process, and
    Snakemake after it, learn of it at once."""
    watched = [listener, *(job.ended_fd for job in jobs.values() if job.ended_fd is not None)]
    if any(job.ended_fd is None for job in jobs.values()):
        timeout = min(timeout, Job.POLL_SECONDS)
    ready, _, _ = select.select(watched, [], [], timeout)
    return ready


def _ended(jobs):
    """(pid, wait status) of each fork that has ended."""
    for pid in list(jobs):
        ended, status = os.waitpid(pid, os.WNOHANG)
        if ended:
            yield pid, status


def _start_job(listener, connection):
    """Fork a job for the request on connection; the Job, or None for a broken request."""
    try:
        header, fds, _, _ = socket.recv_fds(connection, HEADER.size, 3)
        request = _receive(connection, HEADER.unpack(header)[0])
        if request is None or len(fds) != 3:
            raise EOFError("incomplete request")
        request = pickle.loads(request)
    except (OSError, struct.error, EOFError, pickle.UnpicklingError) as error:
        print(f"a broken request: {error!r}", flush=True)
        connection.close()
        return None
    pid = os.fork()
    if pid == 0:
        listener.close()
        os._exit(_run_forked(connection, fds, request))
    for fd in fds:
        os.close(fd)
    print(f"{time.strftime('%F %T')} job {pid}: {request['script']} in {request['cwd']}", flush=True)
    connection.sendall(REPLY.pack(b"P", pid))
    return Job(pid, connection)


def _run_forked(connection, fds, request):
    """In the fork: become the job (streams, directory, environment), run it, return its exit
    code as the interpreter would."""
    for number in FORWARDED_SIGNALS:
        signal.signal(number, signal.default_int_handler if number == signal.SIGINT else signal.SIG_DFL)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    # Streams of the job's own, line-buffered: progress lines appear as they are written.
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["environ"])
    sys.path[:] = request["sys_path"]
    sys.argv[:] = request["argv"]
    importlib.invalidate_caches()  # loranotes' modules as they are on disk now
    threading.Thread(target=_end_with_entry, args=(connection,), daemon=True).start()
    try:
        importlib.import_module(request["script"]).main(pickle.loads(request["snakemake"]))
        code = 0
    except SystemExit as stop:
        code = _exit_code(stop.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 128 + signal.SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def _exit_code(code):
    """What the interpreter makes of sys.exit(code)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _end_with_entry(connection):
    """The job's entry process never writes after its request: end of stream means it is gone
    (killed with SIGKILL, which it cannot pass on), and the job stops as a killed job does."""
    try:
        connection.recv(1)
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    # A warm process, started by start_server: the path of its socket, the lock's descriptor.
    serve(Path(sys.argv[1]), int(sys.argv[2]))
