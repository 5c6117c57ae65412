"""The whole workflow on the embedded default config (tiny random-init models, offline, CPU):
the files it promises, and lab notes that agree with them."""

import base64
import json
import math

import pandas as pd
import pytest
import yaml

import render_report
from conftest import run_snakemake
from util import PNG_MAGIC, assert_stats_table_matches, fence_contents, images, stats_table
from experiment_config import resolve_config
from run_metrics import STEP_COLUMNS


@pytest.fixture(scope="module")
def config(default_run):
    return resolve_config(yaml.safe_load((default_run / "config.yaml").read_text()))


@pytest.fixture(scope="module")
def results(default_run):
    return default_run / "results"


@pytest.fixture(scope="module")
def metrics(results):
    return pd.read_csv(results / "metrics.csv")


@pytest.fixture(scope="module")
def summary(results):
    return pd.read_csv(results / "summary.csv")


def runs(config):
    return [(name, seed) for name, v in config["variants"].items() for seed in v["seeds"]]


@pytest.fixture(scope="module")
def report(results):
    return (results / "report.md").read_text(encoding="utf-8")


def test_metrics_csv_has_each_runs_metrics_in_config_order(config, results, metrics):
    assert len(runs(config)) == 9  # the default: 3 variants x 3 seeds
    assert list(zip(metrics["variant"], metrics["seed"])) == runs(config)
    for row in metrics.to_dict("records"):
        path = results / "variants" / row["variant"] / f"seed-{row['seed']}" / "metrics.json"
        shared = {k: v for k, v in json.loads(path.read_text()).items() if k in row}
        assert {"eval_loss_before", "eval_loss_after", "final_train_loss"} <= set(shared)
        for key, value in shared.items():
            if value is None:
                assert math.isnan(row[key]), (row["variant"], key)
            else:
                expected = pytest.approx(value, rel=1e-12) if isinstance(value, float) else value
                assert row[key] == expected, (row["variant"], key)


def test_report_table_shows_the_summary_of_the_seeds(report, summary, metrics):
    assert_stats_table_matches(report, summary, metrics)
    assert all(" ± " in row["Eval loss before → after"] for row in stats_table(report))


def test_report_concludes_every_comparison_with_an_interval(config, results, report):
    comparisons = pd.read_csv(results / "comparisons.csv")
    pairs = {("v2", "v1"), ("v3", "v1")}  # the configured comparisons, also each one's parent
    assert set(zip(comparisons["a"], comparisons["b"])) == pairs
    assert (comparisons["test"] == "paired t-test").all() and comparisons["ci_low"].notna().all()
    for line in comparisons["verdict"]:
        assert line in report


def test_report_records_provenance(metrics, report):
    assert metrics["provenance.packages.torch"].notna().all()
    assert metrics["provenance.command"].str.contains("snakemake").all()
    assert metrics["provenance.config_files"].str.contains("config.yaml").all()
    provenance = report.split("\n## Provenance\n")[1]
    assert "not a git checkout" in provenance  # the test's copy of the workflow has no .git
    assert f"torch {metrics['provenance.packages.torch'][0]}" in provenance


def test_fine_tuning_lowers_eval_loss_for_every_variant(metrics):
    for row in metrics.to_dict("records"):
        assert row["eval_loss_after"] < row["eval_loss_before"], row["variant"]


def test_every_comparison_is_plotted_and_linked(config, results, report):
    names = ["all_variants", *(c["name"] for c in config["comparisons"])]
    for name in names:
        assert (results / "plots" / f"{name}.png").read_bytes().startswith(PNG_MAGIC), name
    linked = [src for _, src in images(report)]
    assert linked == [f"plots/{name}.png" for name in names]


def test_before_samples_are_shared_per_model_and_quantization(config, results, report):
    bases = {f"{v['model']}__{v['quantization']}.json" for v in config["variants"].values()}
    assert {p.name for p in (results / "samples" / "before").iterdir()} == bases
    # Each variant's section shows its base's "before" and its own "after" completions.
    fences = fence_contents(report)
    for name, variant in config["variants"].items():
        base = results / "samples" / "before" / f"{variant['model']}__{variant['quantization']}.json"
        after = results / "variants" / name / f"seed-{variant['seeds'][0]}" / "samples_after.json"
        for path in (base, after):
            completions = [s["completion"] for s in json.loads(path.read_text())["samples"]]
            assert len(completions) == len(config["prompts"])
            for completion in completions:
                assert render_report.shown_sample(completion) + "\n" in fences, (name, path.name)


def test_each_run_saves_its_adapter_and_step_log(config, results):
    for name, seed in runs(config):
        variant = config["variants"][name]
        directory = results / "variants" / name / f"seed-{seed}"
        assert (directory / "adapter" / "adapter_model.safetensors").stat().st_size > 0
        adapter_config = json.loads((directory / "adapter" / "adapter_config.json").read_text())
        assert adapter_config["r"] == variant["lora"]["r"]
        steps = pd.read_csv(directory / "train_log.csv")
        assert list(steps.columns) == STEP_COLUMNS
        total, every = variant["training"]["steps"], variant["training"]["eval_every"]
        assert list(steps["step"]) == list(range(1, total + 1))
        evaluated = [step for step in steps["step"] if step % every == 0 or step == total]
        eval_columns = ["eval_loss", "eval_accuracy"]
        assert steps.drop(columns=eval_columns).notna().all().all()
        for column in eval_columns:  # filled at the eval steps only
            assert list(steps.dropna(subset=[column])["step"]) == evaluated
        assert (steps["loss"] > 0).all() and (steps["tokens"] > 0).all()


def test_data_is_tokenized_once_per_model(config, results):
    shared = {f"{v['model']}-L{v['training']['max_length']}" for v in config["variants"].values()}
    assert len(shared) == 2 < len(config["variants"])
    assert {p.name for p in (results / "tokenized").iterdir()} == shared
    assert len(list((results / "logs" / "tokenize").iterdir())) == len(shared)


def test_report_says_which_prompt_format_each_variant_used(config, results, report):
    for name, variant in config["variants"].items():
        tokenized = f"{variant['model']}-L{variant['training']['max_length']}"
        stats = json.loads((results / "tokenized" / tokenized / "stats.json").read_text())
        assert stats["train"]["assistant_tokens"] > 0
        heading = f"\n## {name}: {variant['title']}\n"
        assert f"(prompt format: {stats['prompt_format']});" in report.split(heading)[1].split("\n## ")[0]
    # tiny-llama has no chat template (like Llama-2 base): the seed format stands in.
    stats = json.loads((results / "tokenized" / "tiny-llama-L256" / "stats.json").read_text())
    assert stats["prompt_format"] == "seed format (fallback: the tokenizer has no chat template)"


def test_a_finished_run_has_nothing_left_to_do(default_run):
    result = run_snakemake(default_run, "-n", "results/report.md")
    assert "Nothing to be done" in result.stdout + result.stderr


def test_snakemakes_html_report_holds_the_plots_and_the_notes(default_run, config):
    run_snakemake(default_run, "--report", "results/report.html")
    html = (default_run / "results" / "report.html").read_text(encoding="utf-8")
    for name in ["all_variants", *(c["name"] for c in config["comparisons"])]:
        png = (default_run / "results" / "plots" / f"{name}.png").read_bytes()
        assert base64.b64encode(png).decode() in html, f"{name}.png is not embedded"
    for path in ("report.md", "metrics.csv", "summary.csv", "comparisons.csv"):
        assert base64.b64encode((default_run / "results" / path).read_bytes()).decode() in html, path
    assert "train loss per step (mean over seeds, band: their range)" in html  # a caption
