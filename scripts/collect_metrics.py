"""Collect every variant's metrics.json into results/metrics.csv, one row per variant."""

import json

import pandas as pd

from run_metrics import METRIC_KEYS

SETTING_COLUMNS = ["variant", "title", "model", "quantization", "lora_r", "lora_targets"]
COLUMNS = SETTING_COLUMNS + METRIC_KEYS


def collect(variants, metrics_paths):
    """variants: resolved variant dicts in config order; metrics_paths: their metrics.json.

    A key that a metrics.json has and METRIC_KEYS does not (one written by other code) is kept,
    in a column after the known ones; a known key a file lacks (an older train.py) is empty."""
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
    unknown = list(dict.fromkeys(key for row in rows for key in row if key not in COLUMNS))
    return pd.DataFrame(rows, columns=COLUMNS + unknown)


def main(snakemake):
    frame = collect(snakemake.params.variants, snakemake.input.metrics)
    frame.to_csv(snakemake.output[0], index=False)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821  (injected by Snakemake's script directive)
