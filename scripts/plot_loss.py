"""Curves of several variants on one figure: train loss per step with the held-out eval points
over it, and token accuracy (train and held-out) below.

Over several seeds a variant is drawn as the mean over its seeds, with a band for their range
(train curves) or bars of ± one standard deviation (eval points). Each variant keeps one colour
in every plot: its place in the config.
"""

import json
import logging

import matplotlib

matplotlib.use("Agg")  # no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from errors import configure_logging, entry_point  # noqa: E402

log = logging.getLogger("loranotes.plot")

RANDOM_INIT_NOTE = "random weights: the curves show the pipeline, not a model"


def smooth(values, steps):
    """Exponential moving average, light: about a twentieth of the run."""
    return values.ewm(span=max(2, steps // 20), adjust=False).mean()


def train_curves(logs, column):
    """(steps, mean, low, high) of `column` over seeds, each seed smoothed first."""
    smoothed = pd.concat(
        [smooth(frame.set_index("step")[column], len(frame)) for frame in logs], axis=1
    )
    return smoothed.index, smoothed.mean(axis=1), smoothed.min(axis=1), smoothed.max(axis=1)


def eval_points(logs, metrics, column, before_key):
    """(steps, mean, sd) of the held-out `column` over seeds: before training (step 0, from
    metrics.json) and at every eval step of the train log."""
    frames = []
    for frame, run in zip(logs, metrics):
        points = {0: run[before_key]}
        if column in frame:
            points.update(frame.dropna(subset=[column]).set_index("step")[column].to_dict())
        frames.append(pd.Series(points))
    points = pd.concat(frames, axis=1).sort_index()
    return points.index, points.mean(axis=1), points.std(axis=1, ddof=1).fillna(0.0)


def plot_variants(variants, out_path, title):
    """variants: [{"label", "color", "logs": [DataFrame per seed], "metrics": [dict per seed]}],
    drawn in the given order."""
    fig, (loss_ax, acc_ax) = plt.subplots(2, 1, figsize=(7, 6.5), dpi=120, sharex=True,
                                          gridspec_kw={"height_ratios": [3, 2]})
    random_init = False
    for variant in variants:
        logs, metrics, color = variant["logs"], variant["metrics"], f"C{variant['color'] % 10}"
        seeds = len(logs)
        label = f"{variant['label']} ({seeds} seed{'s' if seeds > 1 else ''})"
        random_init |= any(run.get("random_init") for run in metrics)
        for ax, column, eval_column, before_key in (
            (loss_ax, "loss", "eval_loss", "eval_loss_before"),
            (acc_ax, "token_accuracy", "eval_accuracy", "eval_accuracy_before"),
        ):
            steps, mean, low, high = train_curves(logs, column)
            ax.plot(steps, mean, color=color, linewidth=1.8, label=f"{label}, train")
            if seeds > 1:
                ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
            eval_steps, eval_mean, eval_sd = eval_points(logs, metrics, eval_column, before_key)
            ax.errorbar(eval_steps, eval_mean, yerr=eval_sd if seeds > 1 else None, color=color,
                        marker="o", markersize=5, linestyle="--", linewidth=1, capsize=3,
                        label=f"{label}, held-out")
    loss_ax.set_ylabel("loss (assistant tokens)")
    acc_ax.set_ylabel("token accuracy")
    acc_ax.set_xlabel("step")
    loss_ax.set_title(f"{title}\n({RANDOM_INIT_NOTE})" if random_init else title,
                      fontsize=10 if random_init else 12)
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@entry_point
def main(snakemake):
    configure_logging(snakemake)
    params = snakemake.params
    by_variant = {}
    for (name, _seed), log_path, metrics_path in zip(params.runs, snakemake.input.logs,
                                                       snakemake.input.metrics, strict=True):
        entry = by_variant.setdefault(name, {"label": f"{name}: {params.titles[name]}",
                                             "color": params.colors[name], "logs": [], "metrics": []})
        entry["logs"].append(pd.read_csv(log_path))
        entry["metrics"].append(read_json(metrics_path))
    plot_variants(list(by_variant.values()), snakemake.output[0], params.title)
    log.info("plotted %s -> %s", ", ".join(by_variant), snakemake.output[0])


if __name__ == "__main__":
    main(snakemake)  # noqa: F821  (injected by Snakemake's script directive)
