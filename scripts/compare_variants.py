"""From results/metrics.csv (one row per run), what the notes conclude with:
- results/summary.csv: per variant, each number's mean, standard deviation over seeds and n, and
  the noise that sets how many decimals it is printed with (the spread over seeds; with a single
  seed the run's own standard error, see NOISE);
- results/comparisons.csv: every configured comparison and every variant against its `from:`
  parent: the difference in eval loss and held-out accuracy, its 95% confidence interval and a
  one-line verdict (uncertainty.verdict).
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


if __name__ == "__main__":
    main(snakemake)  # noqa: F821  (injected by Snakemake's script directive)
