"""Sweeps: a grid of settings expanded into ordinary variants named after their settings, checked
like any other config; ranked in results/sweeps.csv with the best point's margin over the
runner-up tested exactly like the other comparisons; shown in the notes' Sweeps section."""

import copy

import pandas as pd
import pytest
import yaml

import collect_metrics
import compare_variants
import plot_sweep
import render_report
from conftest import REPO, copy_workflow, run_snakemake
from experiment_config import ConfigError, resolve_config, sweep_variant_name, validate_config
from test_report import DATA_STATS, PROMPTS, TOKEN_STATS, samples, write_json
from uncertainty import compare, verdict
from util import PNG_MAGIC, fake_metrics, fake_snakemake, images, tables

GRID = {"lora.r": [1, 4, 16], "training.lr": [1.0e-4, 3.0e-4]}


def config_with_sweep(grid=GRID, **sweep):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["sweeps"] = {"rank_lr": {"from": "v1", "grid": grid, **sweep}}
    return config


def validated(config):
    validate_config(config, REPO / "schemas" / "config.schema.yaml", "exp.yaml")
    return resolve_config(config, "exp.yaml")


def test_a_grid_expands_into_ordinary_variants_named_after_their_settings():
    config = validated(config_with_sweep())
    names = ["v1-r1-lr1e-4", "v1-r1-lr3e-4", "v1-r4-lr1e-4", "v1-r4-lr3e-4", "v1-r16-lr1e-4",
             "v1-r16-lr3e-4"]
    assert list(config["variants"]) == ["v1", "v2", "v3", *names]  # after the declared ones
    point = config["variants"]["v1-r4-lr3e-4"]
    v1 = config["variants"]["v1"]
    assert point["parent"] == "v1" and point["seeds"] == v1["seeds"] == [0, 1, 2]
    assert point["lora"] == {**v1["lora"], "r": 4}
    assert point["training"] == {**v1["training"], "lr": 3.0e-4}
    assert (point["model"], point["quantization"]) == (v1["model"], v1["quantization"])
    assert {c["key"]: c["to"] for c in point["changes"]} == {"lora.r": 4, "training.lr": 3.0e-4}
    assert config["sweeps"]["rank_lr"]["keys"] == ["lora.r", "training.lr"]
    assert [p["variant"] for p in config["sweeps"]["rank_lr"]["points"]] == names
    assert config["sweeps"]["rank_lr"]["points"][3]["settings"] == {"lora.r": 4, "training.lr": 3.0e-4}


@pytest.mark.parametrize("settings, name", [
    ({"lora.r": 4, "training.lr": 3.0e-4}, "v1-r4-lr3e-4"),
    ({"training.lr": 2.5e-4, "lora.alpha": 32.0}, "v1-lr2p5e-4-alpha32"),
    ({"lora.dropout": 0.05}, "v1-dropout5e-2"),
    ({"quantization": "none", "training.lr_scheduler": "cosine"}, "v1-quantization_none-lr_scheduler_cosine"),
    ({"training.compile": False}, "v1-compile_false"),
])
def test_sweep_variant_names(settings, name):
    assert sweep_variant_name("v1", settings) == name


def test_a_sweep_point_named_like_a_declared_variant_is_an_error_naming_the_sweep():
    config = config_with_sweep()
    config["variants"]["v1-r4-lr3e-4"] = {"from": "v1", "title": "by hand"}
    with pytest.raises(ConfigError, match=r"^exp\.yaml: sweeps\.rank_lr: its grid point lora\.r 4, "
                                          r"training\.lr 0\.0003 is named v1-r4-lr3e-4, which "
                                          r"variants already declares; rename that variant"):
        validated(config)


@pytest.mark.parametrize("change, message", [
    (lambda s: s["grid"].update({"lora.rank": [2]}), "exp.yaml: sweeps.rank_lr.grid.lora.rank: unknown key (did you mean lora.r?)"),
    (lambda s: s["grid"].update({"lora.r": [4, "big"]}), "exp.yaml: sweeps.rank_lr.grid.lora.r[1]: expected integer, got 'big'"),
    (lambda s: s["grid"].update({"training.lr": "1e-4"}), "exp.yaml: sweeps.rank_lr.grid.training.lr: expected array, got '1e-4'"),
    (lambda s: s["grid"].update({"quantization": ["int8"]}), "exp.yaml: sweeps.rank_lr.grid.quantization[0]: 'int8' is not one of: nf4, none"),
    (lambda s: s["grid"].update({"training.seeds": [[0, 1]]}), "exp.yaml: sweeps.rank_lr.grid.training.seeds: unknown key"),
    (lambda s: s.update({"from": "v9"}), "exp.yaml: sweeps.rank_lr.from: 'v9' is not a variant (variants: v1, v2, v3)"),
])
def test_bad_sweeps_are_config_errors_naming_the_key(change, message):
    config = config_with_sweep(copy.deepcopy(GRID))
    change(config["sweeps"]["rank_lr"])
    with pytest.raises(ConfigError) as error:
        validated(config)
    assert str(error.value).startswith(message), str(error.value)


def test_a_comparison_named_like_a_sweeps_plot_is_an_error():
    config = config_with_sweep()
    config["comparisons"].append({"name": "sweep_rank_lr", "variants": ["v2", "v1"]})
    with pytest.raises(ConfigError, match="comparisons: the name sweep_rank_lr is sweep rank_lr's plot"):
        validated(config)


# --- the sweep's numbers ---------------------------------------------------------------------

# eval loss after training by variant and seed: r16-lr3e-4 is best by a clear margin over
# r4-lr3e-4 (the same 0.05 in every seed, give or take 0.001), the rest far behind.
LOSSES = {"v1-r1-lr1e-4": [2.9, 2.95, 2.85], "v1-r1-lr3e-4": [2.7, 2.72, 2.68],
          "v1-r4-lr1e-4": [2.6, 2.61, 2.62], "v1-r4-lr3e-4": [2.25, 2.30, 2.21],
          "v1-r16-lr1e-4": [2.5, 2.45, 2.55], "v1-r16-lr3e-4": [2.20, 2.249, 2.161]}


def sweep_frames(losses=LOSSES, config=None):
    config = config or validated(config_with_sweep())
    runs = pd.DataFrame([{"variant": v, "seed": seed, "eval_loss_after": loss, "eval_loss_after_se": 0.01}
                         for v, values in losses.items() for seed, loss in enumerate(values)])
    summary = compare_variants.summarize(runs, list(losses))
    return config, runs, summary, compare_variants.sweep_table(runs, summary, config["sweeps"])


def test_the_sweep_table_ranks_points_and_tests_the_best_against_the_runner_up():
    config, runs, summary, table = sweep_frames()
    assert list(table["variant"]) == list(LOSSES)  # grid order
    assert list(table["setting.lora.r"]) == [1, 1, 4, 4, 16, 16]
    means = {v: sum(x) / 3 for v, x in LOSSES.items()}
    assert dict(zip(table["variant"], table["eval_loss_after_mean"])) == pytest.approx(means)
    ranked = sorted(means, key=means.get)
    assert dict(zip(table["variant"], table["rank"])) == {v: ranked.index(v) + 1 for v in LOSSES}
    best = table[table["rank"] == 1].iloc[0]
    assert (best["variant"], best["runner_up"]) == ("v1-r16-lr3e-4", "v1-r4-lr3e-4")
    values = {v: dict(enumerate(LOSSES[v])) for v in ("v1-r16-lr3e-4", "v1-r4-lr3e-4")}
    difference = compare(values["v1-r16-lr3e-4"], values["v1-r4-lr3e-4"])  # paired by seed
    assert difference.test == "paired t-test"
    assert best["margin"] == pytest.approx(-difference.difference) == pytest.approx(0.05, abs=1e-9)
    assert (best["margin_ci_low"], best["margin_ci_high"]) == pytest.approx((-difference.ci_high, -difference.ci_low))
    assert bool(best["margin_exceeds_noise"]) and difference.detected
    assert best["verdict"] == verdict(difference, "v1-r16-lr3e-4", "v1-r4-lr3e-4", "eval loss")
    assert best["verdict"].startswith("eval loss: v1-r16-lr3e-4 lower than v1-r4-lr3e-4 by 0.050")
    assert table[table["rank"] != 1]["verdict"].isna().all()


def test_a_margin_within_the_seed_noise_says_so():
    losses = {**LOSSES, "v1-r16-lr3e-4": [2.30, 2.20, 2.20]}  # vs r4-lr3e-4: -0.05, +0.10, -0.01
    _, _, _, table = sweep_frames(losses)
    best = table[table["rank"] == 1].iloc[0]
    assert not best["margin_exceeds_noise"]
    assert best["verdict"].startswith("eval loss: no difference detectable with 3 seeds")


def render_with_sweep(tmp_path, losses=LOSSES):
    """The notes of a finished sweep: every run's metrics.json (eval losses from `losses` for
    the sweep's points), made into the CSVs by the pipeline's own functions, then rendered."""
    config = validated(config_with_sweep())
    results = tmp_path / "results"
    names = list(config["variants"])
    runs, paths = [], []
    for i, name in enumerate(names):
        for seed in config["variants"][name]["seeds"]:
            loss = losses[name][seed] if name in losses else 2.0 + i / 10 + seed / 100
            runs.append({"variant": config["variants"][name], "seed": seed})
            paths.append(write_json(results / "variants" / name / f"seed-{seed}" / "metrics.json",
                                    fake_metrics(i % 3, seed, eval_loss_after=loss)))
    files = {name: results / f"{name}.csv" for name in ("metrics", "summary", "comparisons", "sweeps")}
    collect_metrics.collect(runs, paths).to_csv(files["metrics"], index=False)
    frame = pd.read_csv(files["metrics"])
    summary = compare_variants.summarize(frame, names)
    summary.to_csv(files["summary"], index=False)
    compare_variants.compare_runs(frame, []).to_csv(files["comparisons"], index=False)
    table = compare_variants.sweep_table(frame, summary, config["sweeps"])
    table.to_csv(files["sweeps"], index=False)
    plot = results / "plots" / "sweep_rank_lr.png"
    plot.parent.mkdir()
    plot.write_bytes(PNG_MAGIC)
    report = results / "report.md"
    render_report.main(fake_snakemake(
        input={"template": str(REPO / "report" / "report.md.j2"),
               **{name: str(path) for name, path in files.items()},
               "sweep_plots": str(plot),
               "data_stats": write_json(results / "data" / "stats.json", DATA_STATS),
               "token_stats": [write_json(results / "tokenized.json", TOKEN_STATS)] * len(names),
               "before": [write_json(results / "before.json", samples(["b1", "b2"]))] * len(names),
               "after": [write_json(results / "after.json", samples(["a1", "a2"]))] * len(names),
               "plots": []},
        output={"report": str(report)},
        params={"config": {**config, "prompts": PROMPTS}, "plot_titles": []},
        log={"log": str(tmp_path / "report.log")},
    ))
    return report.read_text(encoding="utf-8"), pd.read_csv(files["sweeps"])


def test_the_notes_have_a_sweeps_section_with_the_table_plot_and_verdict(tmp_path):
    text, table = render_with_sweep(tmp_path)
    section = text.split("## Sweeps", 1)[1].split("\n## ", 1)[0]
    sweep_table, = tables(section)
    assert sweep_table[0] == ["Variant", "lora.r", "training.lr", "Seeds", "Eval loss after", "Rank"]
    rows = {row[0]: row for row in sweep_table[1:]}
    assert list(rows) == list(LOSSES)
    for record in table.to_dict("records"):
        shown = render_report.noisy(record, "eval_loss_after")
        assert rows[record["variant"]][4] == shown and " ± " in shown
        assert rows[record["variant"]][5] == str(record["rank"])
    assert rows["v1-r4-lr3e-4"][1:4] == ["4", "0.0003", "3"]
    assert images(section) == [("Sweep rank_lr", "plots/sweep_rank_lr.png")]
    best = table[table["rank"] == 1].iloc[0]
    assert (f"**Best: v1-r16-lr3e-4** (lora.r 16, training.lr 0.0003), eval loss "
            f"{render_report.noisy(best.to_dict(), 'eval_loss_after')}; its margin over the runner-up "
            f"v1-r4-lr3e-4 is 0.0500, more than the noise: {best['verdict']}.") in section


def test_the_sweep_plot_draws_each_swept_key(tmp_path):
    _, _, _, table = sweep_frames()
    out = tmp_path / "sweep.png"
    points = table.where(table.notna(), None).to_dict("records")
    plot_sweep.plot_sweep(points, ["lora.r", "training.lr"], out, "Sweep rank_lr")
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_the_workflow_runs_each_point_and_seed_and_draws_the_sweep(tmp_path):
    """A dry run of a sweep config: a train job per point and seed, one sweep plot, the report."""
    workdir = copy_workflow(tmp_path)
    config = config_with_sweep({"lora.r": [4, 8], "training.lr": [1.0e-3]})
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    dry = run_snakemake(workdir, "-n", "--cores", "1", "results/report.md").stdout
    trains = {line.split("wildcards: ")[1] for line in dry.splitlines() if "wildcards: variant=v1-r" in line}
    assert {t for t in trains if "seed=" in t} >= {f"variant=v1-r{r}-lr1e-3, seed={s}" for r in (4, 8) for s in (0, 1, 2)}
    assert "results/plots/sweep_rank_lr.png" in dry and "rule plot_sweep:" in dry
