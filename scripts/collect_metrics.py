"""Collect every variant's metrics.json into results/metrics.csv, one row per variant."""

import json

import pandas as pd

COLUMNS = [
    "variant", "title", "model", "quantization", "lora_r", "lora_targets", "steps",
    "final_train_loss", "last_step_loss", "eval_loss_before", "eval_loss_after",
    "token_accuracy", "train_seconds", "median_s_per_step", "tokens_per_s", "peak_memory_gb",
    "peak_reserved_gb", "memory_kind", "trainable_params", "total_params", "device",
    "random_init", "mfu", "bf16_matmul_tflops", "gradient_checkpointing_layers", "decoder_layers",
    "activations_kept", "compiled", "fused_loss", "fused_kernels", "varlen_attention",
]


def collect(variants, metrics_paths):
    """variants: resolved variant dicts in config order; metrics_paths: their metrics.json."""
    rows = []
    for variant, path in zip(variants, metrics_paths):
        with open(path) as f:
            metrics = json.load(f)
        rows.append({
            "variant": variant["name"],
            "title": variant["title"],
            "model": variant["model"],
            "quantization": variant["quantization"],
            "lora_r": variant["lora"]["r"],
            "lora_targets": ",".join(variant["lora"]["target_modules"]),
            **metrics,
        })
    return pd.DataFrame(rows, columns=COLUMNS)


def main(snakemake):
    frame = collect(snakemake.params.variants, snakemake.input.metrics)
    frame.to_csv(snakemake.output[0], index=False)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821  (injected by Snakemake's script directive)
