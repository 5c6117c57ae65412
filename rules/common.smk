import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")

# The pipeline's logic lives in scripts/ as importable modules; the rules only wire files.
sys.path.insert(0, str(Path(workflow.basedir) / "scripts"))
from experiment_config import (
    ConfigError,
    check_models,
    resolve_config,
    validate_config,
)  # noqa: E402
import model_sources  # noqa: E402

CONFIG_SOURCE = ", ".join(map(str, workflow.overwrite_configfiles or ["config.yaml"]))
# Like snakemake.utils.validate, but each message names the file and key and says what to do.
try:
    validate_config(
        config, Path(workflow.basedir) / "schemas" / "config.schema.yaml", CONFIG_SOURCE
    )
    CONFIG = resolve_config(config, CONFIG_SOURCE)
    check_models(CONFIG, CONFIG_SOURCE)
except ConfigError as error:
    raise WorkflowError(str(error)) from None
VARIANTS = CONFIG["variants"]
MODELS = CONFIG["models"]


wildcard_constraints:
    variant="|".join(VARIANTS),
    model="|".join(MODELS),
    quant="nf4|none",


def dataset_files():
    """The data step's input: the bundled sample, or a local file (so that editing it reruns
    the data step); a hub dataset is no file."""
    source = CONFIG["dataset"]["source"]
    if source == "bundled":
        return {"bundled": "results/data/bundled_sample.jsonl"}
    if source.endswith((".jsonl", ".json", ".parquet")):
        return {"source": source}
    return {}


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


def comparison_plots():
    """{name: {"variants": [...], "title": ...}}: the config's comparisons plus all variants."""
    plots = {"all_variants": {"variants": list(VARIANTS), "title": "All variants"}}
    for comparison in CONFIG["comparisons"]:
        plots[comparison["name"]] = {
            "variants": comparison["variants"],
            "title": comparison.get("title") or " vs ".join(comparison["variants"]),
        }
    return plots
