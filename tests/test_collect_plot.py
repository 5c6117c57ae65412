"""metrics.csv (scripts/collect_metrics.py) and the loss-curve plots (scripts/plot_loss.py)."""

import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgb
from PIL import Image

import collect_metrics
import plot_loss
from util import PNG_MAGIC, fake_metrics, fake_snakemake
from experiment_config import resolve_config


def experiment_variants():
    """Resolved variants, declared in non-alphabetical order."""
    config = {
        "dataset": {"source": "bundled"},
        "prompts": ["Hi"],
        "training": {},
        "lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]},
        "models": {"m": {"init": {"architecture": "llama"}}, "n": {"init": {"architecture": "qwen3"}}},
        "variants": {
            "zeta": {"model": "m", "quantization": "nf4", "title": "first, declared"},
            "alpha": {"from": "zeta", "quantization": "none"},
            "mid": {"from": "zeta", "model": "n", "lora": {"r": 16}},
        },
    }
    return list(resolve_config(config)["variants"].values())


def write_runs(tmp_path, variants, seeds=(0, 1), **overrides):
    """metrics.json of every (variant, seed), as train.py lays them out; returns (runs, paths)."""
    runs, paths = [], []
    for index, variant in enumerate(variants):
        for seed in seeds:
            path = tmp_path / variant["name"] / f"seed-{seed}" / "metrics.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps(fake_metrics(index, seed, **overrides)))
            runs.append({"variant": variant, "seed": seed})
            paths.append(str(path))
    return runs, paths


def test_metrics_csv_has_a_row_per_run_in_config_order_and_drops_nothing(tmp_path):
    variants = experiment_variants()
    runs, paths = write_runs(tmp_path, variants, extra_key_from_a_newer_trainer=7)
    out = tmp_path / "metrics.csv"
    collect_metrics.main(fake_snakemake(
        input={"metrics": paths}, output={"csv": str(out)}, params={"runs": runs},
        log={"log": str(tmp_path / "collect.log")},
    ))

    frame = pd.read_csv(out)
    assert list(zip(frame["variant"], frame["seed"])) == [
        ("zeta", 0), ("zeta", 1), ("alpha", 0), ("alpha", 1), ("mid", 0), ("mid", 1)]
    for run, row in zip(runs, frame.to_dict("records")):
        variant, index = run["variant"], variants.index(run["variant"])
        assert row["title"] == variant["title"]
        assert (row["model"], row["quantization"]) == (variant["model"], variant["quantization"])
        assert row["lora_r"] == variant["lora"]["r"]
        assert row["lora_targets"] == "q_proj,v_proj"
        written = collect_metrics.flatten(fake_metrics(index, run["seed"], extra_key_from_a_newer_trainer=7))
        assert set(written) <= set(row)  # every key the run wrote is a column
        for key, value in written.items():
            if value is None:
                assert math.isnan(row[key]), key
            elif isinstance(value, float):
                assert row[key] == pytest.approx(value, rel=1e-12), key
            else:
                assert row[key] == value, key
    assert frame["provenance.packages.torch"].eq("2.13.0").all()


def train_log(steps, start, end, seed, eval_every=0):
    """A train_log.csv's frame: noisy falling loss and rising accuracy, eval points every
    `eval_every` steps and at the last."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "step": np.arange(1, steps + 1),
        "loss": np.linspace(start, end, steps) + rng.normal(0, 0.05, steps),
        "token_accuracy": np.linspace(0.1, 0.5, steps) + rng.normal(0, 0.01, steps),
    })
    evaluated = (frame["step"] % eval_every == 0) if eval_every else frame["step"] == steps
    evaluated |= frame["step"] == steps
    frame["eval_loss"] = frame["loss"].where(evaluated) + 0.1
    frame["eval_accuracy"] = frame["token_accuracy"].where(evaluated) - 0.05
    return frame


def plot(tmp_path, names, seeds=(0,), random_init=False, colors=None):
    """Plot the runs of `names` through plot_loss.main; return the PNG's bytes."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    shapes = {"v1": (7.6, 7.5), "v2": (5.0, 2.0)}
    runs, logs, metrics = [], [], []
    for name in names:
        for seed in seeds:
            runs.append((name, seed))
            logs.append(str(tmp_path / f"{name}-{seed}.csv"))
            train_log(60, *shapes[name], seed, eval_every=20).to_csv(logs[-1], index=False)
            metrics.append(str(tmp_path / f"{name}-{seed}.json"))
            Path(metrics[-1]).write_text(json.dumps(
                {"eval_loss_before": shapes[name][0] + 0.2, "eval_accuracy_before": 0.05,
                 "random_init": random_init}))
    out = tmp_path / f"{'_'.join(names)}-{len(seeds)}.png"
    plot_loss.main(fake_snakemake(
        input={"logs": logs, "metrics": metrics}, output={"png": str(out)},
        params={"runs": runs, "titles": {n: f"title of {n}" for n in names}, "title": "cmp",
                "colors": colors or {n: i for i, n in enumerate(names)}},
        log={"log": str(tmp_path / "plot.log")},
    ))
    return out.read_bytes()


def pixels(png):
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def count_color(image, color):
    """Pixels drawn in a matplotlib color (e.g. "C1"), allowing for anti-aliasing."""
    rgb = np.array(to_rgb(color)) * 255
    return int((np.abs(image - rgb).max(axis=-1) < 8).sum())


def test_plot_is_a_png_showing_every_curve(tmp_path):
    one, two = plot(tmp_path, ["v1"]), plot(tmp_path, ["v1", "v2"])
    for png in (one, two):
        assert len(png) > 1000 and png.startswith(PNG_MAGIC)
    one, two = pixels(one), pixels(two)
    assert one.shape == two.shape and (one != two).any()
    # The first curve is drawn in C0 in both; only the two-curve plot has a C1 curve.
    assert count_color(one, "C0") > 100 and count_color(two, "C0") > 100
    assert count_color(one, "C1") == 0
    assert count_color(two, "C1") > 100


def test_a_variant_keeps_its_colour_in_every_plot(tmp_path):
    """v2 is the config's second variant: C1 also in a plot where it is drawn alone."""
    alone = pixels(plot(tmp_path, ["v2"], colors={"v2": 1}))
    assert count_color(alone, "C1") > 100 and count_color(alone, "C0") == 0


def test_several_seeds_are_drawn_as_a_band_around_their_mean(tmp_path):
    """The band over seeds is the variant's colour, translucent: more pixels of its light tint."""
    one, three = pixels(plot(tmp_path, ["v2"], seeds=(0,))), pixels(plot(tmp_path, ["v2"], seeds=(0, 1, 2)))
    tint = 1 - 0.2 * (1 - np.array(to_rgb("C0")))  # C0 at alpha 0.2 over white
    near = lambda image: int((np.abs(image - tint * 255).max(axis=-1) < 6).sum())
    assert near(three) > near(one) + 200


def test_eval_points_come_from_metrics_before_and_the_logs_eval_steps(tmp_path):
    logs = [train_log(60, 5.0, 2.0, seed, eval_every=20) for seed in (0, 1)]
    metrics = [{"eval_loss_before": 5.5}, {"eval_loss_before": 5.5}]
    steps, mean, sd = plot_loss.eval_points(logs, metrics, "eval_loss", "eval_loss_before")
    assert list(steps) == [0, 20, 40, 60]
    assert mean.iloc[0] == 5.5 and sd.iloc[0] == 0
    expected = (logs[0].set_index("step")["eval_loss"] + logs[1].set_index("step")["eval_loss"]) / 2
    assert mean.iloc[1:].tolist() == pytest.approx(expected.dropna().tolist())


def test_plots_of_random_init_models_say_so(tmp_path):
    """The title grows a second line: more dark (text) pixels at the top of the figure."""
    def text_pixels(png):
        top = pixels(png)[:60]
        return int((top.max(axis=-1) < 80).sum())
    assert text_pixels(plot(tmp_path / "r", ["v1"], random_init=True)) > \
        text_pixels(plot(tmp_path / "p", ["v1"], random_init=False)) + 100


def test_plot_draws_a_single_step_run(tmp_path):
    """A one-step run (a smoke test, a crashed job) still gives a plot, not an error."""
    out = tmp_path / "short.png"
    plot_loss.plot_variants([{"label": "v1", "color": 0, "logs": [train_log(1, 3.0, 3.0, 0)],
                              "metrics": [{"eval_loss_before": 3.1, "eval_accuracy_before": 0.1}]}],
                            out, "one step")
    assert out.read_bytes().startswith(PNG_MAGIC)
