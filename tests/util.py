"""Test helpers: a stand-in for the `snakemake` object scripts receive, fake run outputs, the
loss mask's labelled runs, and readers for the report's markdown (parsed with markdown-it-py,
as a renderer would, not with regexes)."""

import math
import re
from types import SimpleNamespace

from markdown_it import MarkdownIt

from chat_format import IGNORE_INDEX
from uncertainty import decimals_for

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Named(list):
    """Like snakemake's input/output/params: a list whose items can also be read by name."""

    def __init__(self, **named):
        super().__init__(named.values())
        self.__dict__.update(named)

    def get(self, key, default=None):
        return self.__dict__.get(key, default)


def fake_snakemake(input=None, output=None, params=None, log=None, threads=1):
    """The object Snakemake's script directive injects as `snakemake`, for calling main()."""
    return SimpleNamespace(
        input=Named(**(input or {})),
        output=Named(**(output or {})),
        params=Named(**(params or {})),
        log=Named(**(log or {})),
        threads=threads,
    )


def fake_metrics(index, seed=0, **overrides):
    """What train.py writes to metrics.json, with values distinct per variant (index) and,
    a little, per seed."""
    jitter = seed / 1000
    return {
        "steps": 10 + index,
        "final_train_loss": 2.5 - index / 7 + jitter,
        "final_train_loss_se": 0.01,
        "last_step_loss": 2.4 - index / 9,
        "token_accuracy": 0.3 + index / 11,
        "eval_loss_before": 3.0 + index / 13,
        "eval_loss_after": 2.0 + index / 17 + (3 + index) * jitter,
        "eval_loss_after_se": 0.02,
        "eval_accuracy_before": 0.1,
        "eval_accuracy_after": 0.2 + index / 50 - jitter,
        "eval_conversations": 5,
        "eval_target_tokens": 400,
        "train_conversations": 20,
        "train_examples_seen": 48,
        "median_s_per_step": 0.25 * (index + 1) + jitter,
        "median_s_per_step_se": 0.001,
        "tokens_per_s": 1234.5 * (index + 1),
        "train_seconds": 3.75 * (index + 1),
        "train_tokens": 5000,
        "peak_memory_gb": 1.5 + index,
        "peak_reserved_gb": None if index == 0 else 2.0 + index,
        "memory_kind": "CPU peak RSS",
        "trainable_params": 1000 * (index + 1),
        "total_params": 100000,
        "device": "cpu",
        "random_init": index % 2 == 0,
        "base_weights": ("random weights (capacity planning)"
                         if overrides.get("random_init", index % 2 == 0) else None),
        "mfu": None if index == 0 else 0.2 + index / 19,
        "bf16_matmul_tflops": None if index == 0 else 700.0 + index,
        "flops_per_token": 4.0 * 100000,
        "gradient_checkpointing_layers": index,
        "decoder_layers": 4,
        "activations_kept": 1.0 if index == 0 else 0.35,
        "packed": True,
        "compiled": index == 1,
        "fused_loss": index == 1,
        "target_logits": index == 0,
        "fused_kernels": False,
        "varlen_attention": False,
        "provenance": {
            "git_commit": "0123456789abcdef0123456789abcdef01234567", "git_dirty": False,
            "code_sha256": "c0de" * 16,
            "config_files": [{"path": "/work/exp/config.yaml", "sha256": "cf" * 32}],
            "settings": {"model": "tiny", "quantization": "nf4", "training": {"seed": seed}},
            "packages": {"python": "3.11.7", "torch": "2.13.0", "transformers": "5.24.0"},
            "device": "x86_64", "cuda": None, "driver": None, "host": "node1",
            "started_utc": f"2026-12-01T10:0{index}:0{seed}+00:00",
            "command": "snakemake --cores 1 results/report.md",
        },
        **overrides,
    }


def labelled_runs(input_ids, labels):
    """Contiguous runs of labelled token ids."""
    runs, current = [], []
    for token, label in zip(input_ids, labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token, "a label must be its own input token"
            current.append(token)
    return runs + [current] if current else runs


def parse_markdown(text):
    return MarkdownIt("commonmark").enable("table").parse(text)


def fence_contents(text):
    """The content of every fenced code block, as a markdown renderer sees it."""
    return [token.content for token in parse_markdown(text) if token.type == "fence"]


def images(text):
    """(alt text, src) of every image in the document."""
    found = []
    for token in parse_markdown(text):
        for child in token.children or []:
            if child.type == "image":
                found.append((child.content, child.attrs["src"]))
    return found


def tables(text):
    """Every table as a list of rows (header first), each a list of cell texts."""
    result, rows, row = [], None, None
    for token in parse_markdown(text):
        if token.type == "table_open":
            rows = []
        elif token.type == "tr_open":
            row = []
        elif token.type == "inline" and row is not None:
            row.append(token.content)
        elif token.type == "tr_close":
            rows.append(row)
            row = None
        elif token.type == "table_close":
            result.append(rows)
    return result


def stats_table(report_text):
    """The report's stats table as [{column header: cell text}], one per variant row."""
    (header, *rows), = [t for t in tables(report_text) if t[0][0] == "Variant"]
    return [dict(zip(header, row)) for row in rows]


def shown_number(text):
    """A number as the report prints it ("2,432", "7.5264", "41.3%" for 0.413) and how far
    rounding can move it."""
    text = text.strip()
    scale = 0.01 if text.endswith("%") else 1.0
    text = text.removesuffix("%")
    decimals = len(text.split(".")[1]) if "." in text else 0
    return scale * float(text.replace(",", "")), scale * 0.5 * 10.0**-decimals * (1 + 1e-9)


def assert_shown(text, expected, what, unit=None):
    """`text` shows `expected`, to its decimals or, for numbers rounded to tens or more
    ("3,300"), to `unit` (the rounding step)."""
    if text.strip() == "—":
        assert expected is None or math.isnan(expected), f"{what}: '—' shown for {expected}"
        return
    value, tolerance = shown_number(text)
    if unit is not None and unit > 1:
        tolerance = 0.5 * unit * (1 + 1e-9)
    assert abs(value - float(expected)) <= tolerance, f"{what}: report shows {text}, CSV has {expected}"


# Stats table column -> summary.csv metric, for the cells that hold one number (± spread).
NUMBER_COLUMNS = {
    "Train loss": "final_train_loss",
    "Held-out acc.": "eval_accuracy_after",
    "s/step": "median_s_per_step",
    "Tokens/s": "tokens_per_s",
    "MFU": "mfu",
}


def decimals(text):
    return len(text.split(".")[1]) if "." in text else 0


def assert_noisy_shown(text, summary, metric, what):
    """A cell "mean ± sd" (several seeds) or "mean" (one) shows summary.csv's numbers, with
    the sd printed to the same decimals as the mean."""
    mean, sd = summary[f"{metric}_mean"], summary[f"{metric}_sd"]
    scale = 100 if text.strip().endswith("%") else 1
    text = text.strip().removesuffix("%")
    noise = summary.get(f"{metric}_noise")
    places = decimals_for(noise * scale) if noise is not None and not math.isnan(noise) else None
    unit = 10.0 ** -places if places is not None and places < 0 else None
    if summary["n_seeds"] > 1:
        shown_mean, shown_sd = text.split(" ± ")
        assert decimals(shown_mean) == decimals(shown_sd), f"{what}: {text}"
        # the spread to 1-2 significant digits, and the mean to the same decimal place
        digits = shown_sd.replace(".", "").lstrip("0") if "." in shown_sd else shown_sd.strip("0")
        assert len(digits) <= 2, f"{what}: {text}"
        assert_shown(shown_sd, sd * scale, f"{what} sd", unit)
    else:
        assert " ± " not in text, f"{what}: a spread shown for one seed: {text}"
        shown_mean = text
    assert_shown(shown_mean, None if mean is None or (isinstance(mean, float) and math.isnan(mean))
                 else mean * scale, f"{what} mean", unit)


def assert_stats_table_matches(report_text, summary, runs):
    """The stats table has one row per summary.csv row, in order, showing its means and spreads;
    the model, quantization and memory kind are the runs' (metrics.csv)."""
    table = stats_table(report_text)
    summaries = summary.to_dict("records")
    assert [row["Variant"] for row in table] == [r["variant"] for r in summaries]
    for row, record in zip(table, summaries):
        name = record["variant"]
        first = runs[runs["variant"] == name].iloc[0]
        random_init = bool(runs[runs["variant"] == name]["random_init"].any())
        assert row["Model"] == first["model"] + (" (random-init)" if random_init else ""), name
        assert row["Quantization"] == first["quantization"], name
        assert row["Seeds"] == str(record["n_seeds"]), name
        for column, metric in NUMBER_COLUMNS.items():
            if row[column] == "—":
                assert math.isnan(record[f"{metric}_mean"]), (name, column)
                continue
            assert_noisy_shown(row[column].replace(",", ""), record, metric, f"{name} {column}")
        before, after = row["Eval loss before → after"].split(" → ")
        assert_shown(before, record["eval_loss_before_mean"], f"{name} eval loss before")
        assert_noisy_shown(after, record, "eval_loss_after", f"{name} eval loss after")
        memory, kind = re.fullmatch(r"(.+) \((.+)\)", row["Peak memory (GB)"]).groups()
        assert_noisy_shown(memory, record, "peak_memory_gb", f"{name} peak memory")
        assert kind == first["memory_kind"], name
