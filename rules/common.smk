import json
import os
import shlex
import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")

# The pipeline's logic lives in scripts/ as importable modules; the rules only wire files.
sys.path.insert(0, str(Path(workflow.basedir) / "scripts"))
from experiment_config import (
    ConfigError,
    check_dataset,
    check_models,
    resolve_config,
    run_training,
    sweep_plot_name,
    validate_config,
)  # noqa: E402
from prepare_data import BUNDLED_SAMPLE, dataset_source, prepared_dir  # noqa: E402
from trackers import run_tracking  # noqa: E402
import model_sources  # noqa: E402
import run_lock  # noqa: E402

CONFIG_FILES = workflow.overwrite_configfiles or [
    Path(workflow.basedir) / "config.yaml"
]
CONFIG_SOURCE = ", ".join(map(str, workflow.overwrite_configfiles or ["config.yaml"]))
# Like snakemake.utils.validate, but each message names the file and key and says what to do.
try:
    validate_config(
        config, Path(workflow.basedir) / "schemas" / "config.schema.yaml", CONFIG_SOURCE
    )
    CONFIG = resolve_config(config, CONFIG_SOURCE)
    check_dataset(CONFIG, CONFIG_SOURCE)
    check_models(CONFIG, CONFIG_SOURCE)
except ConfigError as error:
    raise WorkflowError(str(error)) from None
VARIANTS = CONFIG["variants"]
MODELS = CONFIG["models"]
SWEEPS = CONFIG["sweeps"]

# One run per directory (scripts/run_lock.py): a run that starts jobs holds the lock until it
# ends; any invocation (a dry run, --unlock) says when another run is active. Not in the jobs
# Snakemake starts on other machines (SLURM), which run under the main run's lock.
if workflow.is_main_process:
    ACTIVE_RUN = run_lock.active_holder()
    if ACTIVE_RUN:
        print(f"loranotes: note: {run_lock.refusal(ACTIVE_RUN)}", file=sys.stderr)


onstart:
    try:
        stale = run_lock.acquire(shlex.join(sys.argv))
    except run_lock.RunLockError as error:
        raise WorkflowError(str(error)) from None
    if stale:
        print(
            "loranotes: the run before "
            f"({run_lock.describe(stale)}) ended without finishing (killed?); its lock is replaced",
            file=sys.stderr,
        )


onsuccess:
    run_lock.release()


onerror:
    run_lock.release()


# Provenance (scripts/provenance.py): the command the user typed and the config files, as the
# jobs' environment (the job processes inherit it, SLURM jobs through --export=ALL). Not params:
# a param that changes with every invocation would rerun every job.
os.environ.setdefault("LORANOTES_COMMAND", shlex.join(sys.argv))
os.environ.setdefault(
    "LORANOTES_CONFIG_FILES", json.dumps([str(Path(f).resolve()) for f in CONFIG_FILES])
)


wildcard_constraints:
    variant="|".join(VARIANTS),
    model="|".join(MODELS),
    quant="nf4|none",
    seed=r"\d+",
    # plot names: comparisons (and all_variants), sweep plots (experiment_config refuses a clash)
    name="|".join(["all_variants", *(c["name"] for c in CONFIG["comparisons"])]),
    sweep="|".join(SWEEPS) or "no-sweeps",


def dataset_files():
    """The data step's input: the local files it reads (the bundled sample, a file, a
    directory's shards), so that editing one reruns it; a hub dataset is no file."""
    dataset = CONFIG["dataset"]
    return {"data": list(dataset_source(dataset["source"], dataset["split"]).files)}


# The data step's own folder for these dataset settings (prepare_data.prepared_dir).
PREPARED_DATA = prepared_dir(CONFIG["dataset"])


# The bundled sample's topics and the built models' pretraining text (an input: editing it reruns them).
KNOWLEDGE_FILE = "scripts/data/knowledge.yaml"


def is_built(model_name):
    """True when the pipeline builds the model itself instead of loading it."""
    return model_sources.is_built(MODELS[model_name], CONFIG["weights"])


def model_path(model_name):
    if is_built(model_name):
        return f"results/models/{model_name}"
    return MODELS[model_name]["path"]


def model_files(model_name):
    """Input files for rules that load the model: the built directory, or nothing for hub ids."""
    return [f"results/models/{model_name}"] if is_built(model_name) else []


def tokenized_name(variant):
    """Tokenized data is shared by every variant with the same model and max length."""
    v = VARIANTS[variant]
    return f"{v['model']}-L{v['training']['max_length']}"


def tokenized_settings(wildcards):
    model_name, max_length = wildcards.tokenized.rsplit("-L", 1)
    return {"model_name": model_name, "max_length": int(max_length)}


def tokenized_files(variant):
    directory = f"results/tokenized/{tokenized_name(variant)}"
    return {
        "train": f"{directory}/train.parquet",
        "eval": f"{directory}/eval.parquet",
        "stats": f"{directory}/stats.json",
    }


def before_samples(variant):
    v = VARIANTS[variant]
    return f"results/samples/before/{v['model']}__{v['quantization']}.json"


# --- runs: one per (variant, seed) ------------------------------------------------------------


def runs(variants=None):
    """(variant, seed) of every training run, in config order: variants, then their seeds."""
    return [(v, seed) for v in variants or VARIANTS for seed in VARIANTS[v]["seeds"]]


def run_dir(variant, seed):
    return f"results/variants/{variant}/seed-{seed}"


def run_files(filename, variants=None):
    """One file of every run: run_files("metrics.json") for all, or of some variants."""
    return [f"{run_dir(v, seed)}/{filename}" for v, seed in runs(variants)]


def first_seed(variant):
    """The run whose adapter answers the prompts ("after" samples): the variant's first seed."""
    return VARIANTS[variant]["seeds"][0]


def after_samples(variant):
    return f"{run_dir(variant, first_seed(variant))}/samples_after.json"


def get_variant_model(wildcards):
    return VARIANTS[wildcards.variant]["model"]


def get_train_input(wildcards):
    return {
        **tokenized_files(wildcards.variant),
        "model": model_files(get_variant_model(wildcards)),
    }


def get_run_settings(wildcards):
    """Everything that shapes one run, so changing one reruns that run only; the seed is the
    run's own (adding a seed to training.seeds leaves the other runs' settings unchanged).
    """
    variant = VARIANTS[wildcards.variant]
    return {
        "model": variant["model"],
        "quantization": variant["quantization"],
        "training": run_training(variant, wildcards.seed),
        "lora": variant["lora"],
    }


def get_run_tracking(wildcards):
    """The trackers a run logs to, its tracker run name and group (trackers.run_tracking)."""
    variant = VARIANTS[wildcards.variant]
    return run_tracking(variant["logging"], wildcards.variant, wildcards.seed)


def tracked(variant):
    """Whether a variant's runs are logged to a tracker."""
    return bool(VARIANTS[variant]["logging"])


def sweep_plots():
    return [f"results/plots/{sweep_plot_name(sweep)}.png" for sweep in SWEEPS]


def get_train_gpus(wildcards):
    """The GPUs a train job asks for (the SLURM profile's --gpus): training.devices, or none for
    a variant that trains on the CPU (training.device: cpu)."""
    training = VARIANTS[wildcards.variant]["training"]
    return 0 if training["device"] == "cpu" else training["devices"]


def comparison_plots():
    """{name: {"variants": [...], "title": ...}}: the config's comparisons plus all variants."""
    plots = {"all_variants": {"variants": list(VARIANTS), "title": "All variants"}}
    for comparison in CONFIG["comparisons"]:
        plots[comparison["name"]] = {
            "variants": comparison["variants"],
            "title": comparison.get("title") or " vs ".join(comparison["variants"]),
        }
    return plots


def get_plot_variants(wildcards):
    return comparison_plots()[wildcards.name]["variants"]
