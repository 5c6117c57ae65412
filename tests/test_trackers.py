"""Trackers (scripts/trackers.py): a training run logged to TensorBoard, Weights & Biases
(offline) and MLflow (a file store), read back from what each wrote with its own reader; a
tracker that fails never fails the run; a tracker named in the config but not installed stops
the dry run with what to install."""

import copy
import errno
import glob
import json
import logging
import os
import signal
import struct
from pathlib import Path

import pandas as pd
import pytest
import yaml

import train
import trackers
from conftest import REPO
from experiment_config import ConfigError, resolve_config, validate_config
from test_robustness import tiny_model, train_args  # noqa: F401  (fixture)

ALL_THREE = {"tensorboard": True, "wandb": {"project": "loranotes-test", "mode": "offline"},
             "mlflow": True}
SAMPLES_BEFORE = {"samples": [{"prompt": "Say hi.", "completion": "hi hi hi"},
                              {"prompt": "What is 2+2?", "completion": "2+2 is"}]}
SAMPLES_AFTER = {"samples": [{"prompt": "Say hi.", "completion": "Hello!"},
                             {"prompt": "What is 2+2?", "completion": "4."}]}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in tmp_path (the trackers' default dirs are relative), with no W&B credentials."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return tmp_path


def tracked_run(tiny_model, workdir, logging_config, group="report-1"):
    """Train the tiny model with the trackers on; returns (metrics, train_log, tracking)."""
    tracking = trackers.run_tracking(trackers.resolve_logging(logging_config), "v1", 0, group)
    args = train_args(tiny_model, workdir / "out", eval_every=5)
    settings = {"model": "tiny", "quantization": "none", "training": args["training"],
                "lora": args["lora"]}
    with trackers.open_trackers(tracking, settings, workdir / "out" / "tracking.json") as opened:
        metrics = train.train(**args, trackers=opened)  # as train.py's main runs it
    return metrics, pd.read_csv(workdir / "out" / "train_log.csv"), tracking


# --- readers: each tracker's files, read back as that tracker's own tools read them ------------

def tensorboard_events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    texts = {tag.removesuffix("/text_summary"): "\n".join(
        e.tensor_proto.string_val[0].decode() for e in events.Tensors(tag))
        for tag in events.Tags()["tensors"]}
    return scalars, texts


def wandb_records(path):
    """The records of a W&B offline run file (`run-<id>.wandb`): wandb's log format, blocks
    of 32 KiB of chunks with a 7-byte header (crc32c, length, type: 1 full, 2 first, 3 middle,
    4 last) after the file's own 7-byte header, each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data, block = Path(path).read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, chunks = 7, []
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunks.append(data[position + 7:position + 7 + length])
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def wandb_offline_run(directory):
    """{"run": RunRecord, "history": {key: {step: value}}, "config", "summary", "exit_code"} of
    the offline run directories under `directory` (several when a run was reopened), merged."""
    found = {"history": {}, "config": {}, "summary": {}, "runs": [], "exit_code": None}
    for path in sorted(glob.glob(f"{directory}/wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                found["runs"].append(record.run)
                found["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                for key, value in items.items():
                    found["history"].setdefault(key, {})[items["_step"]] = value
            elif kind == "exit":
                found["exit_code"] = record.exit.exit_code
            elif kind in ("config", "summary"):
                found[kind].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                    for i in getattr(record, kind).update})
    return found


def mlflow_client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


# --- what each tracker holds after a run --------------------------------------------------------

def test_a_run_is_logged_to_tensorboard_wandb_and_mlflow(tiny_model, in_tmp):
    metrics, steps, tracking = tracked_run(tiny_model, in_tmp, ALL_THREE)
    record = json.loads((in_tmp / "out" / "tracking.json").read_text())
    assert set(record) == {"tensorboard", "wandb", "mlflow"}
    evaluated = steps.dropna(subset=["eval_loss"])
    eval_losses = {0: metrics["eval_loss_before"], **dict(zip(evaluated["step"], evaluated["eval_loss"]))}
    losses = dict(zip(steps["step"], steps["loss"]))
    tokens_per_s = dict(zip(steps["step"], steps["tokens"] / steps["seconds"]))

    # TensorBoard: event files under results/tracking/tensorboard/<run name>/
    log_dir = in_tmp / "results" / "tracking" / "tensorboard" / "v1-seed0"
    assert record["tensorboard"]["log_dir"] == str(Path("results/tracking/tensorboard/v1-seed0"))
    scalars, texts = tensorboard_events(log_dir)
    assert scalars["train/loss"] == pytest.approx(losses, rel=1e-6)
    assert scalars["train/tokens_per_s"] == pytest.approx(tokens_per_s, rel=1e-5)
    assert set(scalars) >= {"train/token_accuracy", "train/lr", "train/grad_norm",
                            "train/peak_memory_gb", "eval/accuracy"}
    assert scalars["eval/loss"] == pytest.approx(eval_losses, rel=1e-6)
    assert '"lr": 0.01' in texts["config"] and '"git_commit"' in texts["config"]
    assert f"| eval_loss_after | {metrics['eval_loss_after']} |" in texts["summary"]

    # W&B: an offline run directory under results/tracking/wandb/
    run = wandb_offline_run(in_tmp / "results" / "tracking")
    assert [(r.display_name, r.run_group, r.project) for r in run["runs"]] == [
        ("v1-seed0", "report-1", "loranotes-test")]
    assert run["runs"][0].run_id == record["wandb"]["id"]
    assert run["history"]["train/loss"] == pytest.approx(losses, rel=1e-6)
    assert run["history"]["eval/loss"] == pytest.approx(eval_losses, rel=1e-6)
    assert run["config"]["training"]["lr"] == 0.01 and run["config"]["variant"] == "v1"
    assert run["config"]["provenance"]["settings"]["training"]["seed"] == 0
    assert run["summary"]["eval_loss_after"] == pytest.approx(metrics["eval_loss_after"])
    assert run["summary"]["median_s_per_step"] == pytest.approx(metrics["median_s_per_step"])
    assert run["exit_code"] == 0

    # MLflow: a file store at results/tracking/mlruns
    client = mlflow_client(record["mlflow"]["tracking_uri"])
    assert Path(record["mlflow"]["tracking_uri"].removeprefix("file://")) == in_tmp / "results" / "tracking" / "mlruns"
    logged = client.get_run(record["mlflow"]["run_id"])
    assert logged.info.run_name == "v1-seed0" and logged.data.tags["group"] == "report-1"
    assert client.get_experiment(logged.info.experiment_id).name == "loranotes"
    assert logged.data.params["training.lr"] == "0.01" and logged.data.params["seed"] == "0"
    assert logged.data.params["provenance.settings.quantization"] == "none"
    history = {m.step: m.value for m in client.get_metric_history(logged.info.run_id, "train/loss")}
    assert history == pytest.approx(losses, rel=1e-6)
    assert logged.data.metrics["final/eval_loss_after"] == pytest.approx(metrics["eval_loss_after"])
    assert logged.info.status == "FINISHED"


def test_the_samples_go_into_the_training_runs_tracker_runs(tiny_model, in_tmp):
    _, _, tracking = tracked_run(tiny_model, in_tmp, ALL_THREE)
    record_path = in_tmp / "out" / "tracking.json"
    record = json.loads(record_path.read_text())
    trackers.reopen_trackers(tracking, record_path).samples(SAMPLES_BEFORE, SAMPLES_AFTER)

    _, texts = tensorboard_events(in_tmp / "results" / "tracking" / "tensorboard" / "v1-seed0")
    assert "| prompt | before | after |" in texts["samples"]
    assert "| What is 2+2? | 2+2 is | 4. |" in texts["samples"]

    # Both directories hold the one run's id; wandb names a directory by the second it opened in,
    # and adds "-1" when training and the reopening fall in the same second.
    runs = sorted(glob.glob(str(in_tmp / "results" / "tracking" / "wandb" / "offline-run-*")))
    wandb_id = record["wandb"]["id"]
    assert len(runs) == 2 and all(Path(r, f"run-{wandb_id}.wandb").is_file() for r in runs)
    table_file, = glob.glob(f"{runs[1]}/files/media/table/samples_*.table.json")
    table = json.loads(Path(table_file).read_text())
    assert table["columns"] == ["prompt", "before", "after"]
    assert table["data"] == [["Say hi.", "hi hi hi", "Hello!"], ["What is 2+2?", "2+2 is", "4."]]

    client = mlflow_client(record["mlflow"]["tracking_uri"])
    run_id = record["mlflow"]["run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"
    artifact = Path(client.download_artifacts(run_id, "samples.json", str(in_tmp / "download")))
    logged = json.loads(artifact.read_text())
    assert logged["columns"] == ["prompt", "before", "after"]
    assert logged["data"][1] == ["What is 2+2?", "2+2 is", "4."]


def test_a_rerun_replaces_the_runs_tensorboard_events(tiny_model, in_tmp):
    tracked_run(tiny_model, in_tmp, {"tensorboard": True})
    tracked_run(tiny_model, in_tmp, {"tensorboard": True})
    log_dir = in_tmp / "results" / "tracking" / "tensorboard" / "v1-seed0"
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1


# --- a run that ends without its results is marked so ---------------------------------------------

def sigterm_during_step(step):
    """Trackers.step that sends this process SIGTERM while it logs `step`: a stop by signal."""
    real_step = trackers.Trackers.step

    def step_then_sigterm(self, record):
        real_step(self, record)
        if record["step"] == step:
            os.kill(os.getpid(), signal.SIGTERM)
    return step_then_sigterm


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("how, status, reason", [
    ("stopped", "KILLED", "stopped at step 3 by SIGTERM; no checkpoint kept (no checkpoint "
                          "directory); a rerun starts over"),
    ("failed", "FAILED", "OSError: [Errno 28] No space left on device"),
])
def test_a_run_that_ends_without_its_results_is_marked_so_in_each_tracker(
        tiny_model, in_tmp, monkeypatch, how, status, reason):
    if how == "stopped":
        monkeypatch.setattr(trackers.Trackers, "step", sigterm_during_step(3))
    else:
        monkeypatch.setattr(train, "write_outputs", disk_full)
    with pytest.raises(Exception) as raised:
        tracked_run(tiny_model, in_tmp, ALL_THREE)
    assert reason.endswith(str(raised.value))  # the job fails as it did without trackers
    assert not (in_tmp / "out" / "tracking.json").exists()  # the job has no output: it reruns

    scalars, texts = tensorboard_events(in_tmp / "results" / "tracking" / "tensorboard" / "v1-seed0")
    assert texts["ended"] == reason
    run = wandb_offline_run(in_tmp / "results" / "tracking")
    assert run["exit_code"] == 1 and run["summary"]["ended"] == reason  # W&B: failed
    mlruns = in_tmp / "results" / "tracking" / "mlruns"
    client = mlflow_client(mlruns.as_uri())
    logged, = client.search_runs([client.get_experiment_by_name("loranotes").experiment_id])
    assert logged.info.status == status and logged.data.tags["ended"] == reason
    steps_logged = 3 if how == "stopped" else 12
    assert max(scalars["train/loss"]) == max(run["history"]["train/loss"]) == steps_logged


# --- failures never fail the training -----------------------------------------------------------

class FailsAtStep:
    """A tracker whose server goes away at step 3."""

    def __init__(self, settings, name, group, record=None):
        self.logged = []

    def config(self, values):
        pass

    def metrics(self, values, step):
        if step == 3:
            raise ConnectionError("server went away")
        self.logged.append(step)

    def summary(self, values):
        pass

    def close(self):
        pass

    def record(self):
        return {}


def test_a_tracker_that_fails_warns_once_and_the_run_goes_on(tiny_model, in_tmp, monkeypatch, caplog):
    untracked = train.train(**train_args(tiny_model, in_tmp / "plain"))
    # auth: W&B online without credentials; network: an MLflow server nobody runs
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setitem(trackers.BACKENDS, "tensorboard", FailsAtStep)
    broken = {"tensorboard": True, "wandb": {"project": "x", "mode": "online"},
              "mlflow": {"tracking_uri": "http://127.0.0.1:9"}}
    with caplog.at_level(logging.WARNING, logger="loranotes.trackers"):
        metrics, _, _ = tracked_run(tiny_model, in_tmp, broken)
    warnings = [r.getMessage() for r in caplog.records if r.name == "loranotes.trackers"]
    assert len(warnings) == 3, warnings
    assert any(w.startswith("loranotes: wandb tracking stopped (start failed: ") for w in warnings)
    assert any(w.startswith("loranotes: mlflow tracking stopped (start failed: ") for w in warnings)
    assert ("loranotes: tensorboard tracking stopped (metrics failed: ConnectionError: server went "
            "away); the run goes on without it") in warnings
    assert all(w.endswith("the run goes on without it") for w in warnings)
    assert metrics["steps"] == untracked["steps"] == 12
    assert metrics["eval_loss_after"] == pytest.approx(untracked["eval_loss_after"], abs=1e-6)
    assert json.loads((in_tmp / "out" / "tracking.json").read_text()) == {}


# --- config: on, off per variant, inherited; not installed is a dry-run error -------------------

def config_with(logging_config, **variant_logging):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["logging"] = logging_config
    for name, value in variant_logging.items():
        config["variants"][name]["logging"] = value
    validate_config(config, REPO / "schemas" / "config.schema.yaml", "exp.yaml")
    return config


def test_the_embedded_default_logs_to_no_tracker():
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    assert "logging" not in config
    assert all(v["logging"] == {} for v in resolve_config(config)["variants"].values())


def test_a_variant_turns_a_tracker_off_and_its_children_inherit_that(in_tmp):
    config = config_with(ALL_THREE, v2={"wandb": False}, v3={"mlflow": {"experiment": "llama"}})
    config["variants"]["v4"] = {"from": "v2", "title": "from v2"}
    variants = resolve_config(config)["variants"]
    assert set(variants["v1"]["logging"]) == {"tensorboard", "wandb", "mlflow"}
    assert set(variants["v2"]["logging"]) == set(variants["v4"]["logging"]) == {"tensorboard", "mlflow"}
    assert variants["v3"]["logging"]["mlflow"] == {"tracking_uri": "results/tracking/mlruns",
                                                   "experiment": "llama"}
    assert variants["v1"]["logging"]["wandb"]["dir"] == "results/tracking"
    assert variants["v1"]["logging"]["tensorboard"] == {"dir": "results/tracking/tensorboard"}


@pytest.mark.parametrize("where, config, message", [
    ("top level", lambda: config_with({"wandb": {"project": "p"}}),
     "exp.yaml: logging.wandb: the wandb tracker needs a package that is not installed: pip install wandb"),
    ("a variant", lambda: config_with({}, v3={"mlflow": True}),
     "exp.yaml: variants.v3.logging.mlflow: the mlflow tracker needs a package that is not "
     "installed: pip install mlflow-skinny"),
])
def test_a_tracker_not_installed_is_a_dry_run_error(monkeypatch, where, config, message):
    real_find_spec = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec",
                        lambda name: None if name in ("wandb", "mlflow") else real_find_spec(name))
    with pytest.raises(ConfigError) as error:
        resolve_config(copy.deepcopy(config()), "exp.yaml")
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("logging_config, message", [
    ({"wandb": {"mode": "sometimes"}}, "logging.wandb.mode: 'sometimes' is not one of: online, offline"),
    ({"mlflow": {"uri": "x"}}, "logging.mlflow.uri: unknown key; known keys here: tracking_uri, experiment"),
    ({"neptune": True}, "logging.neptune: unknown key"),
])
def test_tracker_settings_are_checked_by_the_schema(logging_config, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        config_with(logging_config)
