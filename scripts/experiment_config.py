"""The experiment config, resolved: defaults filled in, variants' `from:` inheritance applied,
and the cross-references a JSON schema cannot check (unknown `from:`/`model:`, cycles,
comparisons naming unknown variants) turned into errors that name the key and say what to do.

The schema (schemas/config.schema.yaml) catches unknown keys and wrong types first, with a
message that names the key and suggests the right one; then come the cross-references, and
last the checks that look at the disk (local model weights, LoRA target modules). All of it
runs when the Snakefile is parsed, so `snakemake -n` already fails on a bad config.
"""

import copy
import difflib

import yaml

from bundled_sample import load_knowledge, unknown_topics
from errors import LoranotesError
from model_sources import ModelError, lora_layer_names, local_model_problem, target_modules_problem

TRAINING_DEFAULTS = {
    "steps": 100,
    "batch_size": 4,
    "grad_accum": 1,
    "lr": 2.0e-4,
    "lr_scheduler": "constant_with_warmup",
    "warmup_steps": 0,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "max_length": 1024,
    "eval_batch_size": 8,
    "gradient_checkpointing": "auto",
    "memory_budget_gb": None,
    "packing": "auto",
    "batch_tokens": None,
    "fused_kernels": "auto",
    "compile": True,
    "device": "auto",
    "seed": 0,
    "checkpoint_every": 50,
}
LORA_DEFAULTS = {
    "r": 1,
    "alpha": 2,
    "dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
DATASET_DEFAULTS = {"split": "train_sft", "num_train": 800, "num_eval": 100, "seed": 0, "bundled_size": 400,
                    "bundled_topics": "all"}
GENERATION_DEFAULTS = {"max_new_tokens": 128, "no_repeat_ngram_size": 0}
MODEL_DEFAULTS = {"prompt_format": "chat_template", "trust_remote_code": False}

# The settings a variant inherits from its parent, in the order the report lists changes.
INHERITED_KEYS = ("model", "quantization")


class ConfigError(LoranotesError, ValueError):
    """A config mistake, explained: where it is and how to fix it."""


# Names other fine-tuning tools use, so `learning_rate` is answered with "did you mean lr?".
KEY_ALIASES = {
    "learning_rate": "lr",
    "max_steps": "steps",
    "num_steps": "steps",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "max_seq_length": "max_length",
    "lr_scheduler_type": "lr_scheduler",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "rank": "r",
    "base_model": "model",
    "model_name_or_path": "path",
}


def validate_config(config, schema_path, source="config.yaml"):
    """Check the config against the JSON schema; one ConfigError lists every problem found,
    each as `<file>: <key>: <what is wrong and what to do>`."""
    import jsonschema
    import yaml

    with open(schema_path, encoding="utf-8") as f:
        schema = yaml.safe_load(f)
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    problems = [problem for error in errors for problem in explain_schema_error(error)]
    if problems:
        raise ConfigError("\n".join(f"{source}: {problem}" for problem in problems))


def key_path(parts):
    """['variants', 'v1', 'training'] -> 'variants.v1.training'; list indexes as [0]."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "(top level)"


def explain_schema_error(error):
    where = key_path(error.absolute_path)
    value = repr(error.instance)
    value = value if len(value) <= 60 else value[:57] + "..."
    if error.validator == "additionalProperties" and error.validator_value is False:
        known = list(error.schema.get("properties", {}))
        return [
            f"{key_path([*error.absolute_path, key])}: {unknown_key_hint(key, known)}"
            for key in error.instance
            if key not in known
        ]
    if error.validator == "required":
        return [f"{where}: {error.message.split(' is a required')[0]} is missing; add it"]
    if error.validator == "type":
        hint = ""
        if error.validator_value == "number" and isinstance(error.instance, str):
            hint = " (YAML reads 1e-4 as a string: write 1.0e-4)"
        return [f"{where}: expected {error.validator_value}, got {value}{hint}"]
    if error.validator == "enum":
        options = ", ".join(yaml.safe_dump(option).removesuffix("\n...\n").strip()
                            for option in error.validator_value)  # as YAML spells them: true
        return [f"{where}: {value} is not one of: {options}"]
    if error.validator == "oneOf":
        options = [" + ".join(option.get("required", ["?"])) for option in error.validator_value]
        return [f"{where}: needs exactly one of {' or '.join(options)}"]
    return [f"{where}: {error.message}"]


def unknown_key_hint(key, known):
    if "token" in key.lower():
        return "unknown key; never put a Hugging Face token in a config file: export HF_TOKEN"
    aliases = {alias: name for alias, name in KEY_ALIASES.items() if name in known}
    match = difflib.get_close_matches(key, [*known, *aliases], n=1)
    suggestion = f" (did you mean {aliases.get(match[0], match[0])}?)" if match else ""
    return f"unknown key{suggestion}; known keys here: {', '.join(known)}"


def resolve_config(config, source="config.yaml"):
    """Return a new config with every default filled in and `variants` fully resolved.

    Each resolved variant carries: name, title, description, parent (or None), model,
    quantization, training, lora (complete dicts) and `changes`, the settings that differ from
    the parent as {"key": "training.lr", "from": old, "to": new}.
    """
    config = copy.deepcopy(config)
    config["dataset"] = {**DATASET_DEFAULTS, **config["dataset"]}
    config["generation"] = {**GENERATION_DEFAULTS, **config.get("generation", {})}
    config["training"] = {**TRAINING_DEFAULTS, **config.get("training", {})}
    config["lora"] = {**LORA_DEFAULTS, **config.get("lora", {})}
    config.setdefault("weights", "pretrained")
    config.setdefault("comparisons", [])
    config["models"] = {
        name: {**MODEL_DEFAULTS, **model} for name, model in config["models"].items()
    }
    check_bundled_topics(config["dataset"]["bundled_topics"], source)
    config["variants"] = resolve_variants(config, source)
    check_comparisons(config, source)
    return config


def check_bundled_topics(names, source="config.yaml"):
    if names == "all":
        return
    knowledge = load_knowledge()
    unknown = unknown_topics(knowledge, names)
    if unknown:
        known = ", ".join(topic["name"] for topic in knowledge["topics"])
        raise ConfigError(f"{source}: dataset.bundled_topics: {', '.join(map(repr, unknown))} "
                          f"not in scripts/data/knowledge.yaml; its topics: {known}")


def resolve_variants(config, source="config.yaml"):
    declared = config["variants"]
    resolved = {}

    def resolve(name, chain):
        if name in resolved:
            return resolved[name]
        spec = declared[name]
        parent_name = spec.get("from")
        if parent_name is not None:
            if parent_name not in declared:
                raise ConfigError(
                    f"{source}: variants.{name}.from: '{parent_name}' is not a variant "
                    f"(variants: {', '.join(declared)}). Fix the name or remove `from:`."
                )
            path = [*chain, name]
            if parent_name in path:
                cycle = " -> ".join([*path[path.index(parent_name):], parent_name])
                raise ConfigError(
                    f"{source}: variants.{name}.from: inheritance cycle {cycle}. "
                    "Break it: one of these variants must set its settings without `from:`."
                )
            parent = resolve(parent_name, path)
            base = {
                "model": parent["model"],
                "quantization": parent["quantization"],
                "training": parent["training"],
                "lora": parent["lora"],
            }
        else:
            parent = None
            base = {
                "model": None,
                "quantization": "none",
                "training": config["training"],
                "lora": config["lora"],
            }
        variant = {
            "name": name,
            "title": spec.get("title", name),
            "description": spec.get("description", ""),
            "parent": parent_name,
            "model": spec.get("model", base["model"]),
            "quantization": spec.get("quantization", base["quantization"]),
            "training": {**base["training"], **spec.get("training", {})},
            "lora": {**base["lora"], **spec.get("lora", {})},
        }
        if variant["model"] is None:
            raise ConfigError(
                f"{source}: variants.{name}: no `model:` (and no `from:` to inherit one). "
                f"Add `model:` naming one of: {', '.join(config['models'])}."
            )
        if variant["model"] not in config["models"]:
            raise ConfigError(
                f"{source}: variants.{name}.model: '{variant['model']}' is not a model "
                f"(models: {', '.join(config['models'])}). Fix the name or add it under `models:`."
            )
        if variant["training"]["batch_tokens"] and variant["training"]["packing"] is False:
            raise ConfigError(
                f"{source}: variants.{name}.training.batch_tokens: needs training.packing: true "
                "or auto (a token budget counts real tokens; padded batches would go over it)"
            )
        variant["changes"] = changes_from(parent, variant) if parent else []
        resolved[name] = variant
        return variant

    for name in declared:
        resolve(name, [])
    # Keep the order of config.yaml: the report lists variants as the user wrote them.
    return {name: resolved[name] for name in declared}


def flatten_settings(variant):
    """The settings that define a training run, as flat 'training.lr'-style keys."""
    flat = {key: variant[key] for key in INHERITED_KEYS}
    for section in ("training", "lora"):
        for key, value in variant[section].items():
            flat[f"{section}.{key}"] = value
    return flat


def changes_from(parent, variant):
    before, after = flatten_settings(parent), flatten_settings(variant)
    return [
        {"key": key, "from": before[key], "to": after[key]}
        for key in after
        if before[key] != after[key]
    ]


def check_comparisons(config, source="config.yaml"):
    for index, comparison in enumerate(config["comparisons"]):
        for name in comparison["variants"]:
            if name not in config["variants"]:
                raise ConfigError(
                    f"{source}: comparisons[{index}] ('{comparison['name']}'): "
                    f"'{name}' is not a variant (variants: {', '.join(config['variants'])})."
                )
    names = [comparison["name"] for comparison in config["comparisons"]]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(
            f"{source}: comparisons: the name(s) {', '.join(duplicates)} appear more than once; "
            "each comparison writes results/plots/<name>.png, so names must be unique."
        )


def check_models(config, source="config.yaml"):
    """What needs a look at the disk: local model directories have weights, and every variant's
    lora.target_modules exist in its model (where the architecture is known offline)."""
    for name, model in config["models"].items():
        if "init" not in model and config["weights"] != "random":
            problem = local_model_problem(model["path"])
            if problem:
                raise ConfigError(f"{source}: models.{name}.path: {problem}")
    for name, variant in config["variants"].items():
        try:
            layer_names = lora_layer_names(config["models"][variant["model"]], config["weights"])
        except ModelError as error:
            raise ConfigError(f"{source}: models.{variant['model']}: {error}") from None
        if layer_names is None:
            continue
        problem = target_modules_problem(
            variant["lora"]["target_modules"], layer_names, f"model {variant['model']}"
        )
        if problem:
            raise ConfigError(f"{source}: variants.{name}.lora.target_modules: {problem}")
