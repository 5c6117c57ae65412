"""Render results/report.md, the lab notes, from the run's outputs and a jinja2 template.

Text that comes from data or models (prompts, generations, titles in table cells) is shown
verbatim but can never break the markdown: code blocks get a fence longer than any run of
backticks inside them, table cells have their pipes, newlines and HTML escaped.
"""

import html
import json
import math
import os
import re
from pathlib import Path

import jinja2
import pandas as pd


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
    """None, or NaN (how pandas reads an empty metrics.csv cell)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def num(value, digits=4):
    """A number as the report prints it; '—' for missing values."""
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


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def render_report(template_path, config, metrics, data_stats, token_stats, samples_before,
                  samples_after, plots, report_path):
    """Return the report's markdown.

    metrics: DataFrame from collect_metrics; token_stats: {variant: tokenize stats};
    samples_before/after: {variant: generate.py output}; plots: [(title, png path)].
    """
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(template_path).parent)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(fence=fence, cell=cell, num=num, percent=percent)
    env.tests["missing"] = missing
    report_dir = Path(report_path).parent
    rows = {row["variant"]: row for row in metrics.to_dict("records")}
    variants = [
        {
            **variant,
            "metrics": rows[name],
            "tokens": token_stats[name],
            "before": samples_before[name],
            "after": samples_after[name],
        }
        for name, variant in config["variants"].items()
    ]
    env.globals["zip"] = zip
    return env.get_template(Path(template_path).name).render(
        config=config,
        variants=variants,
        data=data_stats,
        any_random_init=any(bool(v["metrics"]["random_init"]) for v in variants),
        plots=[(title, os.path.relpath(path, report_dir)) for title, path in plots],
    )


def main(snakemake):
    config = snakemake.params.config
    names = list(config["variants"])
    text = render_report(
        template_path=snakemake.input.template,
        config=config,
        metrics=pd.read_csv(snakemake.input.metrics),
        data_stats=read_json(snakemake.input.data_stats),
        token_stats=dict(zip(names, map(read_json, snakemake.input.token_stats))),
        samples_before=dict(zip(names, map(read_json, snakemake.input.before))),
        samples_after=dict(zip(names, map(read_json, snakemake.input.after))),
        plots=list(zip(snakemake.params.plot_titles, snakemake.input.plots)),
        report_path=snakemake.output[0],
    )
    Path(snakemake.output[0]).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main(snakemake)  # noqa: F821  (injected by Snakemake's script directive)
