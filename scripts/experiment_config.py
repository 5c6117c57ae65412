"""The experiment config, resolved: defaults filled in, variants' `from:` inheritance applied,
and the cross-references a JSON schema cannot check (unknown `from:`/`model:`, cycles,
comparisons naming unknown variants) turned into errors that name the key and say what to do.

The schema (schemas/config.schema.yaml) catches unknown keys and wrong types first, with a
message that names the key and suggests the right one; then come the cross-references, and
last the checks that look at the disk (the dataset source, local model weights and tokenizers,
init architectures, LoRA target modules and tied embeddings, prompt lengths). All of it runs
when the Snakefile is parsed, so `snakemake -n` already fails on a bad config.
"""

import copy
import difflib
import itertools
import json
import re
from pathlib import Path

import yaml

from chat_format import SEED_ASSISTANT, SEED_SYSTEM, SEED_USER, PromptFormat, template_problem
from bundled_sample import load_knowledge, unknown_topics
from errors import LoranotesError, first_line
from model_sources import (
    ModelError,
    architecture_spec,
    is_local,
    local_model_problem,
    local_tokenizer_problem,
    lora_layer_names,
    target_modules_problem,
)
from prepare_data import DataError, dataset_source
from trackers import missing_packages, resolve_logging

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
    "eval_every": 20,
    "gradient_checkpointing": "auto",
    "memory_budget_gb": None,
    "packing": "auto",
    "batch_tokens": None,
    "fused_kernels": "auto",
    "compile": True,
    "device": "auto",
    "devices": 1,  # data-parallel processes (torchrun), one per GPU of the device
    "seed": 0,  # one run's seed; a variant's runs are set by training.seeds (see run_training)
    "checkpoint_every": 50,
}
# A variant trains once per seed; `training.seed: N` is shorthand for `training.seeds: [N]`.
DEFAULT_SEEDS = [0]
SEED_KEYS = ("seed", "seeds")
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

# The layers that hold the token embeddings (peft's EMBEDDING_LAYER_NAMES): LoRA on them makes
# peft save the embedding matrices with the adapter.
EMBEDDING_TARGETS = ("embed_tokens", "lm_head")

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
        schema = with_sweep_grid(yaml.safe_load(f))
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    problems = [problem for error in errors for problem in explain_schema_error(error)]
    if problems:
        raise ConfigError("\n".join(f"{source}: {problem}" for problem in problems))


def with_sweep_grid(schema):
    """The schema with the keys a sweep's grid may vary filled in, each a list of values of
    that setting's own schema: one definition of every setting's type (its $defs entry), and
    typos in grid keys answered like typos anywhere else. Seeds are not swept: they are the
    noise a sweep's differences are measured against."""
    grid = schema["$defs"]["sweep"]["properties"]["grid"]
    settings = {key: schema["properties"]["variants"]["additionalProperties"]["properties"][key]
                for key in INHERITED_KEYS}
    for section in ("training", "lora"):
        settings.update({f"{section}.{key}": value
                         for key, value in schema["$defs"][section]["properties"].items()
                         if key not in SEED_KEYS})
    grid["properties"] = {key: {"type": "array", "minItems": 1, "items": value}
                          for key, value in settings.items()}
    return schema


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
    quantization, seeds (its runs; `training` holds no seed, see run_training), training, lora
    (complete dicts) and `changes`, the settings that differ from the parent as
    {"key": "training.lr", "from": old, "to": new}.
    """
    config = expand_sweeps(copy.deepcopy(config), source)
    config["dataset"] = {**DATASET_DEFAULTS, **config["dataset"]}
    config["generation"] = {**GENERATION_DEFAULTS, **config.get("generation", {})}
    config["seeds"] = seeds_of(config.get("training", {}), DEFAULT_SEEDS, f"{source}: training")
    config["training"] = without_seeds({**TRAINING_DEFAULTS, **config.get("training", {})})
    config["lora"] = {**LORA_DEFAULTS, **config.get("lora", {})}
    config.setdefault("weights", "pretrained")
    config.setdefault("comparisons", [])
    config.setdefault("logging", {})
    config["models"] = {
        name: {**MODEL_DEFAULTS, **model} for name, model in config["models"].items()
    }
    check_bundled_topics(config["dataset"]["bundled_topics"], source)
    config["variants"] = resolve_variants(config, source)
    check_comparisons(config, source)
    check_trackers(config, source)
    return config


# --- sweeps: grids of settings expanded into ordinary variants ---------------------------------

def expand_sweeps(config, source="config.yaml"):
    """config with every sweep's grid points added to `variants` (after the declared ones), each
    an ordinary variant `from:` the sweep's base with the point's settings, named after them
    (sweep_variant_name); `sweeps` resolved to {name: {"from", "keys", "points": [{"variant",
    "settings"}]}}. A point whose name a declared variant has is an error naming the sweep."""
    sweeps = config.get("sweeps") or {}
    declared = config["variants"]
    variants, resolved = dict(declared), {}
    for sweep, spec in sweeps.items():
        where = f"{source}: sweeps.{sweep}"
        if spec["from"] not in declared:
            raise ConfigError(f"{where}.from: '{spec['from']}' is not a variant (variants: "
                              f"{', '.join(declared)}); a sweep varies a declared variant")
        keys = list(spec["grid"])
        points = []
        for values in itertools.product(*(spec["grid"][key] for key in keys)):
            settings = dict(zip(keys, values))
            name = sweep_variant_name(spec["from"], settings)
            if name in declared:
                raise ConfigError(
                    f"{where}: its grid point {format_settings(settings)} is named {name}, which "
                    "variants already declares; rename that variant")
            point = {"from": spec["from"], "title": f"{sweep}: {format_settings(settings)}",
                     "description": f"Sweep {sweep}: {spec['from']} with {format_settings(settings)}.",
                     **nested_settings(settings)}
            if name in variants and {k: v for k, v in variants[name].items()
                                     if k not in ("title", "description")} != \
                    {k: v for k, v in point.items() if k not in ("title", "description")}:
                raise ConfigError(f"{where}: two grid points are both named {name}; their values "
                                  "differ only past the name's precision: choose distinct values")
            variants.setdefault(name, point)
            points.append({"variant": name, "settings": settings})
        resolved[sweep] = {"from": spec["from"], "keys": keys, "points": points}
    plot_names = {comparison["name"] for comparison in config.get("comparisons", [])}
    for sweep in resolved:
        if sweep_plot_name(sweep) in plot_names:
            raise ConfigError(f"{source}: comparisons: the name {sweep_plot_name(sweep)} is sweep "
                              f"{sweep}'s plot (results/plots/{sweep_plot_name(sweep)}.png); "
                              "rename the comparison")
    return {**config, "variants": variants, "sweeps": resolved}


def sweep_plot_name(sweep):
    """results/plots/<this>.png: a sweep's eval loss against its swept keys."""
    return f"sweep_{sweep}"


VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # the schema's $defs.name


def sweep_variant_name(base, settings):
    """v1 with {lora.r: 4, training.lr: 3.0e-4} -> v1-r4-lr3e-4: each key by its last part,
    numbers short (3e-4, 2p5e-4 for 2.5e-4: names have no dots), other values after an
    underscore (lr_scheduler_cosine, quantization_none)."""
    parts = [base]
    for key, value in settings.items():
        short = key.rsplit(".", 1)[-1]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{short}{short_number(value)}")
        else:
            text = "+".join(map(str, value)) if isinstance(value, list) else str(value).lower()
            parts.append(f"{short}_{re.sub(r'[^A-Za-z0-9_-]+', '_', text)}")
    name = "-".join(parts)
    if not VARIANT_NAME.match(name):
        raise ConfigError(f"sweep variant name {name!r} is not a valid variant name")
    return name


def short_number(value):
    """4 -> "4", 32.0 -> "32", 3.0e-4 -> "3e-4", 2.5e-4 -> "2p5e-4", 0.05 -> "5e-2"."""
    if float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    mantissa, exponent = f"{value:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".").replace(".", "p").replace("-", "m")
    return f"{mantissa}e{int(exponent)}"


def format_settings(settings):
    """ "lora.r 4, training.lr 0.0003" """
    return ", ".join(f"{key} {value}" for key, value in settings.items())


def nested_settings(settings):
    """{"lora.r": 4, "quantization": "none"} -> {"lora": {"r": 4}, "quantization": "none"}."""
    nested = {}
    for key, value in settings.items():
        if "." in key:
            section, inner = key.split(".", 1)
            nested.setdefault(section, {})[inner] = value
        else:
            nested[key] = value
    return nested


# --- trackers ------------------------------------------------------------------------------------

def check_trackers(config, source="config.yaml"):
    """Every tracker a variant logs to is installed: the key that turns it on, and what to
    pip install."""
    for name, variant in config["variants"].items():
        for tracker, package in missing_packages(variant["logging"]):
            where = "logging" if tracker in resolve_logging(config["logging"]) else f"variants.{name}.logging"
            raise ConfigError(
                f"{source}: {where}.{tracker}: the {tracker} tracker needs a package that is not "
                f"installed: pip install {package} (or turn it off: {tracker}: false)")


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
            base = {key: parent[key]
                    for key in ("model", "quantization", "seeds", "training", "lora", "logging")}
        else:
            parent = None
            base = {
                "model": None,
                "quantization": "none",
                "seeds": config["seeds"],
                "training": config["training"],
                "lora": config["lora"],
                "logging": config["logging"],
            }
        variant = {
            "name": name,
            "title": spec.get("title", name),
            "description": spec.get("description", ""),
            "parent": parent_name,
            "model": spec.get("model", base["model"]),
            "quantization": spec.get("quantization", base["quantization"]),
            "seeds": seeds_of(spec.get("training", {}), base["seeds"],
                              f"{source}: variants.{name}.training"),
            "training": without_seeds({**base["training"], **spec.get("training", {})}),
            "lora": {**base["lora"], **spec.get("lora", {})},
            # {tracker: settings} of the trackers on (trackers.resolve_logging)
            "logging": resolve_logging(base["logging"], spec.get("logging", {})),
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


def seeds_of(training, inherited, where):
    """The training seeds one level of the config sets (`seeds: [...]`, or `seed: N` for [N]),
    else the inherited ones. Each seed is one run: its own LoRA initialisation, data order and
    dropout masks (the train/eval split stays fixed by dataset.seed)."""
    if all(key in training for key in SEED_KEYS):
        raise ConfigError(f"{where}: both seed and seeds are set; keep one (seed: N is short for "
                          "seeds: [N])")
    if "seeds" in training:
        return list(training["seeds"])
    if "seed" in training:
        return [training["seed"]]
    return list(inherited)


def without_seeds(training):
    return {key: value for key, value in training.items() if key not in SEED_KEYS}


def run_training(variant, seed):
    """The training settings of one run of a variant: the variant's, with this seed."""
    return {**variant["training"], "seed": int(seed)}


def flatten_settings(variant):
    """The settings that define a training run, as flat 'training.lr'-style keys."""
    flat = {key: variant[key] for key in INHERITED_KEYS}
    flat["training.seeds"] = variant["seeds"]
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
    """What needs a look at the disk or at transformers: local model directories have weights
    and tokenizer files, a Jinja prompt_format renders, init.architecture is one transformers
    knows, every variant's lora.target_modules exist in its model (where the architecture is
    known offline) and leave tied embeddings alone, and the prompts fit local models' context."""
    for name, model in config["models"].items():
        if "init" not in model and config["weights"] != "random":
            problem = local_model_problem(model["path"]) or local_tokenizer_problem(model["path"])
            if problem:
                raise ConfigError(f"{source}: models.{name}.path: {problem}")
        if model["prompt_format"] not in ("chat_template", "seed"):
            problem = template_problem(model["prompt_format"])
            if problem:
                raise ConfigError(f"{source}: models.{name}.prompt_format: read as a Jinja chat "
                                  f"template, it fails: {problem}")
    for name, variant in config["variants"].items():
        model = config["models"][variant["model"]]
        try:
            layer_names = lora_layer_names(model, config["weights"])
        except ModelError as error:
            raise ConfigError(f"{source}: models.{variant['model']}: {error}") from None
        except ValueError as error:  # transformers' 12 KB "Unrecognized model identifier: ..."
            if "init" not in model:
                raise
            raise ConfigError(f"{source}: {init_problem(variant['model'], model['init'], error)}") from None
        targets, problem = variant["lora"]["target_modules"], None
        if layer_names is not None:
            problem = target_modules_problem(targets, layer_names, f"model {variant['model']}")
        problem = problem or tied_embedding_problem(targets, model, variant["model"])
        if problem:
            raise ConfigError(f"{source}: variants.{name}.lora.target_modules: {problem}")
    check_prompt_lengths(config, source)


def check_dataset(config, source="config.yaml"):
    """dataset.source names something the data step can read (no hub lookup for a local path)."""
    try:
        dataset_source(config["dataset"]["source"], config["dataset"]["split"])
    except DataError as error:
        raise ConfigError(f"{source}: {error}") from None


def init_problem(model_name, init, error):
    """One line for an `init:` that transformers cannot build: an unknown architecture (with
    the known ones), else the first line of its error."""
    from transformers import __version__
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architecture = init.get("architecture")
    known = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if architecture in known:
        return f"models.{model_name}.init: transformers cannot build it ({first_line(error)})"
    match = difflib.get_close_matches(str(architecture), known, n=1)
    suggestion = f" (did you mean {match[0]}?)" if match else ""
    return (f"models.{model_name}.init.architecture: {architecture!r} is not a causal-LM "
            f"architecture of transformers {__version__}{suggestion}; known: {', '.join(known)}")


def offline_model_config(model):
    """The model's transformers config where it is known without a download, else None."""
    from transformers import AutoConfig

    try:  # as capacity planning builds it: init, a local config.json, or a known hub model
        spec = architecture_spec(model, "random")
    except ValueError:
        return None
    return AutoConfig.for_model(spec.pop("architecture"), **spec).get_text_config()


def tied_embedding_problem(target_modules, model, model_name):
    """LoRA on lm_head or embed_tokens of a model whose two share one matrix: peft then saves
    the whole matrix with the adapter, and merging the adapter (as generation does for
    quantization: none) changes the input embeddings too, so the merged model is not the one
    trained. None when neither is targeted, the weights are not tied, or that is not known."""
    targeted = [target for target in target_modules if target in EMBEDDING_TARGETS]
    if not targeted:
        return None
    config = offline_model_config(model)
    if config is None or not config.tie_word_embeddings:
        return None
    size = config.vocab_size * config.hidden_size
    return (
        f"{', '.join(targeted)}: model {model_name} ties lm_head to embed_tokens "
        f"(tie_word_embeddings), so peft saves the whole embedding matrix with the adapter, "
        f"{config.vocab_size:,} x {config.hidden_size:,} = {size:,} parameters "
        f"({megabytes(size * 2)} in bf16), and merging the adapter changes the input "
        f"embeddings too; leave lm_head and embed_tokens out of target_modules"
    )


def megabytes(size):
    return f"{size / 1e6:,.0f} MB" if size >= 1e7 else f"{size / 1e6:.2g} MB"


def check_prompt_lengths(config, source="config.yaml"):
    """Each prompt in a local model's prompt format, plus generation.max_new_tokens, fits the
    model's context. Models that are built, downloaded or run remote code have no tokenizer
    here yet; generation meets them."""
    used = {variant["model"] for variant in config["variants"].values()}
    max_new_tokens = config["generation"]["max_new_tokens"]
    for name in [name for name in config["models"] if name in used]:
        model = config["models"][name]
        if "init" in model or config["weights"] == "random" or model["trust_remote_code"]:
            continue
        if not is_local(model["path"]):
            continue
        context = context_length(model["path"])
        if not context or not prompts_may_overflow(model, config["prompts"], context - max_new_tokens):
            continue
        for index, tokens in enumerate(prompt_tokens(name, model, config["prompts"], source)):
            if tokens + max_new_tokens > context:
                raise ConfigError(
                    f"{source}: prompts[{index}]: {tokens:,} tokens in model {name}'s prompt "
                    f"format, plus generation.max_new_tokens {max_new_tokens:,}, is more than "
                    f"its context of {context:,} tokens (max_position_embeddings); shorten the "
                    "prompt or lower max_new_tokens"
                )


def context_length(path):
    """max_position_embeddings of a local model's config.json (or its text_config), or None."""
    config = json.loads((Path(path).expanduser() / "config.json").read_text())
    return config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")


def prompts_may_overflow(model, prompts, room):
    """Whether a prompt may take more than `room` tokens as a local model's generation prompt,
    told from sizes alone: loading the tokenizer takes 10 s of imports at every parse (measured
    on the 2-core CI machine), so it is loaded only when this says so. A token covers at least
    one byte, except the space sentencepiece puts before each stretch between special tokens,
    so n bytes make at most 2n + 1 tokens; and a one-message generation prompt holds the prompt
    and at most the template's text once (or the seed format's markers and bos)."""
    directory = Path(model["path"]).expanduser()
    settings_file = directory / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    template = model["prompt_format"]
    if template == "chat_template":
        jinja = directory / "chat_template.jinja"
        template = jinja.read_text() if jinja.is_file() else settings.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name", "template"}, ...]
            template = "".join(entry["template"] for entry in template)
    if template in (None, "seed"):
        bos = settings.get("bos_token") or ""
        template = (bos["content"] if isinstance(bos, dict) else bos) + SEED_SYSTEM + SEED_USER + SEED_ASSISTANT
    longest = max(len(prompt.encode()) for prompt in prompts) + len(template.encode())
    return 2 * longest + 1 > room


def prompt_tokens(name, model, prompts, source="config.yaml"):
    """How many tokens each prompt takes as a local model's generation prompt."""
    from modeling import load_tokenizer  # torch and transformers: seconds of imports

    try:
        tokenizer = load_tokenizer(model["path"])
    except LoranotesError as error:
        raise ConfigError(f"{source}: models.{name}.path: {error}") from None
    try:
        prompt_format = PromptFormat(tokenizer, model["prompt_format"])
        texts = [prompt_format.generation_prompt(prompt) for prompt in prompts]
    except LoranotesError as error:
        raise ConfigError(f"{source}: models.{name}.prompt_format: {error}") from None
    return [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
