"""The experiment config, resolved: defaults filled in, variants' `from:` inheritance applied,
and the cross-references a JSON schema cannot check (unknown `from:`/`model:`, cycles,
comparisons naming unknown variants) turned into errors that name the key and say what to do.

The schema (schemas/config.schema.yaml) catches unknown keys and wrong types first; this module
runs right after it, when the Snakefile is parsed, so `snakemake -n` already fails on a bad config.
"""

import copy

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
    "gradient_checkpointing": False,
    "device": "auto",
    "seed": 0,
}
LORA_DEFAULTS = {
    "r": 1,
    "alpha": 2,
    "dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
DATASET_DEFAULTS = {"split": "train_sft", "num_train": 800, "num_eval": 100, "seed": 0, "bundled_size": 400}
GENERATION_DEFAULTS = {"max_new_tokens": 128}
MODEL_DEFAULTS = {"prompt_format": "chat_template", "trust_remote_code": False}

# The settings a variant inherits from its parent, in the order the report lists changes.
INHERITED_KEYS = ("model", "quantization")


class ConfigError(ValueError):
    """A config mistake, explained: where it is and how to fix it."""


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
    config["variants"] = resolve_variants(config, source)
    check_comparisons(config, source)
    return config


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
            if parent_name in chain:
                cycle = " -> ".join([*chain[chain.index(parent_name):], parent_name])
                raise ConfigError(
                    f"{source}: variants.{name}.from: inheritance cycle {cycle}. "
                    "Each variant must derive from one declared before the cycle closes."
                )
            parent = resolve(parent_name, [*chain, name])
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
