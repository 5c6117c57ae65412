"""A sweep's plot: eval loss after training (mean over seeds, bars: ± one standard deviation)
against each swept key, one panel per key, one line per combination of the other keys' values.
Numbers come from results/sweeps.csv (compare_variants.sweep_table); the best point is ringed.
"""

import logging

import matplotlib

matplotlib.use("Agg")  # no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from compare_variants import SWEPT_METRIC  # noqa: E402
from errors import configure_logging, entry_point  # noqa: E402

log = logging.getLogger("loranotes.plot_sweep")


def _numeric(values):
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_sweep(points, keys, out_path, title):
    """points: the sweep's rows of sweeps.csv as dicts; keys: its swept keys, in grid order."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4), dpi=120, squeeze=False)
    mean, sd = f"{SWEPT_METRIC}_mean", f"{SWEPT_METRIC}_sd"
    for ax, key in zip(axes[0], keys):
        values = list(dict.fromkeys(p[f"setting.{key}"] for p in points))
        numeric = _numeric(values)
        position = (lambda v: v) if numeric else (lambda v: values.index(v))  # noqa: E731
        others = [k for k in keys if k != key]
        lines = {}
        for p in points:
            lines.setdefault(tuple(p[f"setting.{k}"] for k in others), []).append(p)
        for index, (label_values, line) in enumerate(lines.items()):
            line = sorted(line, key=lambda p: position(p[f"setting.{key}"]))
            label = ", ".join(f"{k} {v}" for k, v in zip(others, label_values)) or None
            ax.errorbar([position(p[f"setting.{key}"]) for p in line], [p[mean] for p in line],
                        yerr=[0 if pd.isna(p[sd]) else p[sd] for p in line], marker="o",
                        capsize=3, color=f"C{index % 10}", label=label)
        best = [p for p in points if p.get("rank") == 1]
        for p in best:
            ax.plot(position(p[f"setting.{key}"]), p[mean], "o", markersize=14, fillstyle="none",
                    color="black", label="best")
        if numeric and min(values) > 0 and max(values) / min(values) >= 10:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(values)), [str(v) for v in values])
        elif len(values) <= 8:
            ax.set_xticks(values, [f"{v:g}" for v in values])
            ax.minorticks_off()
        ax.set_xlabel(key)
        ax.set_ylabel("eval loss after training")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)


@entry_point
def main(snakemake):
    configure_logging(snakemake)
    sweeps = pd.read_csv(snakemake.input.sweeps)
    name, keys = snakemake.params.sweep, snakemake.params.swept_keys
    points = [{k: (None if pd.isna(v) else v) if not isinstance(v, str) else v
               for k, v in row.items()} for row in sweeps[sweeps["sweep"] == name].to_dict("records")]
    plot_sweep(points, keys, snakemake.output[0], f"Sweep {name}: eval loss (mean ± sd over seeds)")
    log.info("plotted sweep %s -> %s", name, snakemake.output[0])


if __name__ == "__main__":
    main(snakemake)  # noqa: F821  (injected by Snakemake's script directive)
