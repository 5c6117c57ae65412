"""Training-loss curves of several variants on one axis: smoothed lines over the faint raw ones."""

import matplotlib

matplotlib.use("Agg")  # no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def smooth(values, steps):
    """Exponential moving average, light: about a twentieth of the run."""
    return values.ewm(span=max(2, steps // 20), adjust=False).mean()


def plot_losses(curves, out_path, title):
    """curves: {label: DataFrame with step and loss columns}, drawn in the given order."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for index, (label, frame) in enumerate(curves.items()):
        color = f"C{index}"
        ax.plot(frame["step"], frame["loss"], color=color, alpha=0.25, linewidth=1)
        ax.plot(frame["step"], smooth(frame["loss"], len(frame)), color=color, linewidth=2, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (assistant tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)


def main(snakemake):
    curves = {
        f"{name}: {title}": pd.read_csv(path)
        for name, title, path in zip(snakemake.params.names, snakemake.params.titles, snakemake.input.logs)
    }
    plot_losses(curves, snakemake.output[0], snakemake.params.title)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821  (injected by Snakemake's script directive)
