"""Nothing lost on a mistake or a stop, tried as a user would, through Snakemake on a tiny config
(one variant, one seed): a data step that fails and a source put back, a source renamed or
replaced, a source gone, Ctrl-C during training, a second run while one is active."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import run_lock
from bundled_sample import make_conversations
from conftest import REPO, copy_workflow, run_snakemake

TRAINED = ["results/variants/v1/seed-0/adapter/adapter_model.safetensors",
           "results/variants/v1/seed-0/metrics.json"]
DATA = ["results/data/train.jsonl", "results/data/eval.jsonl",
        "results/tokenized/tiny-qwen3-L96/train.parquet"]
TARGET = "results/report.md"


def small_config(source, steps=4):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["dataset"].update(source=source, num_train=24, num_eval=8)
    config["prompts"] = config["prompts"][:1]
    config["generation"] = {"max_new_tokens": 4}
    config["training"].update(steps=steps, max_length=96, checkpoint_every=0, seeds=[0])
    del config["models"]["tiny-llama"]
    config["models"]["tiny-qwen3"]["init"]["pretrain"] = {"steps": 10}
    config["variants"] = {"v1": {"title": "baseline", "model": "tiny-qwen3", "quantization": "none"}}
    config["comparisons"] = []
    return config


def write_config(workdir, name, **kwargs):
    (workdir / name).write_text(yaml.safe_dump(small_config(**kwargs), sort_keys=False))
    return name


def write_conversations(path, n, seed):
    rows = [json.dumps(row) for row in make_conversations(n=n, seed=seed)]
    path.write_text("\n".join(rows) + "\n")


def times(workdir, files):
    return {name: (workdir / name).stat().st_mtime_ns for name in files}


def nothing_to_do(workdir, configfile):
    result = run_snakemake(workdir, "-n", TARGET, "--configfile", configfile)
    return "Nothing to be done" in result.stdout + result.stderr


def ran_rules(output):
    """The rules of the jobs a run executed ("rule x:", "localcheckpoint x:", ... blocks)."""
    kinds = ("rule ", "localrule ", "checkpoint ", "localcheckpoint ")
    return {line.split()[-1].rstrip(":") for line in output.splitlines()
            if line.startswith(kinds) and line.endswith(":")}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """The small config trained once on data.jsonl (~40 s)."""
    workdir = copy_workflow(tmp_path_factory.mktemp("small_run"))
    write_conversations(workdir / "data.jsonl", 40, seed=0)
    run_snakemake(workdir, "--cores", "2", TARGET, "--configfile",
                  write_config(workdir, "good.yaml", source="data.jsonl"))
    return workdir


def test_a_failed_data_step_costs_nothing_once_the_source_is_put_back(small_run):
    before = times(small_run, DATA + TRAINED)
    # a directory of shards with nothing usable: the dry run cannot know, the data job fails
    (small_run / "broken").mkdir()
    (small_run / "broken" / "00.jsonl").write_text('{"prompt": "no messages"}\n')
    result = run_snakemake(small_run, "--cores", "2", TARGET, "--configfile",
                           write_config(small_run, "broken.yaml", source="broken"), check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "loranotes: no usable conversations out of 1 rows" in output, output
    assert ran_rules(output) == {"prepare_data"}, output
    assert times(small_run, DATA + TRAINED) == before  # the data and what was trained on it

    assert nothing_to_do(small_run, "good.yaml")  # the source put back: nothing to rerun


def test_data_that_comes_out_the_same_reruns_nothing_after_it(small_run):
    before = times(small_run, TRAINED)
    data = {name: (small_run / name).read_bytes() for name in DATA}
    shutil.copy(small_run / "data.jsonl", small_run / "same-rows.jsonl")
    result = run_snakemake(small_run, "--cores", "2", TARGET, "--configfile",
                           write_config(small_run, "copy.yaml", source="same-rows.jsonl"))
    # the split is the same, so are the tokens: nothing is retrained; stats.json (it names the
    # file read) and the report change
    output = result.stdout + result.stderr
    ran = ran_rules(output)
    assert {"prepare_data", "use_prepared_data", "tokenize", "report"} <= ran, output
    assert "train" not in ran and "Updating checkpoint dependencies" in output
    assert times(small_run, TRAINED) == before
    assert {name: (small_run / name).read_bytes() for name in DATA} == data
    assert "`same-rows.jsonl`: 40 rows, 40 usable" in (small_run / TARGET).read_text()
    assert nothing_to_do(small_run, "copy.yaml")


def test_another_source_reruns_everything_and_the_report_names_what_was_read(small_run):
    before = times(small_run, TRAINED)
    write_conversations(small_run / "other.jsonl", 36, seed=7)
    result = run_snakemake(small_run, "--cores", "2", TARGET, "--configfile",
                           write_config(small_run, "other.yaml", source="other.jsonl"))
    assert "train" in ran_rules(result.stdout + result.stderr)
    assert all(times(small_run, TRAINED)[name] > before[name] for name in TRAINED)
    stats = json.loads((small_run / "results/data/stats.json").read_text())
    assert stats["source"]["path"] == "other.jsonl" and stats["rows"] == 36
    report = (small_run / TARGET).read_text()
    assert "`other.jsonl`: 36 rows, 36 usable" in report and "data.jsonl" not in report

    # the source gone after that successful run: the dry run stops, naming the key
    (small_run / "other.jsonl").rename(small_run / "other.jsonl.moved")
    try:
        result = run_snakemake(small_run, "-n", TARGET, "--configfile", "other.yaml", check=False)
        output = result.stdout + result.stderr
        assert result.returncode != 0
        assert "other.yaml: dataset.source: other.jsonl does not exist" in output, output
        assert "Traceback" not in output
    finally:
        (small_run / "other.jsonl.moved").rename(small_run / "other.jsonl")


def test_outputs_are_written_with_the_users_umask(small_run):
    # the fixture's run inherits the test process's umask (022 here and in CI)
    mask = os.umask(0)
    os.umask(mask)
    paths = [p for p in (small_run / "results").rglob("*") if not p.is_symlink()]
    weights = [p for p in paths if p.suffix == ".safetensors"]
    assert weights and {p.parent.name for p in weights} >= {"adapter", "tiny-qwen3"}
    wrong = {str(p.relative_to(small_run)): oct(p.stat().st_mode & 0o777) for p in paths
             if p.stat().st_mode & 0o777 != (0o777 if p.is_dir() else 0o666) & ~mask}
    assert not wrong


def start_snakemake(workdir, *args):
    """snakemake in its own process group, as a terminal runs it (Ctrl-C reaches every job)."""
    return subprocess.Popen([sys.executable, "-m", "snakemake", *args], cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.2)


def test_ctrl_c_during_training_stops_at_a_checkpoint_and_the_rerun_resumes(small_run):
    config = write_config(small_run, "long.yaml", source="data.jsonl", steps=3000)
    log = small_run / "results/logs/train/v1/seed-0.log"
    run = start_snakemake(small_run, "--cores", "2", TARGET, "--configfile", config)
    wait_for(lambda: log.exists() and "step 10/3000" in log.read_text(), 300, "training step 10")
    os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    output, _ = run.communicate(timeout=120)

    stopped = [line for line in output.splitlines() if "stopped at step" in line]
    assert len(stopped) == 1 and stopped[0].endswith("by SIGINT; checkpoint saved; rerun to resume")
    step = int(stopped[0].split("stopped at step ")[1].split()[0])
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    checkpoint = small_run / f"results/checkpoints/v1/seed-0/step-{step}"
    assert checkpoint.is_dir() and step % 10 != 0 or step >= 10
    first_log = log.read_text()

    rerun = start_snakemake(small_run, "--cores", "2", TARGET, "--configfile", config)
    wait_for(lambda: log.exists() and f"of 3000 steps done" in log.read_text(), 300, "resume")
    os.killpg(rerun.pid, signal.SIGINT)
    rerun.communicate(timeout=120)
    text = log.read_text()
    assert f"resuming from results/checkpoints/v1/seed-0/step-{step}: {step} of 3000 steps done" in text
    assert text.startswith(first_log.split("loranotes: stopped")[0])  # the earlier run's lines
    assert "eval loss before training" in text.split(f"resumed at step {step};")[0]
    shutil.rmtree(small_run / "results/checkpoints", ignore_errors=True)


def test_a_second_run_refuses_while_one_is_active_and_says_which(small_run):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = small_run / run_lock.LOCK_FILE
        record = {"pid": holder.pid, "host": os.uname().nodename,
                  "process_start": run_lock.process_start(holder.pid),
                  "started": "2026-12-02T10:00:00+00:00", "command": "snakemake --cores 1 all"}
        lock.write_text(json.dumps(record))
        # a run with work to do refuses before any job, naming the other run
        result = run_snakemake(small_run, "--cores", "2", TARGET, "--configfile", "long.yaml",
                               check=False)
        output = result.stdout + result.stderr
        assert result.returncode != 0
        expected = (f"another loranotes run is active in this directory (pid {holder.pid} on "
                    f"{record['host']}, started 2026-12-02T10:00:00+00:00: `snakemake --cores 1 "
                    f"all`); two runs would write the same outputs")
        assert expected in output, output
        assert "rule train:" not in output and "Traceback" not in output
        # a dry run works, and says so too (what to check before `snakemake --unlock`)
        dry = run_snakemake(small_run, "-n", TARGET, "--configfile", "long.yaml")
        assert f"loranotes: note: {expected}" in dry.stderr
    finally:
        holder.kill()
        holder.wait()
    # its process gone, the lock is stale: the next run replaces it, says so, and releases it
    result = run_snakemake(small_run, "--cores", "2", TARGET, "--configfile", "good.yaml")
    assert f"(pid {holder.pid} on" in result.stderr and "its lock is replaced" in result.stderr
    assert not lock.exists()
