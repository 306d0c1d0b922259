"""The verdict's statistics as small pure numpy functions (definitions: docs/analysis.md, "The verdict").

* `gold_at_kl`: a run's gold reward where its eval trajectory first reaches a KL level, read from a monotone cubic
  (Fritsch and Carlson 1980) through its eval points in d = √KL, the coordinate in which gold against KL is close to
  straight (Gao et al. 2022: gold ≈ d(α − β log d) under RL); a straight chord in KL reads a concave curve low.
* `bootstrap`: the one interval method of the report, a hierarchical bootstrap: seeds are drawn with replacement
  within each method, then prompts, one draw shared by every run (every policy is scored on the same prompts with
  the same sampling seed, so a difference between methods is paired by prompt). Values measured per run only
  (seconds, FLOPs, held-out accuracy) are resampled over seeds alone.
* `paired_difference`, `proportion_difference`: the tuning sweep's comparisons of a grid point with the chosen one.
* `seeds_for_power`, `verdict_words`: how many seeds would resolve the observed difference, and the sentence.
* `fit_gao`: the over-optimisation forms of Gao et al. (2022), fitted by least squares.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

Z975, Z80 = 1.959964, 0.841621  # standard normal quantiles: 95% two-sided, 80% power


def _knot_slopes(d_left, d_right, h_left, h_right, has_left, has_right):
    """Fritsch-Carlson slope at a knot from its two secants (weighted harmonic mean, as in scipy's PCHIP): 0 where
    they differ in sign (a local extremum stays one), the one secant where the knot has a single neighbour."""
    with np.errstate(divide="ignore", invalid="ignore"):
        w1, w2 = 2 * h_right + h_left, h_right + 2 * h_left
        harmonic = (w1 + w2) / (w1 / d_left + w2 / d_right)
    both = has_left & has_right
    same_sign = both & (d_left * d_right > 0)
    return np.where(same_sign, harmonic, np.where(both, 0.0, np.where(has_left, d_left, d_right)))


def gold_at_kl(kl, gold, level):
    """Gold reward at the first eval point where KL reaches `level`, interpolated in d = √KL by a monotone cubic.

    `kl`, `gold`: [..., E], each run's eval points in step order; `level`: broadcastable to [...]. The segment read
    is [i−1, i], i the first point with KL ≥ level; its Hermite cubic uses the Fritsch-Carlson slopes of its two
    knots, from the neighbouring segments where d increases along them. Monotone data give a monotone curve (no
    overshoot) that bends with the points, where a chord cannot. The first point's value if it already reaches the
    level; NaN where the trajectory never does.
    """
    d = np.sqrt(np.clip(np.asarray(kl, dtype=float), 0, None))
    y = np.asarray(gold, dtype=float)
    target = np.sqrt(np.clip(np.asarray(level, dtype=float), 0, None))[..., None]
    E = d.shape[-1]
    shape = (*np.broadcast_shapes(d.shape[:-1], y.shape[:-1], target.shape[:-1]), E)
    d, y = np.broadcast_to(d, shape), np.broadcast_to(y, shape)
    reached = d >= target
    i = np.argmax(reached, axis=-1)[..., None]  # the first point at the level (0 where none is)

    def at(k):  # values at index k (clipped into range), and whether k is in range
        kc = np.clip(k, 0, E - 1)
        inside = ((k >= 0) & (k < E))[..., 0]
        return np.take_along_axis(d, kc, -1)[..., 0], np.take_along_axis(y, kc, -1)[..., 0], inside

    (x0, y0, _), (x1, y1, _) = at(i - 1), at(i)
    (xp, yp, has_p), (xn, yn, has_n) = at(i - 2), at(i + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = x1 - x0
        secant = (y1 - y0) / h
        h_p, h_n = x0 - xp, xn - x1
        has_p, has_n = has_p & (h_p > 0), has_n & (h_n > 0)  # a neighbour counts where d grows along it
        secant_p, secant_n = (y0 - yp) / h_p, (yn - y1) / h_n
        m0 = _knot_slopes(secant_p, secant, h_p, h, has_p, np.ones_like(has_p))
        m1 = _knot_slopes(secant, secant_n, h, h_n, np.ones_like(has_n), has_n)
        t = (target[..., 0] - x0) / h
        value = ((2 * t**3 - 3 * t**2 + 1) * y0 + (t**3 - 2 * t**2 + t) * h * m0 + (-2 * t**3 + 3 * t**2) * y1
                 + (t**3 - t**2) * h * m1)
    i = i[..., 0]
    return np.where(~reached.any(axis=-1), np.nan, np.where(i == 0, y[..., 0], value))


# --- the bootstrap -----------------------------------------------------------------------------------------------


@dataclass
class Draws:
    """One bootstrap's random draws, shared by every statistic of a report so that they are resampled together:
    prompt weights [reps, P] (multinomial counts / P) and, per group size n, seed indices [reps, n]."""
    prompt_weights: np.ndarray
    rng: np.random.Generator
    _seeds: dict

    @classmethod
    def make(cls, n_prompts: int, reps: int, seed: int) -> "Draws":
        rng = np.random.default_rng(seed)
        weights = rng.multinomial(n_prompts, np.full(n_prompts, 1 / n_prompts), size=reps) / n_prompts
        return cls(weights, rng, {})

    @property
    def reps(self) -> int:
        return self.prompt_weights.shape[0]

    def seeds(self, key, n: int) -> np.ndarray:
        """Seed indices [reps, n] of group `key`'s n runs, drawn once (every statistic of a group reuses them)."""
        if (key, n) not in self._seeds:
            self._seeds[key, n] = self.rng.integers(0, n, size=(self.reps, n))
        return self._seeds[key, n]


def prompt_means(values: np.ndarray, draws: Draws) -> np.ndarray:
    """A run's per-prompt values [..., P] -> their mean under every replicate's prompt weights, [reps, ...]; values
    without a prompt axis (P = 1: a run-level number) are the same in every replicate."""
    values = np.asarray(values, dtype=float)
    if values.shape[-1] == 1:
        return np.broadcast_to(values[..., 0], (draws.reps, *values.shape[:-1]))
    return np.moveaxis(values @ draws.prompt_weights.T, -1, 0)


def seed_mean(per_run: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """[reps, n_runs, ...] run values -> [reps, ...] the mean over each replicate's drawn seeds (NaN-aware: a run
    without a value leaves the others' mean)."""
    reps = np.arange(per_run.shape[0])[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice": no drawn run has a value
        return np.nanmean(per_run[reps, seeds], axis=1)


def interval(replicates: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval of bootstrap replicates (NaN replicates left out; NaN where none is left)."""
    r = np.asarray(replicates, dtype=float)
    r = r[~np.isnan(r)]
    if r.size == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(r, [0.025, 0.975])
    return float(lo), float(hi)


def bootstrap_mean(values: list[np.ndarray], draws: Draws, key) -> dict[str, float]:
    """Mean over runs of each run's prompt mean, with its 95% hierarchical bootstrap interval: n, mean, std (between
    runs, of their prompt means), lo, hi. `values`: one array per run, [P] per prompt or [1] run-level. One run with
    run-level values has no interval."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "lo": math.nan, "hi": math.nan}
    observed = np.array([np.nanmean(v) for v in values])
    lo = hi = math.nan
    if n > 1 or np.asarray(values[0]).size > 1:
        per_run = np.stack([prompt_means(np.asarray(v, dtype=float)[None], draws)[:, 0] for v in values], axis=1)
        lo, hi = interval(seed_mean(per_run, draws.seeds(key, n)))
    return {"n": n, "mean": float(np.nanmean(observed)),
            "std": float(np.nanstd(observed, ddof=1)) if n > 1 else math.nan, "lo": lo, "hi": hi}


@dataclass
class MatchedKL:
    """Gold at matched KL, observed and bootstrapped: `level` (observed) and `levels` [reps] the matched KL,
    `fractions` the levels read as fractions of it; per method, `per_run` [n_runs, F] the observed values and
    `replicates` [reps, F] the bootstrap's method means."""
    level: float
    levels: np.ndarray
    fractions: np.ndarray
    per_run: dict[str, np.ndarray]
    replicates: dict[str, np.ndarray]


def matched_kl(curves: dict[str, list[tuple[np.ndarray, np.ndarray]]], compared: list[str], fractions, draws: Draws,
               fixed_level: float | None = None) -> MatchedKL:
    """Each method's mean gold reward at fractions of the matched KL, observed and under every bootstrap replicate.

    `curves`: per method, one (kl, gold) per run, each [E, P] (its E eval points in step order, per prompt; P = 1
    for a run without per-prompt values). The matched KL is `fixed_level`, or the largest KL every run of the
    `compared` methods reaches (the minimum over those runs of their largest eval KL), recomputed in every replicate
    from its own draws: the bootstrap repeats the whole estimator, the choice of level included.
    """
    fractions = np.asarray(fractions, dtype=float)
    observed = {m: [(np.nanmean(k, -1), np.nanmean(g, -1)) for k, g in runs] for m, runs in curves.items()}
    boot = {m: [(prompt_means(k, draws), prompt_means(g, draws)) for k, g in runs] for m, runs in curves.items()}
    seeds = {m: draws.seeds(("runs", m), len(runs)) for m, runs in curves.items() if runs}
    reps = np.arange(draws.reps)[:, None]
    if fixed_level is not None:
        level, levels = float(fixed_level), np.full(draws.reps, float(fixed_level))
    else:
        level = min(float(np.max(k)) for m in compared for k, _ in observed[m])
        levels = np.min([np.stack([k.max(-1) for k, _ in boot[m]], axis=1)[reps, seeds[m]].min(axis=1)
                         for m in compared], axis=0)
    per_run, replicates = {}, {}
    for m, runs in curves.items():
        if not runs:
            continue
        per_run[m] = np.stack([gold_at_kl(k, g, level * fractions) for k, g in observed[m]])  # [n_runs, F]
        values = np.stack([gold_at_kl(k[:, None, :], g[:, None, :], levels[:, None] * fractions[None, :])
                           for k, g in boot[m]], axis=1)  # [reps, n_runs, F]
        replicates[m] = seed_mean(values, seeds[m])
    return MatchedKL(level, levels, fractions, per_run, replicates)


def paired_difference(a: np.ndarray, b: np.ndarray, draws: Draws) -> tuple[float, float, float]:
    """Mean of a − b over prompts both were scored on, with the 95% interval of the report's prompt bootstrap (one
    run each: the interval holds the prompts' variation, not the seeds')."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return (float(d.mean()), *interval(prompt_means(d, draws)))


def proportion_difference(p_a: float, p_b: float, n: int) -> tuple[float, float, float]:
    """p_a − p_b of two accuracies on n items each, with the normal approximation's 95% interval, as if unpaired:
    where both score the same items the true interval is narrower, so "not distinguishable" errs towards caution."""
    se = math.sqrt((p_a * (1 - p_a) + p_b * (1 - p_b)) / n)
    return p_a - p_b, p_a - p_b - Z975 * se, p_a - p_b + Z975 * se


# --- the verdict's words ------------------------------------------------------------------------------------------


def seeds_for_power(difference: float, sd_a: float, sd_b: float, power_z: float = Z80) -> float:
    """Seeds per method for a two-sided 5% test of a difference of this size to have 80% power, from the observed
    between-seed standard deviations (normal approximation): n = (z_0.975 + z_0.8)² (sd_a² + sd_b²) / difference².
    NaN where a standard deviation is unknown (one seed); inf for no difference."""
    if any(math.isnan(x) for x in (difference, sd_a, sd_b)):
        return math.nan
    if difference == 0:
        return math.inf
    return float(math.ceil((Z975 + power_z) ** 2 * (sd_a**2 + sd_b**2) / difference**2))


def verdict_words(lo: float, hi: float, n_a: int, n_b: int, a: str = "PPO", b: str = "DPO") -> str:
    """The verdict in words: `a` ahead, `b` ahead, or not distinguishable at this many seeds; no verdict from one
    seed of either (its interval would hold the eval prompts' variation only, not the seeds')."""
    if min(n_a, n_b) < 2:
        few = a if n_a < 2 else b
        return (f"No verdict: {few} has {min(n_a, n_b)} seed, so no interval can include the variation between "
                "seeds; run more seeds (`seeds:` in the profile).")
    at = f"at {n_a} {a} and {n_b} {b} seeds"
    if math.isnan(lo) or math.isnan(hi):
        return f"No verdict: the interval could not be computed {at}."
    if lo > 0:
        return f"{a} ahead: the 95% interval of {a} − {b} lies above 0 {at}."
    if hi < 0:
        return f"{b} ahead: the 95% interval of {a} − {b} lies below 0 {at}."
    return f"Not distinguishable {at}: the 95% interval of {a} − {b} contains 0."


# --- over-optimisation --------------------------------------------------------------------------------------------

GAO_FORMS = {"rl": "R(d) = d(α − β log d)", "bon": "R(d) = d(α − β d)"}


def fit_gao(d, gain, form: str) -> tuple[float, float]:
    """Least-squares (α, β) of Gao et al.'s (2022) gain forms through the origin, d = √KL: RL R(d) = d(α − β log d),
    Best-of-N R(d) = d(α − β d). Both are linear in (α, β)."""
    d, gain = np.asarray(d, dtype=float), np.asarray(gain, dtype=float)
    keep = ~(np.isnan(d) | np.isnan(gain))
    d, gain = d[keep], gain[keep]
    with np.errstate(divide="ignore", invalid="ignore"):
        second = np.where(d > 0, -d * np.log(d), 0.0) if form == "rl" else -d**2
    (alpha, beta), *_ = np.linalg.lstsq(np.stack([d, second], axis=1), gain, rcond=None)
    return float(alpha), float(beta)


def gao_curve(d, alpha: float, beta: float, form: str) -> np.ndarray:
    d = np.asarray(d, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d > 0, d * (alpha - beta * (np.log(d) if form == "rl" else d)), 0.0)
