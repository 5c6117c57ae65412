"""A `training.devices: 2` variant through profiles/slurm on the test cluster (tests/slurm/):
the train job runs torchrun with 2 CPU ranks (gloo) inside one SLURM job, asks for no GPU (the
variant trains on the CPU) and the profile's CPUs, and trains like a local one-process run of
the same variant (v2 of the embedded default, seed 0; only that run and what it needs)."""

import json
import re

import pytest
import yaml

from conftest import copy_workflow, run_snakemake
from test_slurm import FAST_STATUS, PROFILE, SUBMITTED, _scontrol_job, _start_snakemake, _wait
from test_slurm import slurm_cluster  # noqa: F401  (fixture)

RUN = "results/variants/v2/seed-0"
COMPARED = ["final_train_loss", "last_step_loss", "eval_loss_before", "eval_loss_after",
            "token_accuracy", "train_tokens", "train_examples_seen"]


def workflow_with_v2_on(workdir, **training):
    workdir = copy_workflow(workdir)
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["variants"]["v2"]["training"] = {"device": "cpu", **training}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return workdir


@pytest.fixture(scope="module")
def slurm_devices_run(slurm_cluster, tmp_path_factory):  # noqa: F811
    local = workflow_with_v2_on(tmp_path_factory.mktemp("local_one_process"), devices=1)
    run_snakemake(local, "--cores", "2", f"{RUN}/metrics.json")
    workdir = workflow_with_v2_on(tmp_path_factory.mktemp("slurm_devices"), devices=2)
    process, command = _start_snakemake(workdir, "--profile", PROFILE, *FAST_STATUS,
                                        f"{RUN}/metrics.json")
    returncode, output = _wait(process, command, workdir)
    logs = "\n".join(p.read_text()[-4000:] for p in (workdir / ".snakemake").rglob("*.log"))
    assert returncode == 0, f"{output[-8000:]}\n{logs[-8000:]}"
    jobs = {re.search(r"/rule_(\w+?)(?:/|$)", log.split("slurm_logs", 1)[1]).group(1): slurm_id
            for _, slurm_id, log in SUBMITTED.findall(output)}
    return workdir, local, jobs


def test_a_two_device_variant_trains_on_slurm_like_one_process(slurm_devices_run):
    workdir, local, _ = slurm_devices_run
    metrics = json.loads((workdir / RUN / "metrics.json").read_text())
    expected = json.loads((local / RUN / "metrics.json").read_text())
    assert (metrics["devices"], expected["devices"]) == (2, 1)
    assert metrics["provenance"]["settings"]["training"]["devices"] == 2
    for key in COMPARED:
        assert metrics[key] == pytest.approx(expected[key], rel=1e-4), key


def test_the_train_job_ran_torchrun_in_one_slurm_job_without_a_gpu(slurm_devices_run):
    workdir, _, jobs = slurm_devices_run
    job = _scontrol_job(jobs["train"])
    profile = yaml.safe_load((workdir / PROFILE / "config.yaml").read_text())
    assert job["JobState"] == "COMPLETED" and job["NumNodes"] == "1", job
    assert "gpu" not in job.get("TresPerJob", "") + job["TRES"], job  # device: cpu
    assert int(job["CPUs/Task"]) == profile["set-threads"]["train"], job
    log = (workdir / "results/logs/train/v2/seed-0.log").read_text()
    assert "starting 2 ranks with torchrun (gloo" in log, log
    assert "data-parallel on 2 ranks (gloo)" in log, log
