"""metrics.csv (scripts/collect_metrics.py) and the loss-curve plots (scripts/plot_loss.py)."""

import io
import json
import math

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


def test_metrics_csv_has_a_row_per_variant_in_config_order(tmp_path):
    variants = experiment_variants()
    paths = []
    for index, variant in enumerate(variants):
        path = tmp_path / variant["name"] / "metrics.json"
        path.parent.mkdir()
        path.write_text(json.dumps(fake_metrics(index)))
        paths.append(str(path))
    out = tmp_path / "metrics.csv"
    collect_metrics.main(fake_snakemake(
        input={"metrics": paths}, output={"csv": str(out)}, params={"variants": variants}
    ))

    frame = pd.read_csv(out)
    assert list(frame["variant"]) == ["zeta", "alpha", "mid"]
    for index, (variant, row) in enumerate(zip(variants, frame.to_dict("records"))):
        assert row["title"] == variant["title"]
        assert (row["model"], row["quantization"]) == (variant["model"], variant["quantization"])
        assert row["lora_r"] == variant["lora"]["r"]
        assert row["lora_targets"] == "q_proj,v_proj"
        for key, value in fake_metrics(index).items():
            if key not in collect_metrics.COLUMNS:
                continue
            if value is None:
                assert math.isnan(row[key]), key
            elif isinstance(value, float):
                assert row[key] == pytest.approx(value, rel=1e-12), key
            else:
                assert row[key] == value, key


def loss_curve(steps, start, end, seed):
    rng = np.random.default_rng(seed)
    loss = np.linspace(start, end, steps) + rng.normal(0, 0.05, steps)
    return pd.DataFrame({"step": np.arange(1, steps + 1), "loss": loss})


def plot(tmp_path, names):
    """Plot the train_log.csv files of `names` through plot_loss.main; return the PNG's bytes."""
    curves = {"v1": loss_curve(60, 7.6, 7.5, 0), "v2": loss_curve(60, 5.0, 2.0, 1)}
    logs = []
    for name in names:
        logs.append(str(tmp_path / f"{name}.csv"))
        curves[name].to_csv(logs[-1], index=False)
    out = tmp_path / f"{'_'.join(names)}.png"
    plot_loss.main(fake_snakemake(
        input={"logs": logs}, output={"png": str(out)},
        params={"names": names, "titles": [f"title of {n}" for n in names], "title": "cmp"},
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


def test_plot_draws_a_single_step_run(tmp_path):
    """A one-step run (a smoke test, a crashed job) still gives a plot, not an error."""
    out = tmp_path / "short.png"
    plot_loss.plot_losses({"v1": loss_curve(1, 3.0, 3.0, 0)}, out, "one step")
    assert out.read_bytes().startswith(PNG_MAGIC)
