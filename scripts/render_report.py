"""Render results/report.md, the lab notes, from the run's outputs and a jinja2 template.

Numbers come from results/summary.csv (mean and spread over seeds), results/comparisons.csv
(differences with confidence intervals and their verdicts), results/sweeps.csv (each sweep's
points, ranked, and the best one's margin over the runner-up) and results/metrics.csv (one row
per run, provenance included), each printed to the precision its noise supports
(uncertainty.decimals_for). Text that comes from data or models (prompts, generations, titles in
table cells) is shown verbatim but can never break the markdown: code blocks get a fence longer
than any run of backticks inside them, table cells have their pipes, newlines and HTML escaped,
and a generation that is empty, blank or full of control characters reads as such.
"""

import html
import json
import logging
import math
import os
import re
import unicodedata
from pathlib import Path

import jinja2
import pandas as pd

from errors import configure_logging, entry_point
from uncertainty import decimals_for, fixed

# Steps left out of speed figures (train.py's choice, stated in the legend).
WARMUP_STEPS_EXCLUDED = 2

log = logging.getLogger("loranotes.report")

# A generation longer than this many lines is cut in the notes (the samples JSON has it whole).
SAMPLE_MAX_LINES = 40
# Runs of more blank lines than this are folded into one line that says how many there were.
SAMPLE_MAX_BLANK_LINES = 2


def fence(text, info="text"):
    """A fenced code block that no backtick run inside `text` can close early."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    marker = "`" * max(3, longest + 1)
    return f"{marker}{info}\n{text}\n{marker}"


def cell(value):
    """A markdown table cell: one line, no column breaks, no live HTML."""
    text = html.escape(str(value), quote=False)
    return re.sub(r"\s+", " ", text).replace("|", "\\|").strip()


def missing(value):
    """None, or NaN (how pandas reads an empty CSV cell)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def num(value, digits=4):
    """A number with a fixed number of decimals ('—' when missing); integers and large round
    numbers with thousands separators."""
    if missing(value):
        return "—"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    return f"{value:,.{digits}f}" if digits == 0 else f"{value:.{digits}f}"


def percent(value, digits=1):
    """A fraction as a percentage ("41.3%"); '—' for missing values."""
    if missing(value):
        return "—"
    return f"{100 * value:.{digits}f}%"


def places(noise, fallback):
    """Decimals for a number with this noise (uncertainty.decimals_for), or `fallback`."""
    decimals = None if missing(noise) else decimals_for(noise)
    return fallback if decimals is None else decimals


def noisy(summary, metric, fallback=4, scale=1.0, thousands=False):
    """A variant's number as the notes print it: "2.346 ± 0.025" over several seeds, "2.3462"
    for one (to the run's own standard error where known, else `fallback` decimals)."""
    mean, sd = summary.get(f"{metric}_mean"), summary.get(f"{metric}_sd")
    if missing(mean):
        return "—"
    noise = summary.get(f"{metric}_noise")
    decimals = places(None if missing(noise) else noise * scale, fallback)
    show = lambda value: fixed(value * scale, decimals, thousands=thousands)  # noqa: E731
    return show(mean) if missing(sd) else f"{show(mean)} ± {show(sd)}"


def stats_cells(summary):
    """A variant's stats-table cells, each number to its noise (see `noisy`)."""
    after = noisy(summary, "eval_loss_after")
    # Before training LoRA is a no-op: every seed evaluates the same base model, so the before
    # number has no spread of its own and is shown to the after number's precision.
    before_like = {**summary, "eval_loss_before_noise": summary.get("eval_loss_after_noise")}
    return {
        "train_loss": noisy(summary, "final_train_loss"),
        "eval_loss": f"{noisy(before_like, 'eval_loss_before').split(' ± ')[0]} → {after}",
        "eval_accuracy": noisy(summary, "eval_accuracy_after", 3),
        "s_per_step": noisy(summary, "median_s_per_step", 3),
        "tokens_per_s": noisy(summary, "tokens_per_s", 0, thousands=True),
        "mfu": "—" if missing(summary.get("mfu_mean")) else noisy(summary, "mfu", 1, scale=100) + "%",
        "peak_memory_gb": noisy(summary, "peak_memory_gb", 2),
    }


def shown_sample(text):
    """A model's generation as the notes show it: empty or blank ones say so in one line,
    control characters are escaped (\\x07, \\u200b), long runs of blank lines are folded and
    very long ones cut; everything else verbatim."""
    if not text.strip():
        return "[empty generation]" if not text else f"[blank generation: {_whitespace_counts(text)}]"
    text = "".join(_escaped(ch) if _is_control(ch) else ch for ch in text.strip("\n"))
    lines, blank, out = text.split("\n"), 0, []
    for line in lines + [None]:
        if line is not None and not line.strip():
            blank += 1
            continue
        if blank > SAMPLE_MAX_BLANK_LINES:
            out.append(f"[… {blank} blank lines …]")
        else:
            out += [""] * blank
        blank = 0
        if line is not None:
            out.append(line)
    if len(out) > SAMPLE_MAX_LINES:
        out = out[:SAMPLE_MAX_LINES] + [f"[… {len(out) - SAMPLE_MAX_LINES} more lines, see the samples JSON …]"]
    return "\n".join(out)


WHITESPACE_NAMES = {" ": "space", "\n": "newline", "\t": "tab", "\r": "carriage return"}


def _whitespace_counts(text):
    """ "48 newlines", "2 spaces, 1 newline": what a blank generation consisted of."""
    counts = {}
    for ch in text:
        name = WHITESPACE_NAMES.get(ch, _escaped(ch))
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{n} {name}{'s' if n > 1 and name in WHITESPACE_NAMES.values() else ''}"
                     for name, n in counts.items())


def _is_control(ch):
    """Characters that would not show, or would move the cursor: control and format characters
    other than newline and tab."""
    return ch not in "\n\t" and unicodedata.category(ch) in {"Cc", "Cf", "Zl", "Zp"}


def _escaped(text):
    return "".join(ch if ch == " " else ch.encode("unicode_escape").decode("ascii") for ch in text)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _records(frame):
    return [{key: (None if missing(value) else value) for key, value in row.items()}
            for row in frame.to_dict("records")]


def provenance(runs):
    """What produced the numbers, and which runs differ from the others in code or packages."""
    code_keys = ["provenance.git_commit", "provenance.git_dirty", "provenance.code_sha256"]
    package_keys = sorted(key for key in runs[0] if key.startswith("provenance.packages."))
    def label(run):
        return f"{run['variant']} seed {run['seed']}"
    def groups(keys):
        found = {}
        for run in runs:
            found.setdefault(tuple(run.get(key) for key in keys), []).append(label(run))
        return found
    code, packages = groups(code_keys), groups(package_keys)
    return {
        "code": [dict(zip(["commit", "dirty", "sha256"], key), runs=names) for key, names in code.items()],
        "packages": [dict(versions={k.removeprefix("provenance.packages."): v for k, v in zip(package_keys, key)},
                          runs=names) for key, names in packages.items()],
        "devices": sorted({f"{run.get('provenance.device')}" + (
            f" × {int(run['devices'])}" if (run.get("devices") or 1) > 1 else "") + (
            f" (CUDA {run['provenance.cuda']}, driver {run['provenance.driver']})"
            if run.get("provenance.cuda") else "") for run in runs}),
        "config_files": sorted({(f["path"], f["sha256"]) for run in runs
                                for f in json.loads(run.get("provenance.config_files") or "[]")}),
        "commands": sorted({run.get("provenance.command") for run in runs if run.get("provenance.command")}),
        "started": [min(r["provenance.started_utc"] for r in runs if r.get("provenance.started_utc")),
                    max(r["provenance.started_utc"] for r in runs if r.get("provenance.started_utc"))]
                   if any(r.get("provenance.started_utc") for r in runs) else None,
        "differs": len(code) > 1 or len(packages) > 1,
    }


def data_summary(data_stats, token_stats, variants):
    """What the data step read and what each tokenization kept, for the notes' data lines."""
    tokenized = {}
    for variant in variants:
        key = (variant["model"], token_stats[variant["name"]]["max_length"])
        tokenized.setdefault(key, {"stats": token_stats[variant["name"]], "variants": []})
        tokenized[key]["variants"].append(variant["name"])
    return {"read": data_stats, "tokenized": list(tokenized.values())}


def _vs_parent(verdicts, name, parent):
    """The eval-loss comparison of a variant with its parent, its difference as the verdict
    prints it (signed), or None."""
    for row in verdicts:
        if (row["a"], row["b"], row["metric"]) == (name, parent, "eval_loss_after"):
            decimals = None if missing(row.get("decimals")) else int(row["decimals"])
            shown = fixed(row["difference"], decimals)
            return {**row, "shown_difference": shown if shown.startswith("-") else f"+{shown}"}
    return None


def sweep_sections(config, sweeps, plots, report_dir):
    """Per sweep (config order): its keys, its points in grid order, each with its settings and
    eval loss as the notes print them (`noisy`), the best point (rank 1, with its margin over
    the runner-up and the verdict) and the plot's path relative to the report."""
    rows = _records(sweeps) if sweeps is not None else []
    sections = []
    for (name, sweep), plot in zip(config.get("sweeps", {}).items(), plots, strict=True):
        points = []
        for point, row in zip(sweep["points"], [r for r in rows if r["sweep"] == name], strict=True):
            points.append({**row, "settings": point["settings"],
                           "rank": None if missing(row.get("rank")) else int(row["rank"]),
                           "eval_loss": noisy(row, "eval_loss_after")})
        best = next((p for p in points if p.get("rank") == 1), None)
        if best and not missing(best.get("margin")):
            decimals = None if missing(best.get("decimals")) else int(best["decimals"])
            best["shown_margin"] = fixed(best["margin"], decimals)
        sections.append({"name": name, "from": sweep["from"], "swept_keys": sweep["keys"],
                         "points": points, "best": best,
                         "plot": os.path.relpath(plot, report_dir)})
    return sections


def render_report(template_path, config, summary, comparisons, runs, data_stats, token_stats,
                  samples_before, samples_after, plots, report_path, sweeps=None, sweep_plots=()):
    """Return the report's markdown.

    summary, comparisons, runs, sweeps: the DataFrames of summary.csv, comparisons.csv,
    metrics.csv, sweeps.csv; token_stats: {variant: tokenize stats}; samples_before/after:
    {variant: generate.py output}; plots: [(title, png path)]; sweep_plots: a png per sweep.
    """
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(template_path).parent)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(fence=fence, cell=cell, num=num, percent=percent, sample=shown_sample)
    env.tests["missing"] = missing
    env.globals.update(zip=zip, warmup_steps=WARMUP_STEPS_EXCLUDED)
    report_dir = Path(report_path).parent
    summaries = {row["variant"]: row for row in _records(summary)}
    run_rows = _records(runs)
    verdicts = _records(comparisons)
    variants = []
    for name, variant in config["variants"].items():
        mine = [run for run in run_rows if run["variant"] == name]
        variants.append({
            **variant,
            "summary": summaries[name],
            "cells": stats_cells(summaries[name]),
            "runs": mine,
            "first": mine[0],
            "random_init": any(bool(run.get("random_init")) for run in mine),
            "tokens": token_stats[name],
            "before": samples_before[name],
            "after": samples_after[name],
            "vs_parent": _vs_parent(verdicts, name, variant["parent"]),
        })
    return env.get_template(Path(template_path).name).render(
        config=config,
        variants=variants,
        comparisons=verdicts,
        data=data_summary(data_stats, token_stats, config["variants"].values()),
        any_random_init=any(v["random_init"] for v in variants),
        any_single_seed=any(v["summary"]["n_seeds"] == 1 for v in variants),
        provenance=provenance(run_rows),
        plots=[(title, os.path.relpath(path, report_dir)) for title, path in plots],
        sweeps=sweep_sections(config, sweeps, sweep_plots, report_dir),
    )


def named_list(files):
    """A named input of several files as a list (Snakemake gives one file as a string)."""
    return [files] if isinstance(files, str) else list(files or [])


@entry_point
def main(snakemake):
    configure_logging(snakemake)
    config = snakemake.params.config
    names = list(config["variants"])
    text = render_report(
        template_path=snakemake.input.template,
        config=config,
        summary=pd.read_csv(snakemake.input.summary),
        comparisons=pd.read_csv(snakemake.input.comparisons),
        runs=pd.read_csv(snakemake.input.metrics),
        data_stats=read_json(snakemake.input.data_stats),
        token_stats=dict(zip(names, map(read_json, snakemake.input.token_stats))),
        samples_before=dict(zip(names, map(read_json, snakemake.input.before))),
        samples_after=dict(zip(names, map(read_json, snakemake.input.after))),
        plots=list(zip(snakemake.params.plot_titles, snakemake.input.plots)),
        report_path=snakemake.output[0],
        sweeps=pd.read_csv(snakemake.input.sweeps) if snakemake.input.get("sweeps") else None,
        sweep_plots=named_list(snakemake.input.get("sweep_plots")),
    )
    Path(snakemake.output[0]).write_text(text, encoding="utf-8")
    log.info("wrote %s", snakemake.output[0])


if __name__ == "__main__":
    main(snakemake)  # noqa: F821  (injected by Snakemake's script directive)
