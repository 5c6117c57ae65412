"""Numbers with their noise (scripts/uncertainty.py) and the comparisons the notes conclude with
(scripts/compare_variants.py), on known numbers: hand computed, and against scipy."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import compare_variants
from uncertainty import Difference, compare, decimals_for, fixed, mean_sd, verdict
from util import fake_snakemake

T_975_DF2 = 4.302652729911275  # Student's t, 97.5th percentile, 2 degrees of freedom


def test_paired_difference_and_interval_by_hand():
    # v2 - v1 per seed: -0.031, -0.030, -0.032: mean -0.031, sd 0.001
    v1 = {0: 2.131, 1: 2.230, 2: 2.052}
    v2 = {0: 2.100, 1: 2.200, 2: 2.020}
    difference = compare(v2, v1)
    half_width = T_975_DF2 * 0.001 / math.sqrt(3)
    assert difference.test == "paired t-test" and difference.seeds == (0, 1, 2)
    assert difference.difference == pytest.approx(-0.031)
    assert difference.ci_low == pytest.approx(-0.031 - half_width)
    assert difference.ci_high == pytest.approx(-0.031 + half_width)
    assert difference.p_value == pytest.approx(stats.ttest_rel(list(v2.values()), list(v1.values())).pvalue)
    assert difference.detected
    assert verdict(difference, "v2", "v1", "eval loss") == (
        "eval loss: v2 lower than v1 by 0.0310 (95% CI 0.0285–0.0335; paired t-test over seeds 0, 1, 2)")


def test_an_interval_that_contains_zero_is_no_detectable_difference():
    v1 = {0: 2.14, 1: 2.17, 2: 2.11}
    v2 = {0: 2.10, 1: 2.15, 2: 2.05}  # differences -0.04, -0.02, -0.06: sd 0.02
    difference = compare(v2, v1)
    half_width = T_975_DF2 * 0.02 / math.sqrt(3)
    assert (difference.ci_low, difference.ci_high) == pytest.approx((-0.04 - half_width, -0.04 + half_width))
    assert difference.ci_low < 0 < difference.ci_high and not difference.detected
    line = verdict(difference, "v2", "v1", "eval loss")
    assert line.startswith("eval loss: no difference detectable with 3 seeds (v2 − v1 = -0.04, 95% CI -0.09 to 0.01; paired t-test")


@pytest.mark.parametrize("low, high, printed", [
    (-0.00002, 0.0049, "no difference detectable with 3 seeds (v2 − v1 = 0.0024, 95% CI -0.00002 to 0.0049"),
    (0.000031, 0.0049, "v2 higher than v1 by 0.0024 (95% CI 0.00003–0.0049"),
])
def test_a_bound_near_zero_shows_its_side_of_zero(low, high, printed):
    # seen in the default's notes: "95% CI -0.0000 to 0.0049", which reads as if it touched zero
    difference = Difference(0.0024, low, high, 0.05, "paired t-test", (0, 1, 2), 3, 3)
    assert printed in verdict(difference, "v2", "v1", "held-out accuracy")


def test_pairing_by_seed_removes_the_data_order_noise_welch_cannot():
    """Each seed shifts both variants alike (same data order): paired, a 0.01 gap is clear;
    the same numbers unpaired (Welch) drown it in the seed-to-seed spread."""
    seed_effect = {0: 0.0, 1: 0.3, 2: -0.2, 3: 0.1}
    v1 = {s: 2.0 + e for s, e in seed_effect.items()}
    v2 = {s: 1.99 + e + 0.001 * (s % 2) for s, e in seed_effect.items()}
    assert compare(v2, v1).detected
    unpaired = compare(v2, {s + 10: v for s, v in v1.items()})  # no seed in common
    assert unpaired.test == "Welch's t-test" and not unpaired.detected
    result = stats.ttest_ind(list(v2.values()), list(v1.values()), equal_var=False)
    interval = result.confidence_interval(0.95)
    assert (unpaired.ci_low, unpaired.ci_high) == pytest.approx((interval.low, interval.high))


def test_welch_interval_by_hand():
    a, b = [1.0, 1.2, 1.1], [1.5, 1.4, 1.9, 1.6]
    difference = compare(dict(enumerate(a)), {s + 5: v for s, v in enumerate(b)})
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 4
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)  # Welch-Satterthwaite
    half_width = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert difference.difference == pytest.approx(np.mean(a) - np.mean(b))
    assert (difference.ci_low, difference.ci_high) == pytest.approx(
        (difference.difference - half_width, difference.difference + half_width))


def test_one_seed_each_gives_no_interval_and_says_what_to_do():
    difference = compare({0: 2.10}, {0: 2.13})
    assert difference.test == "none" and difference.ci_low is None and not difference.detected
    line = verdict(difference, "v2", "v1", "eval loss", noise_floor=0.02)
    assert line.startswith("eval loss: v2 − v1 = -0.030; no confidence interval with 1 seed each")
    assert "training.seeds" in line


def test_printed_precision_follows_the_noise():
    assert [decimals_for(x) for x in (0.025, 0.06, 0.0012, 0.15, 1.5, 12, 350, 4533)] == [
        3, 2, 4, 2, 1, 0, -2, -3]
    assert fixed(3346.0, decimals_for(4533), thousands=True) == "3,000"
    assert fixed(3346.0, decimals_for(1533), thousands=True) == "3,300"
    assert fixed(2.34567, decimals_for(0.025)) == "2.346" and fixed(2.3, None) == "2.3000"
    assert decimals_for(None) is None and decimals_for(0.0) is None
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
    assert mean_sd([5.0]) == (5.0, None, 1)


def runs_frame():
    rows = []
    for variant, base, seeds in (("v1", 2.0, (0, 1, 2)), ("v2", 1.9, (0, 1, 2)), ("v3", 2.5, (0,))):
        for seed in seeds:
            rows.append({"variant": variant, "seed": seed, "eval_loss_after": base + 0.01 * seed,
                         "eval_loss_after_se": 0.02, "eval_accuracy_after": 0.3 + 0.01 * seed,
                         "eval_target_tokens": 1000, "final_train_loss": base + 0.1,
                         "final_train_loss_se": 0.004, "median_s_per_step": 0.5,
                         "median_s_per_step_se": 0.01, "tokens_per_s": 1000.0, "mfu": None})
    return pd.DataFrame(rows)


def test_summary_has_mean_sd_n_and_the_noise_behind_the_precision(tmp_path):
    summary = compare_variants.summarize(runs_frame(), ["v1", "v2", "v3"]).set_index("variant")
    assert list(summary["n_seeds"]) == [3, 3, 1] and summary.loc["v1", "seeds"] == "0 1 2"
    assert summary.loc["v1", "eval_loss_after_mean"] == pytest.approx(2.01)
    assert summary.loc["v1", "eval_loss_after_sd"] == pytest.approx(0.01)
    assert summary.loc["v1", "eval_loss_after_noise"] == pytest.approx(0.01)  # the spread
    # one seed: no spread; the precision comes from the run's own standard error
    assert math.isnan(summary.loc["v3", "eval_loss_after_sd"])
    assert summary.loc["v3", "eval_loss_after_noise"] == 0.02
    assert summary.loc["v3", "final_train_loss_noise"] == 0.004
    assert summary.loc["v3", "eval_accuracy_after_noise"] == pytest.approx(math.sqrt(0.3 * 0.7 / 1000))
    assert summary.loc["v3", "tokens_per_s_noise"] == pytest.approx(1000 * 0.01 / 0.5)
    assert pd.isna(summary.loc["v1", "mfu_mean"])


def test_every_comparison_and_every_variant_against_its_parent_once(tmp_path):
    pairs = compare_variants.comparison_pairs(
        ["v1", "v2", "v3"], [{"name": "img1", "variants": ["v2", "v1"]},
                             {"name": "three", "variants": ["v3", "v1", "v2"]}],
        {"v1": None, "v2": "v1", "v3": "v1"})
    assert pairs == [("v2", "v1", "img1, v2 from v1"), ("v3", "v1", "three, v3 from v1"),
                     ("v3", "v2", "three")]


def test_comparisons_csv_through_main(tmp_path):
    metrics = tmp_path / "metrics.csv"
    runs_frame().to_csv(metrics, index=False)
    out = {"summary": str(tmp_path / "summary.csv"), "comparisons": str(tmp_path / "comparisons.csv"),
           "sweeps": str(tmp_path / "sweeps.csv")}
    compare_variants.main(fake_snakemake(
        input={"metrics": str(metrics)}, output=out, log={"log": str(tmp_path / "log")},
        params={"variants": ["v1", "v2", "v3"], "comparisons": [], "parents": {"v2": "v1", "v3": "v1"},
                "sweeps": {}}))
    rows = pd.read_csv(out["comparisons"]).set_index(["a", "b", "metric"])
    v2 = rows.loc[("v2", "v1", "eval_loss_after")]
    # v2 - v1 = -0.1 in every seed: no spread, an exact difference
    assert v2["test"] == "paired t-test" and v2["difference"] == pytest.approx(-0.1) and v2["detected"]
    v3 = rows.loc[("v3", "v1", "eval_loss_after")]
    assert v3["test"] == "none" and math.isnan(v3["ci_low"])  # 1 seed against 3: no interval
    assert v3["verdict"].startswith("eval loss: v3 − v1 = 0.490; no confidence interval with 1 and 3 seeds")
    assert set(rows.index.get_level_values("metric")) == {"eval_loss_after", "eval_accuracy_after"}
