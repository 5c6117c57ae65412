"""Build a model from an architecture config, plus a tokenizer for it, and pretrain it briefly
when its config asks for that.

Three uses:
- the embedded default's tiny models (`models.<name>.init: {architecture: qwen3, ...,
  pretrain: {steps: 300}}`): built, then pretrained for a few seconds on the bundled knowledge
  table written out as plain text (pretrain.py), so that the whole pipeline runs offline on a
  CPU and fine-tuning starts from a model that knows some language;
- an `init:` entry without `pretrain:`: the architecture with random weights;
- capacity planning (`weights: random`): every model, a hub model such as Qwen/Qwen3-4B too, is
  rebuilt from its architecture config with random weights (and never pretrained), so s/step and
  memory can be measured before anyone downloads 8 GB of weights.

The tokenizer is a byte-level BPE trained with `tokenizers` on the bundled conversations (and the
pretraining text). A Qwen-style model gets a ChatML chat template; a Llama-style one gets none,
like the base Llama-2 checkpoints, so the pipeline falls back to the seed prompt format for it.
Next to the weights goes loranotes_model.json, what the model is (model_sources.model_info).
"""

import json
import logging
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from bundled_sample import load_knowledge, select_topics
from errors import configure_logging, entry_point
from outputs import with_umask
from model_sources import BUILT_MODEL_RECORD, architecture_spec
from modeling import load_tokenizer
from pretrain import knowledge_documents, pretrain, pretrain_settings

log = logging.getLogger("loranotes.build_model")

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


def random_init_model(config, seed=0, device=None):
    """The architecture of `config` with random weights (seeded). On a GPU machine it is built on
    the GPU in bf16, unless `device` says otherwise: a 7B model takes seconds there instead of
    minutes on the CPU, and half the disk. On the CPU, float32 as training will use."""
    torch.manual_seed(seed)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def build_model(spec, texts, out_dir, seed=0, tokenizer=None, pretraining=None):
    """Write a model (safetensors), its tokenizer and loranotes_model.json; return the record.

    `tokenizer` is the model's own when one is at hand (a local model directory); otherwise one
    is trained on `texts`. `pretraining` is `{"settings": ..., "documents": [...]}` (pretrain.py)
    or None: random weights.
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
    if pretraining is None:
        model = random_init_model(config, seed)
        weights = {"weights": "random", "random_init": True}
    else:
        # On the CPU in float32 wherever it runs, so the weights do not depend on the machine.
        model = random_init_model(config, pretraining["settings"]["seed"], device="cpu")
        details = pretrain(model, tokenizer, pretraining["documents"], pretraining["settings"])
        weights = {"weights": "pretrained", "random_init": False, "pretrain": details}
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    info = {"built_by": "loranotes", "architecture": architecture, "parameters": n_params, **weights}
    (out_dir / BUILT_MODEL_RECORD).write_text(json.dumps(info, indent=2) + "\n")
    with_umask(out_dir)  # safetensors writes 0600
    log.info("built %s (%s weights): %s parameters, vocab %d (tokenizer %d)", architecture,
             info["weights"], f"{n_params:,}", config.vocab_size, len(tokenizer))
    return info


@entry_point
def main(snakemake):
    configure_logging(snakemake)
    torch.set_num_threads(snakemake.threads)  # pretraining itself runs on one (pretrain.py)
    model = snakemake.params.model
    spec = architecture_spec(model, snakemake.params.weights)
    settings = pretrain_settings(model, snakemake.params.weights)
    texts = list(read_texts(snakemake.input.conversations))
    pretraining = None
    if settings:
        knowledge = load_knowledge(snakemake.input.knowledge)
        knowledge = {**knowledge, "topics": select_topics(knowledge, snakemake.params.topics)}
        documents = knowledge_documents(knowledge, settings["copies"], settings["seed"])
        pretraining = {"settings": settings, "documents": documents}
        texts += documents
    tokenizer = None
    if "path" in model and (Path(model["path"]) / "tokenizer_config.json").exists():
        tokenizer = load_tokenizer(model["path"], model["trust_remote_code"])
    build_model(spec, texts, snakemake.output.model_dir, tokenizer=tokenizer, pretraining=pretraining)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821  (injected by Snakemake's script directive)
