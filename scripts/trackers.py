"""Experiment trackers: each training run (variant, seed) logged to TensorBoard, Weights & Biases
and MLflow as the config's `logging:` asks, where researchers already compare runs.

The trainer calls a `Trackers` at four points: `start` (the run's resolved settings as run config,
and what it already has: the eval before training, or the steps of the checkpoint it resumes
from), `step` and `evaluation` (each as it happens), `finish` (the provenance as run config, the
final metrics as summary, and `tracking.json`: where the run went). A run that ends without its
results (an error, a stop by signal that a rerun resumes) is marked so in each tracker, with the
reason, when it leaves `with trackers:`; it never shows as running forever. The generate_after job of a
variant's first seed reopens that run from `tracking.json` and adds the before/after samples as a
table. Only rank 0 logs.

Trackers are optional packages: `missing_packages` says which configured ones are not installed
(the dry run stops on them). A tracker that fails while a run goes on (network, auth, a full
disk) never fails the run: one warning line, and the run goes on without it.
"""

import importlib.util
import json
import logging
import math
import os
import shutil
from pathlib import Path

from errors import first_line
from graceful_stop import Stopped

log = logging.getLogger("loranotes.trackers")

# tracker: (module to import, what to pip install).
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow-skinny")}
# Where trackers write when the config does not say: beside the run's other results.
TRACKING_DIR = "results/tracking"
DEFAULTS = {
    "tensorboard": {"dir": f"{TRACKING_DIR}/tensorboard"},
    "wandb": {"project": "loranotes", "entity": None, "mode": "online", "group": None,
              "dir": TRACKING_DIR},
    "mlflow": {"tracking_uri": f"{TRACKING_DIR}/mlruns", "experiment": "loranotes"},
}
# Per-step columns of train_log.csv logged as train/<name>; tokens/s is derived per step.
STEP_METRICS = ("loss", "token_accuracy", "lr", "grad_norm", "peak_memory_gb")
EVAL_METRICS = ("loss", "loss_se", "accuracy")
SAMPLE_COLUMNS = ["prompt", "before", "after"]


def resolve_logging(top, variant=None):
    """{tracker: settings} of the trackers on for a variant: the top-level `logging:` with the
    variant's own on top (a tracker `false` there is off, a dict changes some of its keys)."""
    resolved = {}
    for name, defaults in DEFAULTS.items():
        value = top.get(name, False)
        if variant is not None and name in variant:
            mine = variant[name]
            value = mine if isinstance(mine, bool) or not isinstance(value, dict) else {**value, **mine}
        if value is False:
            continue
        resolved[name] = {**defaults, **({} if value is True else value)}
    return resolved


def missing_packages(trackers):
    """[(tracker, pip package)] of the trackers whose package is not installed."""
    return [(name, PACKAGES[name][1]) for name in trackers
            if importlib.util.find_spec(PACKAGES[name][0]) is None]


def run_tracking(trackers, variant, seed, group=None):
    """What a run's jobs pass to open_trackers / reopen_trackers: the trackers on for its variant
    (resolve_logging), its tracker run name (v1-seed0) and group: by default the name of the
    directory the workflow runs in, whose results/report.md these runs make up."""
    return {"trackers": trackers, "name": f"{variant}-seed{seed}", "group": group or Path.cwd().name,
            "run": {"variant": variant, "seed": int(seed)}}


# --- the trackers ------------------------------------------------------------------------------

class TensorBoard:
    """Event files under <dir>/<run name>/ (torch's SummaryWriter); settings, summary and
    samples as text. A rerun of a run replaces its event files, as it replaces its results."""

    def __init__(self, settings, name, group, record=None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(record["log_dir"]) if record else Path(settings["dir"]) / name
        if record is None and self.log_dir.is_dir():
            shutil.rmtree(self.log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.configs = 0  # config texts written: the settings (step 0), the provenance (1)

    def config(self, values):
        self.writer.add_text("config", "```\n" + json.dumps(values, indent=2, default=str) + "\n```",
                             global_step=self.configs)
        self.configs += 1

    def metrics(self, values, step):
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def summary(self, values):
        self.writer.add_text("summary", markdown_table(["metric", "value"], list(values.items())))

    def table(self, key, columns, rows):
        self.writer.add_text(key, markdown_table(columns, rows))

    def close(self):
        self.writer.close()

    def end_unfinished(self, reason, stopped):
        self.writer.add_text("ended", reason)
        self.close()

    def record(self):
        return {"log_dir": str(self.log_dir)}


class Wandb:
    """A W&B run named after the run, in the configured project and group; offline, a run
    directory under <dir>/wandb/ that `wandb sync` uploads later."""

    def __init__(self, settings, name, group, record=None):
        import wandb

        self.wandb = wandb
        self.settings = settings
        # An absolute directory: W&B's service process writes the run's records relative to its
        # own working directory, which is the one of the first run it served in this process.
        # With a relative one, a second run after a chdir (the tests) lost its whole record.
        run_dir = Path(settings["dir"]).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        quiet = wandb.Settings(console="off", silent=True, disable_git=True, save_code=False)
        self.run = wandb.init(
            project=settings["project"], entity=settings["entity"], mode=settings["mode"],
            group=settings["group"] or group, name=name, dir=str(run_dir), settings=quiet,
            **({"id": record["id"], "resume": "allow"} if record else {}),
        )

    def config(self, values):
        self.run.config.update(values, allow_val_change=True)

    def metrics(self, values, step):
        self.run.log(values, step=step)

    def summary(self, values):
        self.run.summary.update(values)

    def table(self, key, columns, rows):
        self.run.log({key: self.wandb.Table(columns=columns, data=rows)})

    def close(self):
        self.run.finish()

    def end_unfinished(self, reason, stopped):
        self.run.summary["ended"] = reason
        self.run.finish(exit_code=1)  # W&B shows a run with a non-zero exit code as failed

    def record(self):
        return {"id": self.run.id, "project": self.settings["project"],
                "mode": self.settings["mode"], "dir": self.settings["dir"]}


class Mlflow:
    """An MLflow run named after the run, tagged with the group, in the configured experiment.
    A tracking_uri that is a path is MLflow's file store (in maintenance mode since MLflow 3.17,
    which refuses it unless MLFLOW_ALLOW_FILE_STORE is set: loranotes sets it for such a path)."""

    def __init__(self, settings, name, group, record=None):
        uri = settings["tracking_uri"]
        if "://" not in uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = Path(uri).resolve().as_uri()
        from mlflow.tracking import MlflowClient

        self.client, self.uri = MlflowClient(tracking_uri=uri), uri
        if record:
            self.run_id = record["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(settings["experiment"])
        experiment_id = (experiment.experiment_id if experiment
                         else self.client.create_experiment(settings["experiment"]))
        self.run_id = self.client.create_run(experiment_id, run_name=name,
                                             tags={"group": group}).info.run_id

    def config(self, values):
        from mlflow.entities import Param

        params = [Param(key, str(value)[:6000]) for key, value in flatten(values).items()]
        for start in range(0, len(params), 100):  # MLflow takes 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def metrics(self, values, step):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step)
                                                    for key, value in values.items()])

    def summary(self, values):
        self.client.log_dict(self.run_id, values, "summary.json")
        self.metrics({f"final/{key}": value for key, value in values.items() if _number(value)}, 0)

    def table(self, key, columns, rows):
        self.client.log_table(self.run_id, {column: [row[i] for row in rows]
                                            for i, column in enumerate(columns)}, f"{key}.json")

    def close(self):
        self.client.set_terminated(self.run_id)

    def end_unfinished(self, reason, stopped):
        self.client.set_tag(self.run_id, "ended", reason)
        self.client.set_terminated(self.run_id, status="KILLED" if stopped else "FAILED")

    def record(self):
        return {"run_id": self.run_id, "tracking_uri": self.uri}


BACKENDS = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": Mlflow}


class Trackers:
    """The trackers of one run. Every call goes to each tracker still working; one that raises
    is reported in one warning line and left out from then on."""

    def __init__(self, trackers=None, settings=None, record_path=None):
        self.trackers = dict(trackers or {})
        self.settings = settings or {}
        self.record_path = record_path
        self.closed = False

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        """Leaving with an error before `finish`: each tracker marks the run as ended without
        its results ("ended": the reason): failed, or killed for a stop by signal (Stopped).
        No tracking.json is written, so the job has no output and reruns."""
        if error is None or self.closed:
            return
        stopped = isinstance(error, Stopped)
        reason = str(error) if stopped else first_line(error)
        self._each("end_unfinished", lambda tracker: tracker.end_unfinished(reason, stopped))
        self.closed = True

    def start(self, progress):
        """The run's settings as config; the steps and evaluations it has already."""
        self._each("config", lambda tracker: tracker.config(self.settings))
        for record in progress["steps"]:
            self.step(record)
        for evaluation in progress["evaluations"]:
            self.evaluation(evaluation)

    def step(self, record):
        """One train_log.csv row (run_metrics.step_record)."""
        values = {f"train/{key}": record[key] for key in STEP_METRICS if _number(record.get(key))}
        if record.get("seconds"):
            values["train/tokens_per_s"] = record["tokens"] / record["seconds"]
        self._each("metrics", lambda tracker: tracker.metrics(values, record["step"]))

    def evaluation(self, evaluation):
        """One held-out evaluation ({"step", "loss", "loss_se", "accuracy", ...})."""
        values = {f"eval/{key}": evaluation[key] for key in EVAL_METRICS if _number(evaluation.get(key))}
        self._each("metrics", lambda tracker: tracker.metrics(values, evaluation["step"]))

    def finish(self, metrics):
        """The provenance as config, the final numbers as summary; then tracking.json."""
        summary = {key: value for key, value in metrics.items()
                   if key != "provenance" and (_number(value) or isinstance(value, str))}
        self._each("config", lambda tracker: tracker.config({"provenance": metrics.get("provenance")}))
        self._each("summary", lambda tracker: tracker.summary(summary))
        self.close()

    def samples(self, before, after):
        """The before/after answers to the prompts as one table ("samples")."""
        rows = [[b["prompt"], b["completion"], a["completion"]]
                for b, a in zip(before["samples"], after["samples"], strict=True)]
        self._each("table", lambda tracker: tracker.table("samples", SAMPLE_COLUMNS, rows))
        self.close()

    def close(self):
        self._each("close", lambda tracker: tracker.close())
        self.closed = True
        if self.record_path:
            write_record(self.record_path, {name: tracker.record()
                                            for name, tracker in self.trackers.items()})

    def _each(self, what, call):
        for name, tracker in list(self.trackers.items()):
            try:
                call(tracker)
            except Exception as error:  # noqa: BLE001  (a tracker never fails the run)
                self._drop(name, what, error)

    def _drop(self, name, what, error):
        log.warning("loranotes: %s tracking stopped (%s failed: %s); the run goes on without it",
                    name, what, first_line(error))
        self.trackers.pop(name, None)


def open_trackers(tracking, settings, record_path=None, rank=0):
    """The trackers of one training run. tracking: {"trackers": resolve_logging(...), "name",
    "group", "run": {"variant", "seed"}}; settings: the run's resolved settings; both are its run
    config. Only rank 0 logs."""
    if rank != 0:
        return Trackers()
    trackers = Trackers(settings={**tracking.get("run", {}), **settings}, record_path=record_path)
    for name, tracker_settings in tracking["trackers"].items():
        try:
            trackers.trackers[name] = BACKENDS[name](tracker_settings, tracking["name"],
                                                     tracking["group"])
        except Exception as error:  # noqa: BLE001
            trackers._drop(name, "start", error)
    if trackers.trackers:
        log.info("logging run %s (group %s) to %s", tracking["name"], tracking["group"],
                 "; ".join(f"{name} {tracker.record()}" for name, tracker in trackers.trackers.items()))
    return trackers


def reopen_trackers(tracking, record_path):
    """The trackers a finished training run logged to (its tracking.json), to add to that run."""
    record = json.loads(Path(record_path).read_text())
    trackers = Trackers()
    for name, entry in record.items():
        if name not in tracking["trackers"]:
            continue
        try:
            trackers.trackers[name] = BACKENDS[name](tracking["trackers"][name], tracking["name"],
                                                     tracking["group"], record=entry)
        except Exception as error:  # noqa: BLE001
            trackers._drop(name, "reopen", error)
    return trackers


def write_record(path, record):
    """tracking.json: where the run was logged ({} without trackers), written whole."""
    partial = Path(f"{path}.partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.rename(path)


# --- helpers -----------------------------------------------------------------------------------

def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def flatten(values, prefix=""):
    """{"training": {"lr": 1e-3}} -> {"training.lr": 1e-3}; lists as JSON."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list) else value
    return flat


def markdown_table(columns, rows):
    """A markdown table (TensorBoard's text plugin renders markdown); cells on one line."""
    def cell(value):
        return " ".join(str(value).split()).replace("|", "\\|")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)
