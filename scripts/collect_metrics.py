"""Collect every run's metrics.json into results/metrics.csv: one row per (variant, seed), in
config order, with the run's settings first and its provenance flattened into
`provenance.<key>` columns. Every key a run wrote becomes a column: nothing is dropped."""

import json
import logging

import pandas as pd

from errors import configure_logging, entry_point
from run_metrics import METRIC_KEYS

log = logging.getLogger("loranotes.collect_metrics")

SETTING_COLUMNS = ["variant", "seed", "title", "model", "quantization", "lora_r", "lora_targets"]


def flatten(metrics):
    """metrics.json as one CSV row: nested records (provenance) become prefixed columns."""
    row = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            for inner, inner_value in flatten(value).items():
                row[f"{key}.{inner}"] = inner_value
        elif isinstance(value, list):
            row[key] = json.dumps(value)
        else:
            row[key] = value
    return row


def collect(runs, metrics_paths):
    """runs: [{"variant": resolved variant, "seed": N}] in config order; metrics_paths: their
    metrics.json files, in the same order.

    Columns: the run's settings, then METRIC_KEYS in order (a key a file lacks, from an older
    train.py, is empty), then every other key a file has (nested records flattened as
    `provenance.<key>`, keys written by other code): nothing is dropped."""
    rows = []
    for run, path in zip(runs, metrics_paths, strict=True):
        variant = run["variant"]
        with open(path, encoding="utf-8") as f:
            metrics = json.load(f)
        rows.append({
            "variant": variant["name"],
            "seed": run["seed"],
            "title": variant["title"],
            "model": variant["model"],
            "quantization": variant["quantization"],
            "lora_r": variant["lora"]["r"],
            "lora_targets": ",".join(variant["lora"]["target_modules"]),
            **flatten(metrics),
        })
    written = list(dict.fromkeys(key for row in rows for key in row))
    columns = list(SETTING_COLUMNS)
    for key in METRIC_KEYS:  # a record (provenance) in place of its key, as flattened
        columns += [column for column in written if column.startswith(f"{key}.")] or [key]
    columns += [column for column in written if column not in columns]
    return pd.DataFrame(rows, columns=columns)


@entry_point
def main(snakemake):
    configure_logging(snakemake)
    frame = collect(snakemake.params.runs, snakemake.input.metrics)
    frame.to_csv(snakemake.output[0], index=False)
    log.info("%d runs of %d variants -> %s", len(frame), frame["variant"].nunique(), snakemake.output[0])


if __name__ == "__main__":
    main(snakemake)  # noqa: F821  (injected by Snakemake's script directive)
