"""Train one variant: LoRA on a base model (nf4 or not), loss on assistant tokens only.

Reads the tokenized splits, writes the adapter (safetensors), a per-step CSV and a metrics JSON.
A plain PyTorch loop: AdamW over the LoRA parameters, padded batches (or padding-free packed
ones), optional gradient checkpointing; eval loss is measured on the held-out split before and
after training.

Every `checkpoint_every` steps the run's whole state (LoRA weights, optimizer, scheduler, RNG,
the per-step records) goes to results/checkpoints/<variant>/step-N; a rerun after a crash or
`kill -9` resumes from the latest one and ends exactly where an uninterrupted run would.
"""

import contextlib
import hashlib
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
from safetensors.torch import load_file, save_file

from chat_format import IGNORE_INDEX
from errors import LoranotesError, configure_logging, entry_point
from model_sources import lora_layer_names_of, target_modules_problem
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


class TrainingError(LoranotesError):
    """Training cannot start or go on: LoRA targets the model lacks, a loss that is not finite."""


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


def pack(examples, pad_id, device):
    """A batch as one padding-free row: the conversations back to back, positions restarting at 0
    for each. transformers sees the restarts in position_ids and keeps the conversations apart
    (a block-diagonal causal mask, or variable-length flash attention), so no compute is spent
    on padding. `pad_id` is unused; it keeps the signature of `collate`.
    """
    input_ids, labels, position_ids = [], [], []
    for ids, labs in examples:
        input_ids += ids
        # Nothing may learn to predict a conversation's first token from the previous one.
        labels += [IGNORE_INDEX] + labs[1:]
        position_ids += range(len(ids))
    return {
        "input_ids": torch.tensor([input_ids], device=device),
        "labels": torch.tensor([labels], device=device),
        "position_ids": torch.tensor([position_ids], device=device),
    }


def model_inputs(batch):
    """What the model gets from a batch made by `collate` or `pack`: everything but the labels,
    and no KV cache (training never decodes; a cache would cost memory and, for packed batches,
    hide the sequence boundaries from transformers' attention masking)."""
    return {**{key: value for key, value in batch.items() if key != "labels"}, "use_cache": False}


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
    """Summed next-token cross-entropy, correct predictions and target count on labelled tokens.

    The labels are shifted, not the logits: slicing the logits would copy the largest tensor of
    the step (batch x length x vocabulary, 2.5 GB for Qwen3 at 4 x 1024) once more.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # position t predicts token t+1
    logits = logits.float()
    mask = targets != IGNORE_INDEX
    loss_sum = F.cross_entropy(
        logits.view(-1, logits.size(-1)), targets.view(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    correct = ((logits.argmax(-1) == targets) & mask).sum()
    return loss_sum, correct, mask.sum()


def forward_backward(model, batch, scale=1.0):
    """Forward and backward pass of one micro-batch; gradients of its mean loss times `scale`.

    Returns (mean loss, correct predictions, target tokens, non-padding tokens).
    """
    logits = model(**model_inputs(batch)).logits
    loss_sum, correct, targets = token_loss_sums(logits, batch["labels"])
    # The autograd graph keeps what backward needs; holding the logits through backward too would
    # add their size to the peak (2.5 GB for Qwen3-4B at 4 x 1024, measured on an H100).
    del logits
    (loss_sum / targets * scale).backward()
    tokens = batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
    return loss_sum.item() / targets.item(), correct.item(), targets.item(), int(tokens)


@torch.no_grad()
def evaluate(model, examples, batch_size, pad_id, device):
    """Token-weighted mean loss and accuracy over assistant tokens of the eval split."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id, device)
        logits = model(**model_inputs(batch)).logits
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


def run_fingerprint(model_path, quantization, training, lora, data_paths):
    """A hash of everything that shapes the run: a checkpoint with another one is not resumed."""
    model_dir = Path(model_path)
    settings = {
        "model_path": str(model_path),
        # A rebuilt or replaced local model has new weight files: its old checkpoints are stale.
        "model_files": [
            (file.name, file.stat().st_size, file.stat().st_mtime_ns)
            for file in sorted(model_dir.glob("*.safetensors"))
        ],
        "quantization": quantization,
        "training": {key: value for key, value in training.items() if key != "checkpoint_every"},
        "lora": lora,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in data_paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def save_checkpoint(checkpoint_dir, model, optimizer, scheduler, progress):
    """Write step-N into a .partial directory, rename it when complete, drop older ones."""
    checkpoint_dir = Path(checkpoint_dir)
    final = checkpoint_dir / f"step-{progress['step']}"
    partial = checkpoint_dir / f"step-{progress['step']}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    trainable = {
        name: param.detach().cpu().contiguous()
        for name, param in model.named_parameters() if param.requires_grad
    }
    save_file(trainable, partial / "adapter.safetensors")
    rng = {
        "torch": torch.get_rng_state(),  # dropout masks
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng},
        partial / "optimizer.pt",
    )
    (partial / "progress.json").write_text(json.dumps(progress))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    for older in checkpoint_dir.glob("step-*"):
        if older != final:
            shutil.rmtree(older)


def latest_checkpoint(checkpoint_dir, fingerprint):
    """(path, progress) of the newest complete checkpoint of this very run, or None.

    Checkpoints of other settings or data are deleted: resuming them would mix two runs.
    """
    checkpoint_dir = Path(checkpoint_dir)
    complete = sorted(checkpoint_dir.glob("step-*[0-9]"), key=lambda path: int(path.name[5:]))
    if not complete:
        return None
    latest = complete[-1]
    try:
        progress = json.loads((latest / "progress.json").read_text())
    except (OSError, ValueError):
        progress = {}
    if progress.get("fingerprint") != fingerprint:
        log.info("ignoring %s: made with other settings or data; starting over", latest)
        shutil.rmtree(checkpoint_dir)
        return None
    return latest, progress


def restore_checkpoint(path, model, optimizer, scheduler):
    trainable = load_file(path / "adapter.safetensors")
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.data.copy_(trainable[name])
    state = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


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
          trust_remote_code=False, checkpoint_dir=None):
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
    # The config check knows only architectures it can build offline; this covers hub models.
    problem = target_modules_problem(lora["target_modules"], lora_layer_names_of(model), model_path)
    if problem:
        raise TrainingError(f"lora.target_modules: {problem}")
    model = attach_lora(model, lora, quantization == "nf4", training["gradient_checkpointing"])
    model.train()  # transformers 5 loads in eval mode; dropout and checkpointing need train mode
    trainable, total = model.get_nb_trainable_parameters()  # counts 4-bit weights unpacked
    log.info("LoRA r=%d on %s: %s trainable of %s parameters", lora["r"],
             ",".join(lora["target_modules"]), f"{trainable:,}", f"{total:,}")

    lora_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_params, lr=training["lr"], weight_decay=training["weight_decay"])
    scheduler = make_scheduler(optimizer, training)
    batches = batches_forever(train_examples, training["batch_size"], training["seed"])
    make_batch = pack if training["packing"] else collate
    fingerprint = run_fingerprint(model_path, quantization, training, lora, [train_path, eval_path])
    checkpoint = latest_checkpoint(checkpoint_dir, fingerprint) if checkpoint_dir else None
    if checkpoint:
        path, progress = checkpoint
        restore_checkpoint(path, model, optimizer, scheduler)
        steps, eval_before = progress["steps"], progress["eval_before"]
        for _ in range(len(steps) * training["grad_accum"]):  # replay the data order up to here
            next(batches)
        log.info("resuming from %s: %d of %d steps done", path, len(steps), training["steps"])
    else:
        steps = []
        eval_before = evaluate(model, eval_examples, training["eval_batch_size"], pad_id, device)
        log.info("eval loss before training: %.4f", eval_before[0])

    # Peak memory is the training steps' (model, optimizer, activations); the eval passes, whose
    # full-vocabulary logits of a larger batch can spike higher, are left out.
    reset_peak_memory(device)
    for step in range(len(steps) + 1, training["steps"] + 1):
        started = time.perf_counter()
        loss_sum = correct = targets = tokens = 0
        for _ in range(training["grad_accum"]):
            batch = make_batch(next(batches), pad_id, device)
            # Micro-batches weigh equally (each is a mean over its targets), as in HF Trainer.
            loss, batch_correct, batch_targets, batch_tokens = forward_backward(
                model, batch, scale=1 / training["grad_accum"]
            )
            loss_sum += loss / training["grad_accum"]
            correct += batch_correct
            targets += batch_targets
            tokens += batch_tokens
        if not math.isfinite(loss_sum):  # before the update, so the last checkpoint stays sound
            raise TrainingError(
                f"loss is {loss_sum} at step {step}; training stopped there. Lower training.lr "
                f"(now {training['lr']}), add training.warmup_steps, or check the data"
            )
        grad_norm = torch.nn.utils.clip_grad_norm_(lora_params, training["max_grad_norm"])
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the step's kernels must finish before we time it
        seconds = time.perf_counter() - started
        steps.append({
            "step": step, "loss": loss_sum, "token_accuracy": correct / targets, "lr": lr,
            "grad_norm": float(grad_norm), "seconds": seconds, "tokens": tokens,
            "peak_memory_gb": peak_memory(device)["peak_memory_gb"],
        })
        if step == 1 or step % 10 == 0 or step == training["steps"]:
            log.info("step %d/%d  loss %.4f  acc %.3f  lr %.2e  %.2fs", step, training["steps"],
                     loss_sum, correct / targets, lr, seconds)
        every = training.get("checkpoint_every", 0)
        if checkpoint_dir and every and (step % every == 0 or step == training["steps"]):
            save_checkpoint(checkpoint_dir, model, optimizer, scheduler,
                            {"fingerprint": fingerprint, "step": step, "steps": steps,
                             "eval_before": eval_before})

    train_memory = peak_memory(device)
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
    metrics = summarize(steps, eval_before, eval_after, train_memory, params)
    # metrics.json comes last and whole (written, then renamed): it exists only for a finished run.
    partial_metrics = out_dir / "metrics.json.partial"
    partial_metrics.write_text(json.dumps(metrics, indent=2) + "\n")
    partial_metrics.rename(out_dir / "metrics.json")
    if checkpoint_dir:  # the outputs hold everything now
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # results/checkpoints/ too, once no variant uses it
            Path(checkpoint_dir).parent.rmdir()
    return metrics


@entry_point
def main(snakemake):
    configure_logging(snakemake)
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
        checkpoint_dir=snakemake.params.checkpoints,
    )


if __name__ == "__main__":
    main(snakemake)  # noqa: F821  (injected by Snakemake's script directive)
