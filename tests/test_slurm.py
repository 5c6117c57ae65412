"""profiles/slurm on a real SLURM: the single-node test cluster of tests/slurm/ (slurmctld,
slurmd and munge from Debian, started by tests/slurm/start-cluster.sh; .ci/run does that).

The embedded default, with its first training seed only, is submitted through the user-facing
profile, unchanged but for the status checks' timing (the first after 2 s instead of 40 s, then
every 2 s). Both keep CI fast: the test cluster has one GPU, so the train jobs run one after the
other. Every job must have gone through sbatch with the profile's resources (GPU rules a GPU,
CPU rules none), job status must work without sacct (no accounting database), and the report
must carry the same numbers as the same seed's runs in the local `default_run` fixture. A
failing job must fail the run.

In CI (CI set) a missing cluster is an error; elsewhere these tests skip without one.
"""

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, copy_workflow

PROFILE = "profiles/slurm"
# The only test-only settings: first status check 2 s after a submission (profile: 40 s), then
# every 2 s (Snakemake's default: 10). Both stay below the test cluster's MinJobAge / 3, so the
# plugin keeps using squeue; a job's end is seen within 2 s instead of 10.
FAST_STATUS = ["--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "2"]
# The default's DAG with its first seed only: 3 train jobs instead of 9
FIRST_SEED = 0
TEST_CLUSTER_NAME = "loranotes"  # ClusterName in tests/slurm/slurm.conf.in
GPU_RULES = {"build_model", "train", "generate_before", "generate_after"}
# metrics.csv columns that must match the local run; timing and memory columns differ per run
COMPARED_FLOAT_COLUMNS = ["final_train_loss", "last_step_loss", "eval_loss_before",
                          "eval_loss_after", "token_accuracy"]
COMPARED_EXACT_COLUMNS = ["variant", "model", "quantization", "lora_r", "steps",
                          "trainable_params", "total_params", "device"]
RUN_TIMEOUT_S = 1500
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (.+?)\)\.")


def _unavailable(reason):
    if os.environ.get("CI"):
        pytest.fail(f"{reason}. CI must run the SLURM tests: .ci/run installs SLURM with "
                    "tests/slurm/install.sh and starts it with tests/slurm/start-cluster.sh",
                    pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm_cluster():
    """Checks that the test cluster answers and is idle; fails in CI, skips elsewhere."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        _unavailable("SLURM client tools (sinfo, sbatch) not installed; "
                     "see tests/slurm/install.sh")
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        _unavailable("snakemake-executor-plugin-slurm is not installed "
                     "(pip install snakemake-executor-plugin-slurm==2.8.0)")
    try:
        config = subprocess.run(["scontrol", "show", "config"], capture_output=True,
                                text=True, timeout=60)
    except subprocess.TimeoutExpired:
        config = subprocess.CompletedProcess([], 1, "", "scontrol timed out")
    if config.returncode != 0:
        _unavailable(f"no SLURM controller answers ({config.stderr.strip()}); "
                     "start one with: sudo bash tests/slurm/start-cluster.sh")
    cluster = re.search(r"^ClusterName\s*=\s*(\S+)", config.stdout, re.M)
    if not cluster or cluster.group(1) != TEST_CLUSTER_NAME:
        # never submit test jobs to a real cluster by accident
        _unavailable(f"the SLURM cluster here is not the test cluster '{TEST_CLUSTER_NAME}' "
                     f"(ClusterName {cluster.group(1) if cluster else '?'})")
    state = subprocess.run(["sinfo", "-h", "-n", "localhost", "-o", "%T"],
                           capture_output=True, text=True, timeout=30).stdout.split()
    if not state or state[0] not in ("idle", "mixed", "allocated", "completing"):
        _unavailable(f"test node 'localhost' is not up (state {state or '?'}); restart the "
                     "cluster with: sudo bash tests/slurm/start-cluster.sh")
    return cluster.group(1)


def _start_snakemake(workdir, *args):
    """Starts snakemake in workdir, stdout and stderr into workdir/snakemake.out."""
    out = open(Path(workdir) / "snakemake.out", "w")
    command = [sys.executable, "-m", "snakemake", *args]
    return subprocess.Popen(command, cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
                            text=True), command


def _wait(process, command, workdir, timeout=RUN_TIMEOUT_S):
    """Waits for snakemake; on a timeout cancels the jobs it submitted and fails."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        output = (Path(workdir) / "snakemake.out").read_text()
        job_ids = [slurm_id for _, slurm_id, _ in SUBMITTED.findall(output)]
        if job_ids:
            subprocess.run(["scancel", *job_ids], timeout=30)
        pytest.fail(f"{' '.join(command)} still running after {timeout} s in {workdir}; "
                    f"squeue:\n{_squeue()}\n--- output (tail) ---\n{output[-8000:]}",
                    pytrace=False)
    return process.returncode, (Path(workdir) / "snakemake.out").read_text()


def _squeue():
    return subprocess.run(["squeue", "--states=all"], capture_output=True, text=True,
                          timeout=30).stdout


def _scontrol_job(job_id):
    """`scontrol show job -o` as a dict (the test cluster keeps finished jobs for an hour)."""
    result = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"scontrol show job {job_id}: {result.stderr}"
    return dict(re.findall(r"(\S+?)=(\S*)", result.stdout))


def _megabytes(value):
    """'62.50G' / '4000M' (scontrol's MinMemoryNode) in MB."""
    number, unit = float(value[:-1]), value[-1]
    return round(number * {"M": 1, "G": 1024, "T": 1024 * 1024}[unit])


def _minutes(value):
    """'04:00:00' / '1-00:00:00' / '30:00' (scontrol's TimeLimit) in minutes."""
    days, _, clock = value.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    hours, minutes, seconds = parts
    return (int(days or 0) * 24 + hours) * 60 + minutes + math.ceil(seconds / 60)


def _job_stats(output):
    """Snakemake's 'Job stats' table: rule -> number of jobs."""
    table = output.split("Job stats:", 1)[1].split("total", 1)[0]
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, default_run, tmp_path_factory):
    """The embedded default through `snakemake --profile profiles/slurm`, after the local
    `default_run` (not beside it: two torch processes on 2 cores slow each other down a lot)."""
    workdir = copy_workflow(tmp_path_factory.mktemp("slurm_run"))
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["training"]["seeds"] = [FIRST_SEED]
    (workdir / "first_seed.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.monotonic()
    process, command = _start_snakemake(workdir, "results/report.md", "--profile", PROFILE,
                                        *FAST_STATUS, "--configfile", "first_seed.yaml")
    returncode, output = _wait(process, command, workdir)
    elapsed = time.monotonic() - started
    if returncode != 0:
        logs = "\n".join(f"--- {p} ---\n{p.read_text()[-3000:]}"
                         for p in sorted((workdir / ".snakemake/slurm_logs").rglob("*.log")))
        pytest.fail(f"{' '.join(command)} failed in {workdir} (exit {returncode}) after "
                    f"{elapsed:.0f} s\n--- output ---\n{output[-15000:]}\n{logs[-15000:]}\n"
                    f"--- squeue ---\n{_squeue()}", pytrace=False)
    print(f"SLURM run of the embedded default: {elapsed:.0f} s")
    return {"dir": workdir, "output": output, "local": default_run}


@pytest.fixture(scope="module")
def submitted_jobs(slurm_run):
    """(rule, SLURM job id, log path) of every job the run submitted."""
    jobs = []
    for _, slurm_id, log in SUBMITTED.findall(slurm_run["output"]):
        rule = re.search(r"/rule_(\w+?)(?:/|$)", log.split("slurm_logs", 1)[1]).group(1)
        jobs.append((rule, slurm_id, Path(log)))
    return jobs


def test_every_job_went_through_sbatch_and_left_a_slurm_log(slurm_run, submitted_jobs):
    workdir = slurm_run["dir"]
    expected = _job_stats(slurm_run["output"])
    expected.pop("all", None)  # a target rule without a body is not a job
    assert set(expected) >= {"train", "generate_before", "generate_after", "report"}

    submitted = {}
    for rule, _, _ in submitted_jobs:
        submitted[rule] = submitted.get(rule, 0) + 1
    assert submitted == expected

    # .snakemake/slurm_logs/rule_<rule>[/<wildcards>]/<SLURM job id>.log, one per job
    logdir = workdir / ".snakemake" / "slurm_logs"
    logs = sorted(logdir.rglob("*.log"))
    assert sorted(p.resolve() for p in logs) == sorted(p.resolve() for _, _, p in submitted_jobs)
    for rule, slurm_id, log in submitted_jobs:
        assert log.name == f"{slurm_id}.log" and slurm_id.isdigit()
        assert log.relative_to(logdir).parts[0] == f"rule_{rule}"
        text = log.read_text()
        # the SLURM job ran snakemake's job step for exactly this rule
        # ("checkpoint tokenize:": Snakemake decides again after it)
        assert re.search(rf"^(rule|checkpoint) {rule}:", text, re.M), log
        assert "--executor slurm-jobstep" in text, log
    assert len({slurm_id for _, slurm_id, _ in submitted_jobs}) == len(submitted_jobs)


def test_jobs_got_the_profiles_resources(slurm_run, submitted_jobs):
    """GPU rules ask for one GPU and their own CPUs/memory/time; CPU rules the defaults."""
    profile = yaml.safe_load((slurm_run["dir"] / PROFILE / "config.yaml").read_text())
    defaults, per_rule = profile["default-resources"], profile["set-resources"]
    partitions = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True,
                                timeout=30).stdout.split()
    [default_partition] = [p.rstrip("*") for p in partitions if p.endswith("*")]
    for rule, slurm_id, _ in submitted_jobs:
        job = _scontrol_job(slurm_id)
        resources = {**defaults, **per_rule.get(rule, {})}
        assert job["JobState"] == "COMPLETED", (rule, job)
        assert job["Partition"] == default_partition  # the profile names none
        if rule in GPU_RULES:
            assert resources.get("gpu", 1) == 1  # train: the rule's, training.devices (1 here)
            assert job.get("TresPerJob") == "gres:gpu:1", (rule, job)
            cpus = resources.get("cpus_per_task") or profile["set-threads"][rule]
            assert int(job["CPUs/Task"]) == cpus, (rule, job)
        else:
            assert "gpu" not in job.get("TresPerJob", "") + job["TRES"], (rule, job)
        assert _megabytes(job["MinMemoryNode"]) == resources["mem_mb"], (rule, job)
        assert _minutes(job["TimeLimit"]) == resources["runtime"], (rule, job)


def test_job_status_came_from_squeue_not_sacct(slurm_run):
    # no accounting database on the test cluster: sacct cannot have answered
    sacct = subprocess.run(["sacct", "-X", "-n"], capture_output=True, text=True, timeout=30)
    assert sacct.returncode != 0 or not sacct.stdout.strip(), sacct.stdout
    assert "Falling back to 'sacct'" not in slurm_run["output"]
    assert "Unable to get the status of all active jobs" not in slurm_run["output"]


def test_slurm_run_reproduces_the_local_runs_numbers(slurm_run):
    local = pd.read_csv(slurm_run["local"] / "results" / "metrics.csv")
    local = local[local["seed"] == FIRST_SEED].reset_index(drop=True)
    on_slurm = pd.read_csv(slurm_run["dir"] / "results" / "metrics.csv")
    assert list(on_slurm["seed"]) == [FIRST_SEED] * len(on_slurm)
    assert list(on_slurm.columns) == list(local.columns)
    assert len(on_slurm) == len(local) > 0
    for column in COMPARED_EXACT_COLUMNS:
        assert list(on_slurm[column]) == list(local[column]), column
    for column in COMPARED_FLOAT_COLUMNS:
        assert list(on_slurm[column]) == pytest.approx(list(local[column]), rel=1e-5), column


def test_slurm_run_writes_the_report_with_a_row_per_variant(slurm_run):
    report = (slurm_run["dir"] / "results" / "report.md").read_text(encoding="utf-8")
    variants = list(pd.read_csv(slurm_run["dir"] / "results" / "metrics.csv")["variant"])
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    for variant in variants:
        assert any(row.startswith(f"| {variant} |") for row in rows), variant


FAILING_SNAKEFILE = """
rule all:
    input:
        "out.txt",


rule fails:
    output:
        "out.txt",
    shell:
        "echo this job is about to fail; exit 3"
"""


def test_a_failing_job_fails_the_run(slurm_cluster, tmp_path):
    (tmp_path / "Snakefile").write_text(FAILING_SNAKEFILE)
    shutil.copytree(REPO / PROFILE, tmp_path / PROFILE)
    # first status check after 6 s, when the job (~4 s) has ended: the run stops sooner
    process, command = _start_snakemake(tmp_path, "--profile", PROFILE,
                                        "--slurm-init-seconds-before-status-checks", "6")
    returncode, output = _wait(process, command, tmp_path, timeout=300)

    assert returncode != 0, output
    # The profile's `retries` resubmit a failed job; the run fails after the last attempt.
    retries = yaml.safe_load((REPO / PROFILE / "config.yaml").read_text())["retries"]
    submissions = SUBMITTED.findall(output)
    assert len(submissions) == 1 + retries, output
    (_, slurm_id, log) = submissions[-1]
    assert f"SLURM-job '{slurm_id}' failed, SLURM status is: 'FAILED'" in output, output
    assert "Error in rule fails" in output
    log = Path(log)
    assert log == (tmp_path / ".snakemake/slurm_logs/rule_fails" / f"{slurm_id}.log").resolve()
    text = log.read_text()
    assert "this job is about to fail" in text and "non-zero exit status 3" in text, text
    job = _scontrol_job(slurm_id)
    # the batch script is snakemake's job step, which exits 1 when its rule fails
    assert job["JobState"] == "FAILED" and job["ExitCode"] != "0:0", job
    assert not (tmp_path / "out.txt").exists()


LONG_STEPS = 100_000


def test_a_train_job_at_its_time_limit_resumes_where_it_stopped(slurm_cluster, tmp_path):
    """The profile as shipped (its --signal ahead of the time limit, its retries), with one
    change: a 4-minute time limit for train, so that a long training hits it. The first job
    stops with a checkpoint of the step it was at; the retry resumes there (no periodic
    checkpoints: checkpoint_every 0). The test ends once the retry has resumed."""
    workdir = copy_workflow(tmp_path / "workflow")
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["dataset"].update(num_train=40, num_eval=8)
    # More steps than the 2 minutes before the TERM can hold: 3,000 finished in 110 s once
    # padded steps lost their mask and the default's batches shrank to 3.
    config["training"].update(steps=LONG_STEPS, checkpoint_every=0, eval_every=0, seeds=[0],
                              max_length=128)
    del config["models"]["tiny-llama"]
    config["models"]["tiny-qwen3"]["init"]["pretrain"] = {"steps": 10}
    config["variants"] = {"v1": {"title": "long", "model": "tiny-qwen3", "quantization": "none"}}
    config["comparisons"] = []
    (workdir / "long.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    profile_file = workdir / PROFILE / "config.yaml"
    profile = yaml.safe_load(profile_file.read_text())
    assert "--signal=TERM@" in profile["set-resources"]["train"]["slurm_extra"]
    assert profile["retries"] >= 1
    profile["set-resources"]["train"]["runtime"] = 4  # minutes
    profile_file.write_text(yaml.safe_dump(profile, sort_keys=False))

    log = workdir / "results/logs/train/v1/seed-0.log"
    process, command = _start_snakemake(workdir, "results/variants/v1/seed-0/metrics.json",
                                        "--profile", PROFILE, *FAST_STATUS,
                                        "--configfile", "long.yaml")
    deadline = time.monotonic() + 900
    try:
        while not (log.exists() and "steps done" in log.read_text()):
            assert process.poll() is None, (workdir / "snakemake.out").read_text()[-8000:]
            assert time.monotonic() < deadline, f"no resume within 900 s\n{_squeue()}"
            time.sleep(2)
    finally:
        process.send_signal(signal.SIGINT)  # snakemake cancels its SLURM jobs
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
        job_ids = [slurm_id for _, slurm_id, _ in
                   SUBMITTED.findall((workdir / "snakemake.out").read_text())]
        subprocess.run(["scancel", *job_ids], timeout=30)

    output = (workdir / "snakemake.out").read_text()
    train_jobs = [(slurm_id, Path(path)) for _, slurm_id, path in SUBMITTED.findall(output)
                  if "/rule_train/" in path]
    assert len(train_jobs) >= 2, output[-8000:]
    (first_id, first_log), (second_id, second_log) = train_jobs[:2]
    stopped = re.search(r"loranotes: stopped at step (\d+) by SIGTERM; checkpoint saved; "
                        r"rerun to resume", first_log.read_text())
    assert stopped, first_log.read_text()[-4000:]
    step = int(stopped.group(1))
    assert 0 < step < LONG_STEPS
    assert "Trying to restart job" in output
    resumed = (f"resuming from results/checkpoints/v1/seed-0/step-{step}: "
               f"{step} of {LONG_STEPS} steps done")
    assert resumed in second_log.read_text(), second_log.read_text()[-4000:]
    # the job's own log tells both parts
    text = log.read_text()
    assert f"resumed at step {step}; the lines above are from the run that stopped" in text
    assert text.index("eval loss before training") < text.index(resumed)
