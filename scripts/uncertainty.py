"""Numbers with their noise: mean and spread over seeds, the precision a number can be printed
to, and the confidence interval of a difference between two variants (scipy's t-tests).

A variant's runs differ only by training seed (LoRA initialisation, data order, dropout), so the
spread over seeds is the noise a difference between variants has to beat. Runs of two variants
with the same seed share their data order, so their difference seed by seed (a paired test)
leaves that part of the noise out.
"""

import math
from dataclasses import dataclass

from scipy import stats

CONFIDENCE = 0.95


def mean_sd(values):
    """(mean, sample standard deviation or None for a single value, n)."""
    values = [float(v) for v in values]
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, sd, n


def decimals_for(noise):
    """Decimal places that show a number with noise `noise` honestly: the noise rounded to two
    significant digits when they start with 1 or 2 (0.025), otherwise to one (0.06), and the
    number to the same place; negative for tens, hundreds (1,533 -> -2: 1,500). None or 0 (no
    noise known): None."""
    if noise is None or not math.isfinite(noise) or noise <= 0:
        return None
    exponent = math.floor(math.log10(noise))
    leading = noise / 10**exponent
    significant = 2 if leading < 3 else 1
    return significant - 1 - exponent


def fixed(value, decimals, fallback=4, thousands=False):
    """value to `decimals` places (fallback when the noise is unknown); negative decimals round
    to tens, hundreds, ... ("3,300")."""
    places = fallback if decimals is None else decimals
    separator = "," if thousands else ""
    if places < 0:
        return f"{round(value, places):{separator}.0f}"
    return f"{value:{separator}.{places}f}"


def bound(value, decimals):
    """An interval's bound: fixed(), except that a bound that is not zero but would print as 0
    or -0 ("95% CI -0.0000 to 0.0049") gets its first significant digit (-0.00002), so the
    line shows which side of zero it is on."""
    text = fixed(value, decimals)
    if value == 0 or float(text) != 0:
        return text
    return fixed(value, -math.floor(math.log10(abs(value))))


@dataclass(frozen=True)
class Difference:
    """a - b for one metric, and how sure it is."""

    difference: float
    ci_low: float | None  # None: no interval (too few seeds)
    ci_high: float | None
    p_value: float | None
    test: str  # "paired t-test", "Welch's t-test" or "none"
    seeds: tuple  # the seeds compared: the shared ones when paired
    n_a: int
    n_b: int

    @property
    def detected(self):
        """Whether the interval excludes zero."""
        return self.ci_low is not None and (self.ci_low > 0 or self.ci_high < 0)


def compare(a, b, confidence=CONFIDENCE):
    """The difference of the means of a and b ({seed: value} each) with its confidence interval.

    Paired by seed (scipy.stats.ttest_rel) when at least two seeds are shared: same seed, same
    data order. Otherwise Welch's t-test (unequal variances; scipy.stats.ttest_ind) when each side
    has two runs or more; otherwise no interval.
    """
    shared = sorted(set(a) & set(b))
    if len(shared) >= 2:
        xs, ys = [a[s] for s in shared], [b[s] for s in shared]
        differences = [x - y for x, y in zip(xs, ys)]
        mean, sd, n = mean_sd(differences)
        if sd <= 1e-12 * max(1.0, abs(mean)):  # the same difference in every pair (to rounding)
            return Difference(mean, mean, mean, None, "paired t-test", tuple(shared), len(a), len(b))
        result = stats.ttest_rel(xs, ys)
        interval = result.confidence_interval(confidence)
        return Difference(mean, float(interval.low), float(interval.high), float(result.pvalue),
                          "paired t-test", tuple(shared), len(a), len(b))
    xs, ys = list(a.values()), list(b.values())
    difference = mean_sd(xs)[0] - mean_sd(ys)[0]
    if len(xs) >= 2 and len(ys) >= 2:
        result = stats.ttest_ind(xs, ys, equal_var=False)
        interval = result.confidence_interval(confidence)
        if math.isfinite(interval.low):
            return Difference(difference, float(interval.low), float(interval.high),
                              float(result.pvalue), "Welch's t-test",
                              tuple(sorted(set(a) | set(b))), len(a), len(b))
    return Difference(difference, None, None, None, "none", tuple(sorted(set(a) | set(b))),
                      len(a), len(b))


def interval_decimals(difference, noise_floor=None):
    """Decimals for a difference: from its interval's half-width, else from `noise_floor` (the
    within-run standard errors of the two numbers, combined)."""
    if difference.ci_low is not None and difference.ci_high > difference.ci_low:
        return decimals_for((difference.ci_high - difference.ci_low) / 2)
    return decimals_for(noise_floor)


def verdict(difference, a, b, what, lower="lower", higher="higher", noise_floor=None):
    """One line that concludes, e.g. "eval loss: v2 lower than v1 by 0.031 (95% CI 0.012–0.050;
    paired t-test over seeds 0, 1, 2)" or "eval loss: no difference detectable with 3 seeds"."""
    places = interval_decimals(difference, noise_floor)
    seeds = ", ".join(map(str, difference.seeds))
    level = f"{100 * CONFIDENCE:.0f}% CI"
    if difference.test == "none":
        runs = ("1 seed each" if difference.n_a == difference.n_b == 1
                else f"{difference.n_a} and {difference.n_b} seeds")
        return (f"{what}: {a} − {b} = {fixed(difference.difference, places)}; no confidence "
                f"interval with {runs}: set training.seeds to several seeds (e.g. [0, 1, 2]) to "
                "know whether this is more than seed noise")
    test = (f"paired t-test over seeds {seeds}" if difference.test == "paired t-test"
            else f"Welch's t-test, {difference.n_a} vs {difference.n_b} seeds")
    if difference.detected and difference.ci_low == difference.ci_high:
        direction = lower if difference.difference < 0 else higher
        return (f"{what}: {a} {direction} than {b} by {fixed(abs(difference.difference), places)} "
                f"in every one of seeds {seeds}: no spread between seeds to test against")
    if difference.detected:
        direction = lower if difference.difference < 0 else higher
        low, high = sorted(abs(bound) for bound in (difference.ci_low, difference.ci_high))
        return (f"{what}: {a} {direction} than {b} by {fixed(abs(difference.difference), places)} "
                f"({level} {bound(low, places)}–{bound(high, places)}; {test})")
    n = len(difference.seeds) if difference.test == "paired t-test" else min(difference.n_a, difference.n_b)
    interval = ("" if difference.ci_low is None else
                f", {level} {bound(difference.ci_low, places)} to {bound(difference.ci_high, places)}")
    return (f"{what}: no difference detectable with {n} seeds ({a} − {b} = "
            f"{fixed(difference.difference, places)}{interval}; {test})")
