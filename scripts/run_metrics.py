"""What a run records: one row per step (train_log.csv) and its summary (metrics.json), with
the one list of each that everything else reads (collect_metrics.py builds metrics.csv from
METRIC_KEYS); and the FLOP counts behind MFU. torch is imported where it is used: the metrics
rules read this module's lists without it.
"""

import json
import math
import statistics
import time
from pathlib import Path

import pandas as pd

# Steps left out of speed figures: the first ones pay for allocation and kernel selection.
WARMUP_STEPS_EXCLUDED = 2

STEP_COLUMNS = ["step", "loss", "token_accuracy", "lr", "grad_norm", "seconds", "tokens",
                "conversations", "attention_flops", "peak_memory_gb", "eval_loss", "eval_accuracy"]

# metrics.json's keys, in the order metrics.csv lists them (after the variant's settings). A
# data-parallel run's tokens and tokens/s are those of all its ranks, its peak memory the
# largest rank's, `devices` the number of ranks (training.devices).
METRIC_KEYS = [
    "steps", "final_train_loss", "final_train_loss_se", "last_step_loss",
    "eval_loss_before", "eval_loss_after", "eval_loss_after_se",
    "eval_accuracy_before", "eval_accuracy_after", "eval_conversations", "eval_target_tokens",
    "token_accuracy", "train_conversations", "train_examples_seen", "train_seconds",
    "train_tokens", "median_s_per_step", "median_s_per_step_se", "tokens_per_s", "peak_memory_gb", "peak_reserved_gb",
    "memory_kind", "trainable_params", "total_params", "device", "devices", "random_init", "base_weights", "mfu",
    "bf16_matmul_tflops", "flops_per_token", "gradient_checkpointing_layers", "decoder_layers",
    "activations_kept", "layer_inputs_offloaded", "packed", "compiled", "fused_loss", "target_logits",
    "fused_kernels", "varlen_attention",
    "provenance",  # provenance.run_provenance: code, packages, config, hardware, command
]


def step_record(step, result, conversations, attention_flops, peak_memory_gb):
    """One train_log.csv row but its eval columns: a step.StepResult and what the trainer
    measured around it (`conversations`: in the step's micro-batches)."""
    return {
        "step": step, "loss": result.loss, "token_accuracy": result.token_accuracy,
        "lr": result.lr, "grad_norm": result.grad_norm, "seconds": result.seconds,
        "tokens": result.tokens, "conversations": conversations,
        "attention_flops": attention_flops, "peak_memory_gb": peak_memory_gb,
    }


def write_train_log(steps, evaluations, path):
    """train_log.csv: a row per step, with the loss and accuracy of the evaluations made after
    a step (`evaluations`: dicts with their step, as the trainer keeps them) in its eval columns."""
    unknown = {key for record in steps for key in record} - set(STEP_COLUMNS)
    if unknown:
        raise ValueError(f"step records hold {sorted(unknown)}, not in run_metrics.STEP_COLUMNS")
    frame = pd.DataFrame(steps, columns=STEP_COLUMNS).set_index("step")
    for evaluation in evaluations:
        if evaluation["step"] in frame.index:
            frame.loc[evaluation["step"], ["eval_loss", "eval_accuracy"]] = (
                evaluation["loss"], evaluation["accuracy"])
    frame.reset_index().to_csv(path, index=False)


def summarize(steps, evaluations, device_metrics, params):
    """The numbers the stats table shows, from the per-step records and the evaluations (the
    first before training, the last after it)."""
    frame = pd.DataFrame(steps)
    tail = frame.tail(max(1, math.ceil(len(frame) * 0.1)))  # last 10% of steps
    before, after = evaluations[0], evaluations[-1]
    return {
        "steps": len(frame),
        "final_train_loss": float(tail["loss"].mean()),
        "final_train_loss_se": standard_error_of_mean(tail["loss"]),
        "last_step_loss": float(frame["loss"].iloc[-1]),
        "token_accuracy": float(tail["token_accuracy"].mean()),
        "eval_loss_before": before["loss"],
        "eval_loss_after": after["loss"],
        "eval_loss_after_se": after["loss_se"],
        "eval_accuracy_before": before["accuracy"],
        "eval_accuracy_after": after["accuracy"],
        "eval_conversations": after["conversations"],
        "eval_target_tokens": after["target_tokens"],
        # with grad_accum, each micro-batch's conversations
        "train_examples_seen": int(frame["conversations"].sum()),
        "train_seconds": float(frame["seconds"].sum()),
        "train_tokens": int(frame["tokens"].sum()),
        **speed_summary(frame, params),
        **device_metrics,
        **params,
    }


def speed_summary(frame, params):
    """s/step, tokens/s and MFU over the steps after the first WARMUP_STEPS_EXCLUDED."""
    timed = frame.iloc[WARMUP_STEPS_EXCLUDED:] if len(frame) > WARMUP_STEPS_EXCLUDED else frame
    peak_tflops = params.get("bf16_matmul_tflops")
    # steps of a checkpoint written before attention FLOPs were counted have none
    attention = timed["attention_flops"].fillna(0).sum() if "attention_flops" in timed else 0
    useful_flops = float(timed["tokens"].sum() * params["flops_per_token"] + attention)
    return {
        "median_s_per_step": float(statistics.median(timed["seconds"])),
        # the median's standard error for normally spread step times: sqrt(pi / 2) x the mean's
        "median_s_per_step_se": (None if len(timed) < 2 else
                                 math.sqrt(math.pi / 2) * standard_error_of_mean(timed["seconds"])),
        "tokens_per_s": float(timed["tokens"].sum() / timed["seconds"].sum()),
        # model FLOPs utilization: useful FLOPs (matmuls and attention; no recomputation) per
        # second over the card's measured bf16 rate, times the cards of a data-parallel run
        "mfu": (useful_flops / timed["seconds"].sum() / (peak_tflops * 1e12 * params.get("devices", 1))
                if peak_tflops else None),
    }


# --- uncertainty ---------------------------------------------------------------------------------

def standard_error_of_mean(values):
    """The standard deviation of `values` over the square root of their count; None for fewer
    than 2 (no spread to measure)."""
    values = list(values)
    if len(values) < 2:
        return None
    return statistics.stdev(values) / math.sqrt(len(values))


def ratio_standard_error(sums, counts):
    """The standard error of a token-weighted mean loss, sum(sums) / sum(counts), across units
    (conversations) with loss sum s_i over c_i tokens: the ratio estimator's (delta method)
    sqrt(sum_i (s_i - m c_i)^2 / (n (n - 1))) / mean(c), over the n units with a token. None
    for fewer than 2 such units."""
    pairs = [(s, c) for s, c in zip(sums, counts) if c > 0]
    n = len(pairs)
    if n < 2:
        return None
    mean = sum(s for s, _ in pairs) / sum(c for _, c in pairs)
    spread = sum((s - mean * c) ** 2 for s, c in pairs) / (n * (n - 1))
    return math.sqrt(spread) / (sum(c for _, c in pairs) / n)


def write_metrics(metrics, path):
    """metrics.json with exactly METRIC_KEYS, in their order, written whole (to a temporary
    name, then renamed): it exists only for a finished run."""
    missing, unknown = set(METRIC_KEYS) - set(metrics), set(metrics) - set(METRIC_KEYS)
    if missing or unknown:
        raise ValueError(f"metrics: missing {sorted(missing)}, not in run_metrics.METRIC_KEYS "
                         f"{sorted(unknown)}")
    partial = Path(f"{path}.partial")
    partial.write_text(json.dumps({key: metrics[key] for key in METRIC_KEYS}, indent=2) + "\n")
    partial.rename(path)


# --- MFU -----------------------------------------------------------------------------------------

def flops_per_token(model):
    """4 x the parameters of the model's matmuls (lm_head included, embeddings and LoRA not):
    2N forward and 2N for the input gradients in backward. Frozen weights get no weight
    gradient, recomputation is not useful work; attention is counted by attention_flops."""
    import torch

    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in name:
            total += module.in_features * module.out_features  # 4-bit weights are packed
    return 4 * total


def attention_flops(config, lengths):
    """Causal attention's FLOPs, forward and backward, for sequences of `lengths` tokens (not in
    flops_per_token: they grow with the length). Per layer and sequence of L tokens, with
    d = heads x head dim: Q K^T and P V take L^2 d each over the causal half, backward twice
    the forward, so 6 L^2 d. Recomputation inside the kernel is not counted."""
    width = config.num_attention_heads * (getattr(config, "head_dim", None)
                                          or config.hidden_size // config.num_attention_heads)
    return 6 * config.num_hidden_layers * width * sum(length * length for length in lengths)


def bf16_matmul_tflops(device, size=8192, repeats=10):
    """The card's bf16 matmul rate, measured: the denominator of MFU."""
    import torch

    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12
