"""Packed vs padded training steps on a CPU, for `training.packing: auto` (speedups.use_packing).

The trainer's own step (train.forward_backward and an AdamW step over the LoRA parameters) on the
embedded default's two tiny models (config.yaml; random weights: speed does not depend on them),
LoRA as config.yaml sets it, batches of the default's batch size drawn from the bundled sample's
real conversation lengths (tokenized with a tokenizer trained as build_model trains one, cut at
the default's max_length). Optionally also on the real trained stories260k Llama and real
UltraChat lengths (--fixtures ../shared/fixtures).

The same batches run both ways, packed and padded alternating step by step, so that a machine
shared with other work slows both alike; the ratio is of the two medians, from one run.

    python bench/cpu_packing.py OUT.json [--steps 30] [--threads 1] [--fixtures DIR]
"""

import argparse
import json
import os
import random
import statistics
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from machine import cpu_machine  # noqa: E402
from build_model import random_init_model, train_tokenizer  # noqa: E402
from bundled_sample import make_conversations  # noqa: E402
from chat_format import PromptFormat, tokenize_conversation  # noqa: E402
from experiment_config import resolve_config  # noqa: E402
from model_sources import architecture_spec  # noqa: E402
from batches import collate, pack  # noqa: E402
from experiment_config import TRAINING_DEFAULTS  # noqa: E402
from speedups import attach_lora  # noqa: E402
from step import Update, train_step  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402


def bundled_examples(config, model):
    """The bundled sample's conversations as (input_ids, labels) for one of the default's models,
    tokenized as the pipeline tokenizes them, with a tokenizer trained as build_model trains one."""
    dataset = config["dataset"]
    rows = make_conversations(dataset["bundled_size"], dataset["seed"], topics=dataset["bundled_topics"])
    texts = [message["content"] for row in rows for message in row["messages"]]
    tokenizer = train_tokenizer(texts, model["init"]["vocab_size"], chatml=model["init"]["architecture"] == "qwen3")
    prompt_format = PromptFormat(tokenizer, model["prompt_format"])
    max_length = config["training"]["max_length"]
    return [tokenize_conversation(prompt_format, row["messages"], max_length)[:2] for row in rows]


def bundled_lengths(config, model):
    """Token counts of the bundled sample's conversations for one of the default's models."""
    return [len(ids) for ids, _ in bundled_examples(config, model)]


def default_models(config):
    """The embedded default's models with random weights (speed does not depend on them):
    (name, its config entry, the model) for each."""
    for name, model in config["models"].items():
        spec = architecture_spec(model, config["weights"])
        yield name, model, random_init_model(AutoConfig.for_model(spec.pop("architecture"), **spec), device="cpu")


def alternating_bench_main(description, measure):
    """The command line of a bench that times two ways of a step alternating on the same padded
    batches of the bundled sample, on each of the embedded default's models:
    `measure(name, model, lora, examples, batch_size, steps)` gives a row of OUT.json."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per mode and model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (--cores 1 gives 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = resolve_config(yaml.safe_load((REPO / "config.yaml").read_text()))
    before = {**cpu_machine(args.threads), "torch": torch.__version__}
    rows = []
    for name, model, built in default_models(config):
        rows.append(measure(name, built, config["lora"], bundled_examples(config, model),
                            config["training"]["batch_size"], args.steps))
    result = {"machine": before, "load_average_after": os.getloadavg(), "steps": args.steps, "rows": rows,
              "note": "medians of steps alternating the two ways on the same padded batches, one run"}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def ultrachat_lengths(path, max_length):
    """Real UltraChat conversation lengths (characters / 4), cut at max_length."""
    lengths = []
    for text in read_conversation_texts(path):
        lengths.append(max(8, min(max_length, len(text) // 4)))
    return lengths


def read_conversation_texts(path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            messages = row.get("messages") or [{"content": turn} for turn in row.get("data", [])]
            yield "".join(message["content"] for message in messages)


def batches_of(lengths, vocab_size, batch_size, count, seed=0):
    """`count` batches of `batch_size` random-token conversations with these lengths, every
    token after the first a target."""
    rng = random.Random(seed)
    batches = []
    for _ in range(count):
        examples = []
        for length in rng.sample(lengths, batch_size):
            ids = [rng.randrange(vocab_size) for _ in range(length)]
            examples.append((ids, ids))
        batches.append(examples)
    return batches


def time_steps(model, batches, warmup=3):
    """Median seconds per step (the trainer's own timed step, step.train_step), packed and
    padded, alternating on the same batches."""
    update = Update(model, {**TRAINING_DEFAULTS, "lr": 1e-3, "steps": len(batches)})
    seconds = {"packed": [], "padded": []}
    for index, examples in enumerate(batches):
        for mode, make_batch in (("packed", pack), ("padded", collate)):
            batch = make_batch(examples, 0, torch.device("cpu"))
            result = train_step(model, [batch], update)
            if index >= warmup:
                seconds[mode].append(result.seconds)
    return {mode: statistics.median(values) for mode, values in seconds.items()}


def measure(name, model, lora, lengths, batch_size, steps):
    model = attach_lora(model, lora, gradient_checkpointing=False)
    model.train()
    vocab_size = model.config.vocab_size
    median = time_steps(model, batches_of(lengths, vocab_size, batch_size, steps + 3))
    row = {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch_size": batch_size,
        "mean_length": statistics.mean(lengths),
        "max_length": max(lengths),
        "median_s_per_step_packed": median["packed"],
        "median_s_per_step_padded": median["padded"],
        "packed_over_padded": median["packed"] / median["padded"],
    }
    print(f"{name}: packed {median['packed'] * 1000:.0f} ms/step, padded {median['padded'] * 1000:.0f} "
          f"ms/step: packed takes {row['packed_over_padded']:.2f}x as long", flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per mode and model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (--cores 1 gives 1)")
    parser.add_argument("--fixtures", type=Path, help="../shared/fixtures: stories260k and UltraChat too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = resolve_config(yaml.safe_load((REPO / "config.yaml").read_text()))
    training, lora = config["training"], config["lora"]
    before = {**cpu_machine(args.threads), "torch": torch.__version__}
    rows = []
    for name, model, built in default_models(config):
        rows.append(measure(name, built, lora, bundled_lengths(config, model), training["batch_size"], args.steps))
    if args.fixtures:
        stories = AutoModelForCausalLM.from_pretrained(args.fixtures / "stories260k", dtype=torch.float32)
        lengths = ultrachat_lengths(args.fixtures / "ultrachat_sample.jsonl", training["max_length"])
        rows.append(measure("stories260k, UltraChat lengths", stories, lora, lengths,
                            training["batch_size"], args.steps))
    result = {"machine": before, "load_average_after": os.getloadavg(), "steps": args.steps, "rows": rows,
              "note": "medians of steps alternating packed/padded on the same batches, one run"}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
