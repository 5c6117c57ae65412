"""What can be known about a model before loading its weights, cheaply enough to check when the
Snakefile is parsed: whether loranotes builds it itself, the architecture it builds, whether a
local directory has weights and a tokenizer, which layers LoRA can wrap, and what a built
model's weights are.

The layer names come from building the architecture on PyTorch's `meta` device (no memory, no
weights). That needs torch and transformers, about 3 s to import, so the answer is cached per
model in ~/.cache/loranotes/ and later parses of the same config cost a file read. Hub models
loaded with real weights are not known offline; train.py checks them once the model is loaded,
with the same message.
"""

import hashlib
import json
import os
from importlib.metadata import version
from pathlib import Path

from errors import LoranotesError

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
# What AutoTokenizer builds a tokenizer from: tokenizers' file, a sentencepiece model
# (tokenizer.model, spiece.model), a BPE or WordPiece vocabulary, a tiktoken file.
TOKENIZER_PATTERNS = ("tokenizer.json", "*.model", "vocab.json", "vocab.txt", "*.tiktoken")

# What build_model writes next to a model it built: who built it and what its weights are.
BUILT_MODEL_RECORD = "loranotes_model.json"

# Public config values of the seed experiment's models, so `weights: random` needs no download.
KNOWN_ARCHITECTURES = {
    "Qwen/Qwen3-4B": {
        "architecture": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000,
        "tie_word_embeddings": True,
    },
    "meta-llama/Llama-2-7b-hf": {
        "architecture": "llama",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
}


class ModelError(LoranotesError):
    """A model that cannot be loaded, with the cause and the fix."""


def is_built(model, weights):
    """Whether loranotes builds this config model itself (into results/models/<name>) instead of
    loading it: an `init:` entry, or any model under `weights: random` (capacity planning)."""
    return "init" in model or weights == "random"


def architecture_spec(model, weights):
    """The `{architecture: ..., **config}` to build, or None when the model loads real weights.
    An `init:` entry's `pretrain:` settings are not part of the architecture (pretrain.py)."""
    if not is_built(model, weights):
        return None
    if "init" in model:
        return {key: value for key, value in model["init"].items() if key != "pretrain"}
    path = model["path"]
    if (Path(path) / "config.json").exists():
        config = json.loads((Path(path) / "config.json").read_text())
        return {"architecture": config.pop("model_type"), **config}
    if path in KNOWN_ARCHITECTURES:
        return dict(KNOWN_ARCHITECTURES[path])
    raise ModelError(
        f"weights: random needs {path}'s architecture, which is not known offline. "
        f"Known: {', '.join(KNOWN_ARCHITECTURES)}. Give the model an `init:` entry with its "
        "config values instead (architecture, hidden_size, num_hidden_layers, ...)."
    )


def model_info(path):
    """What build_model recorded about a model directory it built ({} for any other model):
    {"built_by": "loranotes", "weights": "pretrained" | "random", "pretrain": {...}, ...}."""
    record = Path(path) / BUILT_MODEL_RECORD
    return json.loads(record.read_text()) if record.is_file() else {}


def weights_phrase(info):
    """How the notes describe a model's weights, from its model_info; None for a model that
    loranotes did not build (its weights are the hub's or the local directory's)."""
    if info.get("built_by") != "loranotes":
        return None
    if info["weights"] == "random":
        return "random weights (capacity planning)"
    pretrain = info["pretrain"]
    return (f"pretrained by loranotes for {pretrain['steps']:,} steps on {pretrain['text']} "
            f"({pretrain['text_tokens']:,} tokens, {pretrain['tokens']:,} trained on; "
            f"final loss {pretrain['final_loss']:.2f})")


def is_local(path):
    """A local directory, not a hub id: an explicit path, or one that exists here."""
    path = str(path)
    return path.startswith(("/", "./", "../", "~")) or Path(path).exists()


def local_model_problem(path):
    """What is wrong with a local model directory, or None (also for hub ids)."""
    if not is_local(path):
        return None
    directory = Path(path).expanduser()
    if not directory.is_dir():
        return f"{path} does not exist (hub ids look like org/name, without a leading / or ./)"
    if not (directory / "config.json").is_file():
        return f"{path} has no config.json; point path: at a complete model directory"
    if not any(any(directory.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        return (
            f"{path} has no weights (*.safetensors or *.bin); copy the model's weight files "
            "there, or point path: at a complete model directory"
        )
    return None


def local_tokenizer_problem(path):
    """What keeps a local model directory's tokenizer from loading, or None (also for hub ids).
    Loading the model itself needs none, so this is a check of its own."""
    if not is_local(path) or not Path(path).expanduser().is_dir():
        return None
    if not any(any(Path(path).expanduser().glob(pattern)) for pattern in TOKENIZER_PATTERNS):
        return (
            f"{path} has no tokenizer files ({', '.join(TOKENIZER_PATTERNS)}); copy the model's "
            "tokenizer files there (tokenizer.json, tokenizer_config.json, ...), or point path: "
            "at a complete model directory"
        )
    return None


def lora_layer_names_of(model):
    """Names of the modules in `model` that LoRA can wrap (Linear, Embedding, Conv layers)."""
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    wrappable = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D)
    return [name for name, module in model.named_modules() if isinstance(module, wrappable)]


def unmatched_targets(target_modules, layer_names):
    """Targets that match no layer, the way peft matches a list: the name or its last parts."""
    return [
        target
        for target in target_modules
        if not any(name == target or name.endswith("." + target) for name in layer_names)
    ]


def target_modules_problem(target_modules, layer_names, model_label):
    """What is wrong with lora.target_modules for this model, or None."""
    missing = unmatched_targets(target_modules, layer_names)
    if not missing:
        return None
    available = sorted({name.rsplit(".", 1)[-1] for name in layer_names})
    verb = "is" if len(missing) == 1 else "are"
    return (
        f"{', '.join(missing)} {verb} not a layer of {model_label}; "
        f"its layers LoRA can wrap: {', '.join(available)}"
    )


def build_on_meta(model, weights):
    """The model's architecture without weights, or None when it is not known offline."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = model.get("path", "")
    if model.get("trust_remote_code"):
        return None  # its code lives on the Hub; never run it just to check a config
    spec = architecture_spec(model, weights)
    if spec is not None:
        config = AutoConfig.for_model(spec.pop("architecture"), **spec)
    elif is_local(path) and local_model_problem(path) is None:
        config = AutoConfig.from_pretrained(path)
    else:
        return None  # a hub model with real weights: train.py checks it after loading
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def cache_file():
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "loranotes" / "lora_layers.json"


def lora_layer_names(model, weights):
    """Layer names LoRA can wrap in a config's model entry, or None when unknown offline.

    Cached by the model entry, the weights setting, the local config.json and the transformers
    version: everything the answer depends on.
    """
    path = model.get("path", "")
    if not is_built(model, weights) and not is_local(path):
        return None  # a hub model with real weights: nothing to build offline
    config_json = Path(path).expanduser() / "config.json" if path else None
    key_data = {
        "model": model,
        "weights": weights,
        "config.json": config_json.read_text() if config_json and config_json.is_file() else None,
        "transformers": version("transformers"),
    }
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()
    cache = cache_file()
    try:
        cached = json.loads(cache.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return cached[key]
    meta_model = build_on_meta(model, weights)
    names = lora_layer_names_of(meta_model) if meta_model is not None else None
    try:  # write a new file and rename it: parallel parses never see a half-written cache
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps({**cached, key: names}))
        partial.replace(cache)
    except OSError:
        pass  # a read-only home only costs the 3 s again next time
    return names
