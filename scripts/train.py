"""Train one variant: LoRA on a base model (nf4 or not), loss on assistant tokens only.

Reads the tokenized splits, writes the adapter (safetensors), a per-step CSV and a metrics JSON.
A plain PyTorch loop: AdamW over the LoRA parameters, padding-free packed batches (or padded
ones), eval loss on the held-out split before and after training. The speed options (fused
kernels, how many layers to checkpoint, packed attention) are set up in `train` and live in
speedups.py.

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
from speedups import (
    apply_fused_kernels,
    attention_flops,
    bf16_matmul_tflops,
    can_fuse_loss,
    checkpoint_layers,
    compile_decoder_layers,
    decoder_layers,
    default_memory_budget_gb,
    enable_checkpointing,
    flops_per_token,
    fused_token_loss_sums,
    keep_adapter_inputs_bf16,
    lora_mixed_precision,
    packed_sequence_bounds,
    plan_activation_memory,
    plan_checkpointing,
    use_fused_kernels,
    use_packing,
    use_varlen_attention,
    varlen_attention_available,
)
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
STEP_COLUMNS = ["step", "loss", "token_accuracy", "lr", "grad_norm", "seconds", "tokens",
                "attention_flops", "peak_memory_gb"]


# Settings a run may change and still resume its checkpoint: they trade memory for speed and
# leave the computation as it was (after running out of memory, checkpoint more and rerun).
RESUMABLE_CHANGES = {"checkpoint_every", "gradient_checkpointing", "memory_budget_gb"}


class TrainingError(LoranotesError):
    """Training cannot start or go on: LoRA targets the model lacks, a loss that is not finite,
    a batch that does not fit in GPU memory."""


def out_of_memory(where, batch, training, quantization, all_checkpointed):
    """The error for a batch that does not fit, with what to change in this run's settings."""
    advice = []
    if not all_checkpointed and training["gradient_checkpointing"] is False:
        advice.append("set training.gradient_checkpointing: auto (or true)")
    elif not all_checkpointed:  # auto measured a split that did not hold
        advice.append("lower training.memory_budget_gb (does another process share the GPU?)")
    size = "training.batch_tokens" if training["batch_tokens"] else "training.batch_size"
    advice.append(f"lower {size} or training.max_length")
    if quantization == "none":
        advice.append("use quantization: nf4")
    tokens = batch["input_ids"].numel()
    return TrainingError(f"out of GPU memory {where} ({tokens} tokens in the batch): "
                         + "; or ".join(advice))


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
    (a block-diagonal causal mask); on CUDA the conversations' offsets let attention run as
    variable-length flash attention instead (speedups.varlen_attention). No compute is spent
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
        **packed_sequence_bounds([len(ids) for ids, _ in examples], device),
    }


def model_inputs(batch):
    """What the model gets from a batch made by `collate` or `pack`: everything but the labels,
    and no KV cache (training never decodes; a cache would cost memory and, for packed batches,
    hide the sequence boundaries from transformers' attention masking)."""
    return {**{key: value for key, value in batch.items() if key != "labels"}, "use_cache": False}


def batches_forever(examples, batch_size, seed, batch_tokens=None):
    """Shuffled batches, epoch after epoch; the order depends only on the seed.

    A batch is `batch_size` conversations or, with `batch_tokens`, as many as fit in that many
    tokens (see token_budget_batches). An epoch's last batch (partial with batch_size; with
    batch_tokens, always: it holds the leftovers) is dropped, unless it is the epoch's only one.
    """
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        shuffled = [examples[i] for i in order]
        if batch_tokens:
            epoch = list(token_budget_batches(shuffled, batch_tokens))
            yield from epoch[:-1] or epoch
        else:
            for start in range(0, max(len(order) - batch_size + 1, 1), batch_size):
                yield shuffled[start : start + batch_size]


def token_budget_batches(examples, batch_tokens):
    """Consecutive runs of `examples` of at most `batch_tokens` tokens each (a longer single
    conversation is a batch of its own). Packed, such a batch costs about the same every step
    however long its conversations are."""
    batch, tokens = [], 0
    for example in examples:
        if batch and tokens + len(example[0]) > batch_tokens:
            yield batch
            batch, tokens = [], 0
        batch.append(example)
        tokens += len(example[0])
    if batch:
        yield batch


def largest_batch(examples, training):
    """A batch at least as large as any of the run's: the longest conversations, as many as a
    batch holds; with batch_tokens, the longest that fit, topped up to exactly the budget with a
    cut conversation. The checkpointing policy measures this one."""
    longest_first = sorted(examples, key=lambda example: len(example[0]), reverse=True)
    budget = training["batch_tokens"]
    if not budget:
        return longest_first[: training["batch_size"]]
    batch, rest, tokens = [], [], 0
    for example in longest_first:
        if not batch or tokens + len(example[0]) <= budget:
            batch.append(example)
            tokens += len(example[0])
        else:
            rest.append(example)
    room = budget - tokens
    if room > 0 and rest:
        ids, labels = rest[0]
        batch.append((ids[:room], labels[:room]))
    return batch


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


def forward_backward(model, batch, scale=1.0, fused_loss=False):
    """Forward and backward pass of one micro-batch; gradients of its mean loss times `scale`.
    `fused_loss`: Liger's fused linear cross-entropy instead of logits (speedups.py).

    Returns (mean loss, correct predictions, target tokens, non-padding tokens).
    """
    with lora_mixed_precision(batch["input_ids"].device):
        if fused_loss:
            loss_sum, correct, targets = fused_token_loss_sums(model, model_inputs(batch), batch["labels"])
        else:
            logits = model(**model_inputs(batch)).logits
            loss_sum, correct, targets = token_loss_sums(logits, batch["labels"])
            # The autograd graph keeps what backward needs; holding the logits through backward
            # too would add their size to the peak (2.5 GB for Qwen3-4B at 4 x 1024, on an H100).
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
        # Compiled layers (training.compile) run eagerly here: a few eval batches of new shapes
        # without gradients are not worth another compilation.
        with lora_mixed_precision(device), torch.compiler.set_stance("force_eager"):
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


def attach_lora(model, lora, gradient_checkpointing):
    """LoRA adapters on the frozen model; checkpointing enabled on every decoder layer (the
    policy in `train` then keeps some layers' activations).

    Not peft's prepare_model_for_kbit_training: it casts the norms (and embeddings) of a 4-bit
    model to float32, which turns every activation after them float32 too: twice the activation
    memory and float32 attention (measured in bench/speed.py).
    """
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:
        enable_checkpointing(model)
    config = LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"], task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_for_training(model_path, quantization, lora, training, device, trust_remote_code=False):
    """The base model with the run's speed options applied and LoRA attached, in train mode.
    Returns it and which speed-ups are on."""
    model = load_base_model(model_path, quantization, device, trust_remote_code)
    # The config check knows only architectures it can build offline; this covers hub models.
    problem = target_modules_problem(lora["target_modules"], lora_layer_names_of(model), model_path)
    if problem:
        raise TrainingError(f"lora.target_modules: {problem}")
    fused = use_fused_kernels(training["fused_kernels"], model.config.model_type, device)
    # Compiled layers get their norms, RoPE and SwiGLU fused by torch.compile;
    # Liger's layer kernels are for uncompiled runs. The loss is fused either way.
    layer_kernels = fused and not training["compile"]
    if layer_kernels:
        apply_fused_kernels(model)
    varlen = training["packing"] and varlen_attention_available(device)
    if varlen:
        use_varlen_attention(model)
    model = attach_lora(model, lora, checkpointing_wanted(training, device))
    if device.type == "cuda":
        keep_adapter_inputs_bf16(model)
    compiled = training["compile"] and device.type == "cuda"
    if compiled:
        compile_decoder_layers(model)
    model.train()  # transformers 5 loads in eval mode; dropout and checkpointing need train mode
    fused_loss = fused and can_fuse_loss(model)
    if fused and not fused_loss:
        log.info("fused loss off: LoRA on lm_head needs the plain loss")
    return model, {"fused_loss": fused_loss, "fused_kernels": layer_kernels,
                   "varlen_attention": varlen, "compiled": compiled}


def checkpointing_wanted(training, device):
    """Whether any layer may be checkpointed: true, or auto on a GPU (auto checkpoints nothing
    on a CPU, where no peak memory is measured)."""
    setting = training["gradient_checkpointing"]
    return setting is True or (setting == "auto" and device.type == "cuda")


def choose_checkpointing(model, training, quantization, probe_batch, fused_loss, compiled):
    """Apply training.gradient_checkpointing. Returns how many decoder layers are checkpointed
    and which fraction of the compiled layers' activations they keep (the rest is recomputed).

    true: every layer; false: none; auto: on CUDA only as much as keeps a step of `probe_batch`
    (the run's largest) within training.memory_budget_gb (default_memory_budget_gb), measured:
    compiled layers recompute their cheapest activations first, uncompiled ones whole layers;
    on CPU none.
    """
    device = probe_batch["input_ids"].device
    layer_count = len(decoder_layers(model))
    plan = {"gradient_checkpointing_layers": 0, "activations_kept": 1.0}
    if not checkpointing_wanted(training, device):
        checkpoint_layers(model, 0)
        return plan
    if training["gradient_checkpointing"] is True:
        checkpoint_layers(model, layer_count)
        return {**plan, "gradient_checkpointing_layers": layer_count}
    budget = training["memory_budget_gb"] or default_memory_budget_gb(device)

    def step_peak_gb():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            forward_backward(model, probe_batch, fused_loss=fused_loss)
        finally:  # a probe's gradients, even half-made ones, must not reach the first step
            model.zero_grad(set_to_none=True)
        return torch.cuda.max_memory_allocated(device) / 1e9

    # The probes draw dropout masks; how many run depends on the card, the seeded run must not.
    with torch.random.fork_rng(devices=[device]):
        try:
            if compiled:
                layers, kept = plan_activation_memory(model, step_peak_gb, budget)
                return {"gradient_checkpointing_layers": layers, "activations_kept": kept}
            return {**plan, "gradient_checkpointing_layers": plan_checkpointing(model, step_peak_gb, budget)}
        except torch.cuda.OutOfMemoryError as error:
            raise out_of_memory("in a step of the run's largest batch, with every layer "
                                "checkpointed", probe_batch, training, quantization,
                                all_checkpointed=True) from error


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
        "training": {key: value for key, value in training.items() if key not in RESUMABLE_CHANGES},
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
    tokens_per_s = float(timed["tokens"].sum() / timed["seconds"].sum())
    peak_tflops = params.get("bf16_matmul_tflops")
    # steps of a checkpoint written before attention FLOPs were counted have none
    attention = timed["attention_flops"].fillna(0).sum() if "attention_flops" in timed else 0
    useful_flops = float(timed["tokens"].sum() * params["flops_per_token"] + attention)
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
        "tokens_per_s": tokens_per_s,
        # model FLOPs utilization: useful FLOPs (matmuls and attention; no recomputation) per
        # second over the card's measured bf16 rate
        "mfu": useful_flops / timed["seconds"].sum() / (peak_tflops * 1e12) if peak_tflops else None,
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
    training = {**training, "packing": use_packing(training["packing"], device, training["batch_tokens"])}
    log.info("device %s, quantization %s, model %s", device, quantization, model_path)

    # model, tokenizer (for its pad id) and data
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    pad_id = tokenizer.pad_token_id
    train_examples = read_tokenized(train_path)
    eval_examples = read_tokenized(eval_path)
    reset_peak_memory(device)
    model, speed = load_for_training(model_path, quantization, lora, training, device, trust_remote_code)
    trainable, total = model.get_nb_trainable_parameters()  # counts 4-bit weights unpacked
    log.info("LoRA r=%d on %s: %s trainable of %s parameters", lora["r"],
             ",".join(lora["target_modules"]), f"{trainable:,}", f"{total:,}")

    make_batch = pack if training["packing"] else collate
    speed.update(choose_checkpointing(
        model, training, quantization,
        make_batch(largest_batch(train_examples, training), pad_id, device), speed["fused_loss"],
        speed["compiled"],
    ))
    speed["decoder_layers"] = len(decoder_layers(model))
    # MFU's denominator, measured before training; on CPU there is no comparable matmul peak
    speed["bf16_matmul_tflops"] = bf16_matmul_tflops(device) if device.type == "cuda" else None
    log.info("speed: torch.compile %s, fused loss %s, Liger layer kernels %s, packing %s%s, "
             "gradient checkpointing on %d of %d layers, %.0f%% of activations kept",
             "on" if speed["compiled"] else "off",
             "on" if speed["fused_loss"] else "off", "on" if speed["fused_kernels"] else "off",
             "on" if training["packing"] else "off",
             " (variable-length flash attention)" if speed["varlen_attention"] else "",
             speed["gradient_checkpointing_layers"], speed["decoder_layers"],
             100 * speed["activations_kept"])

    lora_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_params, lr=training["lr"], weight_decay=training["weight_decay"])
    scheduler = make_scheduler(optimizer, training)
    batches = batches_forever(train_examples, training["batch_size"], training["seed"],
                              training["batch_tokens"])
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
        loss_sum = correct = targets = tokens = attention = 0
        for _ in range(training["grad_accum"]):
            examples = next(batches)
            batch = make_batch(examples, pad_id, device)
            attention += attention_flops(model.config, [len(ids) for ids, _ in examples])
            # Micro-batches weigh equally (each is a mean over its targets), as in HF Trainer.
            try:
                loss, batch_correct, batch_targets, batch_tokens = forward_backward(
                    model, batch, scale=1 / training["grad_accum"], fused_loss=speed["fused_loss"]
                )
            except torch.cuda.OutOfMemoryError as error:  # the last checkpoint stays valid
                raise out_of_memory(
                    f"at step {step}", batch, training, quantization,
                    speed["gradient_checkpointing_layers"] == speed["decoder_layers"],
                ) from error
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
            "attention_flops": attention,
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
        **speed,
        "flops_per_token": flops_per_token(model),
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
