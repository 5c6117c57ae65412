"""Train one variant: LoRA on a base model (nf4 or not), loss on assistant tokens only.

Reads the tokenized splits, writes the adapter (safetensors), a per-step CSV and a metrics JSON.
A plain PyTorch loop: AdamW over the LoRA parameters, padded batches, optional gradient
checkpointing; eval loss is measured on the held-out split before and after training.
"""

import json
import logging
import math
import random
import shutil
import statistics
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from chat_format import IGNORE_INDEX
from modeling import (
    load_base_model,
    load_tokenizer,
    model_info,
    peak_memory,
    pick_device,
    reset_peak_memory,
)

log = logging.getLogger("loranotes.train")

# Steps left out of speed figures: the first ones pay for allocation and kernel selection.
WARMUP_STEPS_EXCLUDED = 2
STEP_COLUMNS = ["step", "loss", "token_accuracy", "lr", "grad_norm", "seconds", "tokens", "peak_memory_gb"]


def read_tokenized(path):
    frame = pd.read_parquet(path)
    return [(list(ids), list(labels)) for ids, labels in zip(frame["input_ids"], frame["labels"])]


def collate(examples, pad_id, device):
    """Right-pad a list of (input_ids, labels) into a batch on `device`."""
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return {
        "input_ids": input_ids.to(device),
        "labels": labels.to(device),
        "attention_mask": attention_mask.to(device),
    }


def batches_forever(examples, batch_size, seed):
    """Shuffled batches, epoch after epoch; the order depends only on the seed."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        # Drop the last partial batch, unless the whole split is smaller than one batch.
        for start in range(0, max(len(order) - batch_size + 1, 1), batch_size):
            yield [examples[i] for i in order[start : start + batch_size]]


def token_loss_sums(logits, labels):
    """Summed next-token cross-entropy, correct predictions and target count on labelled tokens."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    correct = ((logits.argmax(-1) == targets) & mask).sum()
    return loss_sum, correct, mask.sum()


@torch.no_grad()
def evaluate(model, examples, batch_size, pad_id, device):
    """Token-weighted mean loss and accuracy over assistant tokens of the eval split."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        batch_loss, batch_correct, batch_count = token_loss_sums(logits, batch["labels"])
        loss_sum += batch_loss.item()
        correct += batch_correct.item()
        count += batch_count.item()
    model.train(was_training)
    return loss_sum / count, correct / count


def make_scheduler(optimizer, training):
    from transformers import get_scheduler

    return get_scheduler(
        training["lr_scheduler"], optimizer,
        num_warmup_steps=training["warmup_steps"], num_training_steps=training["steps"],
    )


def attach_lora(model, lora, quantized, gradient_checkpointing):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    config = LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"], task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def summarize(steps, eval_before, eval_after, device_metrics, params):
    """The numbers the stats table shows, from the per-step records."""
    frame = pd.DataFrame(steps)
    tail = frame.tail(max(1, math.ceil(len(frame) * 0.1)))  # last 10% of steps
    timed = frame.iloc[WARMUP_STEPS_EXCLUDED:] if len(frame) > WARMUP_STEPS_EXCLUDED else frame
    return {
        "steps": len(frame),
        "final_train_loss": float(tail["loss"].mean()),
        "last_step_loss": float(frame["loss"].iloc[-1]),
        "token_accuracy": float(tail["token_accuracy"].mean()),
        "eval_loss_before": eval_before[0],
        "eval_loss_after": eval_after[0],
        "eval_accuracy_before": eval_before[1],
        "eval_accuracy_after": eval_after[1],
        "median_s_per_step": float(statistics.median(timed["seconds"])),
        "tokens_per_s": float(timed["tokens"].sum() / timed["seconds"].sum()),
        "train_seconds": float(frame["seconds"].sum()),
        "train_tokens": int(frame["tokens"].sum()),
        **device_metrics,
        **params,
    }


def train(model_path, quantization, train_path, eval_path, training, lora, out_dir,
          trust_remote_code=False):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    random.seed(training["seed"])
    torch.manual_seed(training["seed"])
    device = pick_device(training["device"])
    log.info("device %s, quantization %s, model %s", device, quantization, model_path)

    # model, tokenizer (for its pad id) and data
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    pad_id = tokenizer.pad_token_id
    train_examples = read_tokenized(train_path)
    eval_examples = read_tokenized(eval_path)
    reset_peak_memory(device)
    model = load_base_model(model_path, quantization, device, trust_remote_code)
    model = attach_lora(model, lora, quantization == "nf4", training["gradient_checkpointing"])
    model.train()  # transformers 5 loads in eval mode; dropout and checkpointing need train mode
    trainable, total = model.get_nb_trainable_parameters()  # counts 4-bit weights unpacked
    log.info("LoRA r=%d on %s: %s trainable of %s parameters", lora["r"],
             ",".join(lora["target_modules"]), f"{trainable:,}", f"{total:,}")

    eval_before = evaluate(model, eval_examples, training["eval_batch_size"], pad_id, device)
    log.info("eval loss before training: %.4f", eval_before[0])

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=training["lr"], weight_decay=training["weight_decay"],
    )
    scheduler = make_scheduler(optimizer, training)
    batches = batches_forever(train_examples, training["batch_size"], training["seed"])
    steps = []
    for step in range(1, training["steps"] + 1):
        started = time.perf_counter()
        loss_sum = correct = targets = tokens = 0
        for _ in range(training["grad_accum"]):
            batch = collate(next(batches), pad_id, device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            batch_loss, batch_correct, batch_targets = token_loss_sums(logits, batch["labels"])
            # Mean over this micro-batch's targets; micro-batches weigh equally, as in HF Trainer.
            (batch_loss / batch_targets / training["grad_accum"]).backward()
            loss_sum += batch_loss.item() / batch_targets.item() / training["grad_accum"]
            correct += batch_correct.item()
            targets += batch_targets.item()
            tokens += batch["attention_mask"].sum().item()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], training["max_grad_norm"]
        )
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the step's kernels must finish before we time it
        seconds = time.perf_counter() - started
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"loss is {loss_sum} at step {step}; lower training.lr")
        steps.append({
            "step": step, "loss": loss_sum, "token_accuracy": correct / targets, "lr": lr,
            "grad_norm": float(grad_norm), "seconds": seconds, "tokens": tokens,
            "peak_memory_gb": peak_memory(device)["peak_memory_gb"],
        })
        if step == 1 or step % 10 == 0 or step == training["steps"]:
            log.info("step %d/%d  loss %.4f  acc %.3f  lr %.2e  %.2fs", step, training["steps"],
                     loss_sum, correct / targets, lr, seconds)

    eval_after = evaluate(model, eval_examples, training["eval_batch_size"], pad_id, device)
    log.info("eval loss after training: %.4f (before %.4f)", eval_after[0], eval_before[0])

    # Write the adapter next to its final place and rename, so a crash never leaves a
    # half-written adapter that looks complete.
    adapter_dir = out_dir / "adapter"
    partial_dir = out_dir / "adapter.partial"
    shutil.rmtree(partial_dir, ignore_errors=True)
    model.save_pretrained(partial_dir, safe_serialization=True)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    partial_dir.rename(adapter_dir)

    pd.DataFrame(steps, columns=STEP_COLUMNS).to_csv(out_dir / "train_log.csv", index=False)
    params = {
        "trainable_params": trainable,
        "total_params": total,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "random_init": bool(model_info(model_path).get("random_init")),
    }
    metrics = summarize(steps, eval_before, eval_after, peak_memory(device), params)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(snakemake):
    logging.basicConfig(filename=snakemake.log[0], level=logging.INFO, format="%(message)s")
    torch.set_num_threads(snakemake.threads)
    variant = snakemake.params.variant
    train(
        model_path=snakemake.params.model_path,
        quantization=variant["quantization"],
        train_path=snakemake.input.train,
        eval_path=snakemake.input.eval,
        training=variant["training"],
        lora=variant["lora"],
        out_dir=Path(snakemake.output.metrics).parent,
        trust_remote_code=snakemake.params.trust_remote_code,
    )


if __name__ == "__main__":
    main(snakemake)  # noqa: F821  (injected by Snakemake's script directive)
