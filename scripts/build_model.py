"""Build a model with random weights from an architecture config, plus a tokenizer for it.

Two uses:
- the embedded default's tiny models (`models.<name>.init: {architecture: qwen3, ...}`), so the
  whole pipeline runs offline on a CPU;
- capacity planning (`weights: random`): a hub model such as Qwen/Qwen3-4B is rebuilt from its
  real architecture config with random weights, so s/step and memory can be measured before
  anyone downloads 8 GB of weights.

The tokenizer is a byte-level BPE trained on the bundled conversations with `tokenizers`. A
Qwen-style model gets a ChatML chat template; a Llama-style one gets none, like the base
Llama-2 checkpoints, so the pipeline falls back to the seed prompt format for it.
"""

import json
import logging
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from errors import configure_logging, entry_point

log = logging.getLogger("loranotes.build_model")

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

# ChatML, as Qwen models use it (without Qwen3's tool and thinking extras).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_FAMILIES = {"qwen2", "qwen3", "qwen3_moe"}
# A trained tokenizer never needs more pieces than this for the bundled sample; a larger model
# vocabulary (151936 for Qwen3) keeps its size, the extra rows are just never used.
MAX_TRAINED_VOCAB = 8192


def architecture_spec(model, weights):
    """The `{architecture: ..., **config}` to build, or None when the model loads real weights."""
    if "init" in model:
        return dict(model["init"])
    if weights != "random":
        return None
    path = model["path"]
    if (Path(path) / "config.json").exists():
        config = json.loads((Path(path) / "config.json").read_text())
        return {"architecture": config.pop("model_type"), **config}
    if path in KNOWN_ARCHITECTURES:
        return dict(KNOWN_ARCHITECTURES[path])
    raise ValueError(
        f"weights: random needs {path}'s architecture, which is not known offline. "
        f"Known: {', '.join(KNOWN_ARCHITECTURES)}. Give the model an `init:` entry with its "
        "config values instead (architecture, hidden_size, num_hidden_layers, ...)."
    )


def read_texts(jsonl_path):
    """Every message of every conversation in an ultrachat_200k-schema JSONL file."""
    with open(jsonl_path, encoding="utf-8") as f:
        for line in f:
            for message in json.loads(line)["messages"]:
                yield message["content"]


def train_tokenizer(texts, vocab_size, chatml):
    if chatml:
        special = {"pad": "<|endoftext|>", "eos": "<|im_end|>"}
        special_tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    else:
        special = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "</s>"}
        special_tokens = ["<unk>", "<s>", "</s>"]
    tokenizer = Tokenizer(models.BPE(unk_token=special.get("unk")))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, MAX_TRAINED_VOCAB),
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        **{f"{kind}_token": token for kind, token in special.items()},
    )
    if chatml:
        wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


def random_init_model(config, seed=0):
    """The architecture of `config` with random weights (seeded)."""
    torch.manual_seed(seed)
    # On a GPU machine, initialise on the GPU in bf16: a 7B model takes seconds there instead
    # of minutes on the CPU, and half the disk. On a CPU, float32 as training will use.
    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def build_model(spec, texts, out_dir, seed=0, tokenizer=None):
    """Write a random-init model (safetensors), its tokenizer and loranotes_model.json.

    `tokenizer` is the model's own when one is at hand (a local model directory); otherwise one
    is trained on `texts`.
    """
    spec = dict(spec)
    architecture = spec.pop("architecture")
    config = AutoConfig.for_model(architecture, **spec)
    if tokenizer is None:
        tokenizer = train_tokenizer(texts, config.vocab_size, chatml=architecture in CHATML_FAMILIES)
    # The config's vocabulary must cover every token id; a real config's larger one is kept.
    config.vocab_size = max(config.vocab_size, len(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    model = random_init_model(config, seed)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    info = {"random_init": True, "architecture": architecture, "parameters": n_params}
    (out_dir / "loranotes_model.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info(
        "built random-init %s: %s parameters, vocab %d (tokenizer %d)",
        architecture, f"{n_params:,}", config.vocab_size, len(tokenizer),
    )
    return info


@entry_point
def main(snakemake):
    configure_logging(snakemake)
    model = snakemake.params.model
    spec = architecture_spec(model, snakemake.params.weights)
    tokenizer = None
    if "path" in model and (Path(model["path"]) / "tokenizer_config.json").exists():
        from modeling import load_tokenizer

        tokenizer = load_tokenizer(model["path"], model["trust_remote_code"])
    build_model(spec, read_texts(snakemake.input.texts), snakemake.output.model_dir, tokenizer=tokenizer)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821  (injected by Snakemake's script directive)
