"""Jobs started warm (scripts/jobs/warm_start.py) behave as jobs started cold: the same work in the
job's directory and environment, output on the job's streams, the job's exit status, and signals
sent to the job reach it; and warm starts are off where they must be."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, copy_workflow

JOBS = REPO / "scripts" / "jobs"
# Imported from its file: scripts/jobs on sys.path would put the jobs' entries (train.py, ...)
# before the modules they are named after, for every test after this one.
_spec = importlib.util.spec_from_file_location("warm_start", JOBS / "warm_start.py")
warm_start = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(warm_start)

# A job's script, as scripts/train.py is one: main(snakemake) does what snakemake.params says.
PROBE = '''
import json, os, signal, sys, time

def main(snakemake):
    record = {"pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(),
              "variable": os.environ.get("PROBE_VARIABLE")}
    with open(snakemake.output[0], "w") as out:
        json.dump(record, out)
    print("progress line", flush=True)
    action = snakemake.params["action"]
    if action == "exit 3":
        sys.exit(3)
    if action == "message":
        sys.exit("loranotes: a clear message")
    if action == "raise":
        raise ValueError("a bug")
    if action == "wait":
        def stop(number, frame):
            with open(snakemake.output[0] + ".signal", "w") as out:
                out.write(signal.Signals(number).name)
            sys.exit(128 + number)
        signal.signal(signal.SIGTERM, stop)
        open(snakemake.output[0] + ".waiting", "w").close()
        time.sleep(120)
'''


def entry_command(module_dir, output, action):
    """A job's entry process, as scripts/jobs/<script>.py is one."""
    code = f"""
        import sys
        sys.path[:0] = [{str(JOBS)!r}, {str(module_dir)!r}]
        from types import SimpleNamespace
        from warm_start import run_job
        run_job("probe_job", SimpleNamespace(output=[{str(output)!r}], params={{"action": {action!r}}}))
    """
    return [sys.executable, "-c", textwrap.dedent(code)]


@pytest.fixture(scope="module")
def job_env():
    """An environment with a private TMPDIR (its own warm process), a probe script, and the warm
    process's clean-up."""
    tmp = Path(tempfile.mkdtemp(prefix="lw", dir="/tmp"))  # short: a socket path has <108 bytes
    (tmp / "probe_job.py").write_text(PROBE)
    env = {**os.environ, "TMPDIR": str(tmp), "PROBE_VARIABLE": "from the job"}
    for name in ("LORANOTES_WARM_START", "SLURM_JOB_ID"):
        env.pop(name, None)
    yield tmp, env
    for lock in tmp.glob("loranotes-warm-*/*.lock"):
        if lock.read_text().strip():
            try:
                os.kill(int(lock.read_text()), signal.SIGTERM)
            except ProcessLookupError:
                pass


def run_entry(job_env, name, action="ok", env=None, **popen):
    tmp, base_env = job_env
    workdir = tmp / name
    workdir.mkdir()
    command = entry_command(tmp, workdir / "record.json", action)
    return subprocess.Popen(command, cwd=workdir, env=env or base_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen), workdir


def finished(process):
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, stdout, stderr


def record(workdir):
    return json.loads((workdir / "record.json").read_text())


@pytest.fixture(scope="module")
def warm(job_env):
    """The first job runs cold and starts a warm process; returns that process's pid."""
    process, workdir = run_entry(job_env, "first")
    code, stdout, _ = finished(process)
    assert code == 0 and "progress line" in stdout
    assert record(workdir)["pid"] == process.pid  # cold: in the entry process itself
    tmp, env = job_env
    paths = warm_start.server_paths(next(tmp.glob("loranotes-warm-*")), warm_start.server_key(env))
    assert warm_start.wait_until_warm(paths, seconds=240), (tmp / paths["log"]).read_text()
    return int(paths["lock"].read_text())


def test_a_job_runs_warm_in_its_own_directory_environment_and_streams(job_env, warm):
    process, workdir = run_entry(job_env, "second")
    code, stdout, stderr = finished(process)
    assert code == 0, stderr
    assert stdout == "progress line\n"
    job = record(workdir)
    assert job["pid"] != process.pid and job["ppid"] == warm  # a fork of the warm process
    assert job["cwd"] == str(workdir)
    assert job["variable"] == "from the job"


@pytest.mark.parametrize("action, code, on_stderr", [
    ("exit 3", 3, ""),
    ("message", 1, "loranotes: a clear message"),
    ("raise", 1, "ValueError: a bug"),
])
def test_a_warm_job_exits_as_a_cold_one_would(job_env, warm, action, code, on_stderr):
    process, workdir = run_entry(job_env, action.replace(" ", "-"), action)
    returncode, _, stderr = finished(process)
    assert record(workdir)["ppid"] == warm
    assert returncode == code
    assert on_stderr in stderr


def wait_for(path, process=None):
    deadline = time.monotonic() + 120
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        assert process is None or process.poll() is None, process.communicate()
        time.sleep(0.05)


def test_sigterm_to_the_entry_reaches_the_warm_job(job_env, warm):
    process, workdir = run_entry(job_env, "terminated", "wait")
    wait_for(workdir / "record.json.waiting", process)
    process.send_signal(signal.SIGTERM)
    returncode, _, _ = finished(process)
    assert record(workdir)["ppid"] == warm
    assert (workdir / "record.json.signal").read_text() == "SIGTERM"
    assert returncode == 128 + signal.SIGTERM


def test_a_signal_that_comes_before_the_forks_pid_reaches_the_job():
    """The entry forwards signals from before it sends its request: one that arrives before the
    warm process has said which fork runs the job is passed on to that fork once it has."""
    job = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(7))
        print("ready", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    assert job.stdout.readline() == "ready\n"
    forwarding = warm_start.SignalForwarding()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # taken by the entry's handler, not the default
        deadline = time.monotonic() + 10
        while not forwarding.pending:
            assert time.monotonic() < deadline, "the handler did not run"
            time.sleep(0.01)
        forwarding.to(job.pid)
    finally:
        forwarding.end()
    assert job.wait(timeout=30) == 7


def test_a_warm_job_whose_entry_is_killed_stops(job_env, warm):
    process, workdir = run_entry(job_env, "killed", "wait")
    wait_for(workdir / "record.json.waiting", process)
    process.kill()  # SIGKILL: the entry cannot pass it on
    process.communicate()
    wait_for(workdir / "record.json.signal")
    assert (workdir / "record.json.signal").read_text() == "SIGTERM"


@pytest.mark.parametrize("variable, value", [("LORANOTES_WARM_START", "0"), ("SLURM_JOB_ID", "42")])
def test_jobs_run_cold_when_warm_starts_are_off(job_env, variable, value):
    tmp, env = job_env
    process, workdir = run_entry(job_env, f"off-{variable}", env={**env, variable: value})
    code, stdout, _ = finished(process)
    assert code == 0 and stdout == "progress line\n"
    assert record(workdir)["pid"] == process.pid
    assert warm_start.disabled_reason({**env, variable: value}) is not None


def test_a_changed_environment_needs_another_warm_process():
    base = {"PATH": "/usr/bin", "HF_HUB_OFFLINE": "1"}
    assert warm_start.server_key(base) != warm_start.server_key({**base, "HF_HUB_OFFLINE": "0"})
    # Variables read by the job, not at import, share one.
    assert warm_start.server_key(base) == warm_start.server_key({**base, "LORANOTES_COMMAND": "x", "PWD": "/a"})


def test_a_killed_warm_process_leaves_no_socket_for_the_next_job_to_wait_for():
    """A warm process killed (SIGKILL, or SIGTERM: no clean-up) leaves its socket behind. The
    next warm process's start removes it: a job waiting for the new one must not take the dead
    one's socket for it, connect to nobody and start cold (the first build_model of a run did,
    7 s of imports of its own)."""
    directory = Path(tempfile.mkdtemp(prefix="lk", dir="/tmp"))  # short: a socket path has <108 bytes
    paths = warm_start.server_paths(directory, "key")
    pids = []
    try:
        for _ in range(2):
            warm_start.start_server(paths)
            assert not paths["socket"].exists()  # none, or the killed one's removed
            assert warm_start.wait_until_warm(paths, seconds=240), paths["log"].read_text()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
                connection.connect(str(paths["socket"]))  # listening, not a leftover
            pids.append(int(paths["lock"].read_text()))
            os.kill(pids[-1], signal.SIGKILL)
            deadline = time.monotonic() + 30
            while warm_start._server_alive(paths):
                assert time.monotonic() < deadline, "the killed warm process holds its lock"
                time.sleep(0.05)
            assert paths["socket"].exists()  # left behind
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert pids[0] != pids[1]


def one_run_config():
    """The embedded default cut down to one short training run."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["dataset"].update(num_train=24, num_eval=8, bundled_size=40)
    config["training"].update(steps=4, max_length=96, seeds=[0])
    del config["models"]["tiny-llama"]
    config["models"]["tiny-qwen3"]["init"]["pretrain"] = {"steps": 10}
    config["variants"] = {"v1": {"model": "tiny-qwen3", "quantization": "none"}}
    config["comparisons"] = []
    return config


def test_a_warm_training_job_trains_exactly_as_a_cold_one(job_env, tmp_path):
    tmp, env = job_env
    run = Path("results/variants/v1/seed-0")
    outputs = {}
    for start, extra in [("cold", {"LORANOTES_WARM_START": "0"}), ("warm", {})]:
        workdir = copy_workflow(tmp_path / start)
        (workdir / "one.yaml").write_text(yaml.safe_dump(one_run_config()))
        command = [sys.executable, "-m", "snakemake", "--cores", "1", "--configfile", "one.yaml",
                   "--", str(run / "metrics.json")]
        result = subprocess.run(command, cwd=workdir, env={**env, **extra}, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        steps = pd.read_csv(workdir / run / "train_log.csv")
        outputs[start] = (
            steps[["step", "loss", "token_accuracy", "grad_norm", "lr"]],
            (workdir / run / "adapter" / "adapter_model.safetensors").read_bytes(),
        )
    served = "".join(log.read_text() for log in tmp.glob("loranotes-warm-*/*.log"))
    assert f"train in {tmp_path / 'warm'}" in served and f"in {tmp_path / 'cold'}" not in served
    pd.testing.assert_frame_equal(outputs["warm"][0], outputs["cold"][0])
    assert outputs["warm"][1] == outputs["cold"][1]
