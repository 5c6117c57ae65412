"""From results/metrics.csv (one row per run), what the notes conclude with:
- results/summary.csv: per variant, each number's mean, standard deviation over seeds and n, and
  the noise that sets how many decimals it is printed with (the spread over seeds; with a single
  seed the run's own standard error, see NOISE);
- results/comparisons.csv: every configured comparison and every variant against its `from:`
  parent: the difference in eval loss and held-out accuracy, its 95% confidence interval and a
  one-line verdict (uncertainty.verdict);
- results/sweeps.csv: every sweep's grid points with their eval loss (mean, sd over seeds), ranked,
  and on the best one its margin over the runner-up, tested like any comparison (sweep_table).
"""

import logging
import math

import pandas as pd

from errors import configure_logging, entry_point
from uncertainty import compare, interval_decimals, mean_sd, verdict

log = logging.getLogger("loranotes.compare_variants")


def _column(name):
    return lambda row: row.get(name)


def _binomial_se(row):
    """A floor for one run's held-out accuracy noise: the binomial standard error over its
    target tokens (tokens of one conversation are not independent, so the real one is larger)."""
    p, n = row.get("eval_accuracy_after"), row.get("eval_target_tokens")
    return math.sqrt(p * (1 - p) / n) if _present(p) and _present(n) and n > 0 else None


def _relative_to_step_time(key):
    """Throughput figures are step time in disguise: they have its relative noise."""
    def noise(row):
        value, se, step = row.get(key), row.get("median_s_per_step_se"), row.get("median_s_per_step")
        return value * se / step if all(map(_present, (value, se, step))) and step else None
    return noise


# The numbers summarised over seeds, and how one run's own noise is estimated (it sets the
# precision printed when a variant has a single seed and no spread over seeds to go by).
NOISE = {
    "final_train_loss": _column("final_train_loss_se"),  # step-to-step, last 10% of steps
    "eval_loss_before": _column("eval_loss_after_se"),  # over held-out conversations
    "eval_loss_after": _column("eval_loss_after_se"),
    "eval_accuracy_after": _binomial_se,
    "token_accuracy": lambda row: None,
    "median_s_per_step": _column("median_s_per_step_se"),
    "tokens_per_s": _relative_to_step_time("tokens_per_s"),
    "mfu": _relative_to_step_time("mfu"),
    "peak_memory_gb": lambda row: None,
}
# What comparisons test, with the words of their verdicts: (label, lower, higher).
COMPARED = {
    "eval_loss_after": ("eval loss", "lower", "higher"),
    "eval_accuracy_after": ("held-out accuracy", "lower", "higher"),
}


def _present(value):
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def summarize(runs, variants):
    """One row per variant: seeds, n, and {metric}_mean, _sd, _noise for every NOISE metric."""
    rows = []
    for name in variants:
        mine = runs[runs["variant"] == name].to_dict("records")
        row = {"variant": name, "n_seeds": len(mine), "seeds": " ".join(str(r["seed"]) for r in mine)}
        for metric, own_noise in NOISE.items():
            values = [r[metric] for r in mine if _present(r.get(metric))]
            if not values:
                row.update({f"{metric}_mean": None, f"{metric}_sd": None, f"{metric}_noise": None})
                continue
            mean, sd, _ = mean_sd(values)
            if sd is None:
                single = own_noise(mine[0])
                noise = single if _present(single) else None
            else:
                noise = sd
            row.update({f"{metric}_mean": mean, f"{metric}_sd": sd, f"{metric}_noise": noise})
        rows.append(row)
    return pd.DataFrame(rows)


def comparison_pairs(variants, comparisons, parents):
    """(a, b, why) for every configured comparison (its first variant against each other one)
    and every variant against its parent; a pair asked for twice is compared once."""
    pairs = {}
    for comparison in comparisons:
        first, *others = comparison["variants"]
        for other in others:
            pairs.setdefault((first, other), []).append(comparison["name"])
    for name in variants:
        if parents.get(name):
            pairs.setdefault((name, parents[name]), []).append(f"{name} from {parents[name]}")
    return [(a, b, ", ".join(why)) for (a, b), why in pairs.items()]


def compare_runs(runs, pairs):
    """One row per (pair, compared metric): the difference, its interval, test and verdict."""
    rows = []
    for a, b, why in pairs:
        for metric, (label, lower, higher) in COMPARED.items():
            values = {name: {r["seed"]: r[metric] for r in runs[runs["variant"] == name].to_dict("records")
                             if _present(r.get(metric))} for name in (a, b)}
            if not values[a] or not values[b]:
                continue
            difference = compare(values[a], values[b])
            floor = _single_run_floor(runs, metric, a, b)
            rows.append({
                "a": a, "b": b, "why": why, "metric": metric, "test": difference.test,
                "seeds": " ".join(map(str, difference.seeds)), "n_a": difference.n_a,
                "n_b": difference.n_b, "difference": difference.difference,
                "ci_low": difference.ci_low, "ci_high": difference.ci_high,
                "p_value": difference.p_value, "detected": difference.detected,
                "decimals": interval_decimals(difference, floor),
                "verdict": verdict(difference, a, b, label, lower, higher, floor),
            })
    return pd.DataFrame(rows, columns=["a", "b", "why", "metric", "test", "seeds", "n_a", "n_b",
                                       "difference", "ci_low", "ci_high", "p_value", "detected",
                                       "decimals", "verdict"])


def _single_run_floor(runs, metric, a, b):
    """The two first runs' own noise combined: the precision of a difference without seeds."""
    noises = []
    for name in (a, b):
        first = runs[runs["variant"] == name].to_dict("records")[0]
        noise = NOISE[metric](first)
        if not _present(noise):
            return None
        noises.append(noise)
    return math.sqrt(sum(n * n for n in noises))


# What a sweep ranks its points by (lowest first), as COMPARED words it.
SWEPT_METRIC = "eval_loss_after"
SWEEP_COLUMNS = ["sweep", "variant", "rank", "n_seeds", "seeds", f"{SWEPT_METRIC}_mean",
                 f"{SWEPT_METRIC}_sd", f"{SWEPT_METRIC}_noise", "runner_up", "margin", "margin_ci_low",
                 "margin_ci_high", "test", "p_value", "margin_exceeds_noise", "decimals", "verdict"]


def sweep_table(runs, summary, sweeps):
    """One row per sweep point: its settings (`setting.<key>` columns), seeds and eval loss
    (mean, sd, noise, from the summary) and its rank (1: lowest eval loss). The best point's row
    also has the runner-up, the margin (runner-up minus best) with its 95% interval, the test,
    whether the margin exceeds the noise (the interval excludes zero), and the verdict: the
    same comparison as every other (compare_runs), paired by seed."""
    by_variant = {row["variant"]: row for row in summary.to_dict("records")}
    rows = []
    for name, sweep in sweeps.items():
        points = [{"sweep": name, "variant": point["variant"],
                   **{f"setting.{key}": value for key, value in point["settings"].items()},
                   **{key: by_variant[point["variant"]][key]
                      for key in ("n_seeds", "seeds", *(f"{SWEPT_METRIC}_{s}" for s in ("mean", "sd", "noise")))}}
                  for point in sweep["points"]]
        ranked = sorted((p for p in points if _present(p[f"{SWEPT_METRIC}_mean"])),
                        key=lambda p: p[f"{SWEPT_METRIC}_mean"])
        for rank, point in enumerate(ranked, 1):
            point["rank"] = rank
        if len(ranked) > 1:
            ranked[0].update(_margin(runs, ranked[0]["variant"], ranked[1]["variant"]))
        rows += points
    settings = sorted({key for row in rows for key in row if key.startswith("setting.")})
    return pd.DataFrame(rows, columns=[*SWEEP_COLUMNS[:2], *settings, *SWEEP_COLUMNS[2:]])


def _margin(runs, best, runner_up):
    """The best point against the runner-up, as compare_runs compares any pair."""
    row = compare_runs(runs, [(best, runner_up, "sweep")])
    row = row[row["metric"] == SWEPT_METRIC].iloc[0]
    return {"runner_up": runner_up, "margin": -row["difference"],
            "margin_ci_low": None if not _present(row["ci_high"]) else -row["ci_high"],
            "margin_ci_high": None if not _present(row["ci_low"]) else -row["ci_low"],
            "test": row["test"], "p_value": row["p_value"], "margin_exceeds_noise": row["detected"],
            "decimals": row["decimals"], "verdict": row["verdict"]}


@entry_point
def main(snakemake):
    configure_logging(snakemake)
    runs = pd.read_csv(snakemake.input.metrics)
    variants = snakemake.params.variants
    summary = summarize(runs, variants)
    summary.to_csv(snakemake.output.summary, index=False)
    pairs = comparison_pairs(variants, snakemake.params.comparisons, snakemake.params.parents)
    comparisons = compare_runs(runs, pairs)
    comparisons.to_csv(snakemake.output.comparisons, index=False)
    for line in comparisons["verdict"]:
        log.info("%s", line)
    sweeps = sweep_table(runs, summary, snakemake.params.sweeps)
    sweeps.to_csv(snakemake.output.sweeps, index=False)
    for line in sweeps["verdict"].dropna():
        log.info("sweep: %s", line)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821  (injected by Snakemake's script directive)
