"""The verdict's statistics as small pure numpy functions (definitions and derivation: docs/analysis.md).

* `gold_at_kl`: a run's gold reward where its eval trajectory first reaches a KL level, read from a monotone cubic
  (Fritsch and Carlson 1980) through its eval points in d = √KL, the coordinate in which gold against KL is close to
  straight (Gao et al. 2022: gold ≈ d(α − β log d) under RL); a straight chord in KL reads a concave curve low.
* `at_levels`, `t_contrast`: the one interval behind every comparison the report words: each run read at fixed KL
  levels with its prompt-jackknife pseudo-values, then Welch's t over the per-run values with a term for the shared
  eval prompts (the prompt × method interaction). Its coverage at 2-8 seeds: analysis/coverage.py. `t_mean`: the
  same over run-level numbers; `holm`: a family of such tests.
* `t_power`, `seeds_for_power`, `sd_limits`: seeds per method for 80% power of that test, from the noncentral t,
  and how uncertain the between-seed sds behind it are.
* `Draws`, `bootstrap_mean`: the hierarchical bootstrap (seeds, then prompts) behind the plots' bands only.
* `paired_difference`, `proportion_difference`: the tuning sweep's comparisons of a grid point with the chosen one.
* `fit_gao`: the over-optimisation forms of Gao et al. (2022), fitted by least squares.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.stats import chi2, norm
from scipy.stats import t as t_dist

Z975 = 1.959964  # the standard normal's 97.5% quantile


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
        value = (
            (2 * t**3 - 3 * t**2 + 1) * y0
            + (t**3 - 2 * t**2 + t) * h * m0
            + (-2 * t**3 + 3 * t**2) * y1
            + (t**3 - t**2) * h * m1
        )
    i = i[..., 0]
    return np.where(~reached.any(axis=-1), np.nan, np.where(i == 0, y[..., 0], value))


# --- the bootstrap (the plots' bands) ---------------------------------------------------------------------------


@dataclass
class Draws:
    """One bootstrap's random draws, shared by every statistic of a report so that they are resampled together:
    prompt weights [reps, P] (multinomial counts / P) and, per group size n, seed indices [reps, n]."""

    prompt_weights: np.ndarray
    rng: np.random.Generator
    _seeds: dict

    @classmethod
    def make(cls, n_prompts: int, reps: int, seed: int) -> Draws:
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
    return {
        "n": n,
        "mean": float(np.nanmean(observed)),
        "std": float(np.nanstd(observed, ddof=1)) if n > 1 else math.nan,
        "lo": lo,
        "hi": hi,
    }


# --- the verdict's interval: Welch's t over per-run values, with a prompt term ------------------------------------


def at_levels(kl, gold, levels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs read at fixed KL levels: each run's value, its prompt-jackknife pseudo-values, and whether it got there.

    `kl`, `gold`: [..., E, P], each run's eval points in step order, per prompt (P = 1: means only); `levels`: [L].
    A run's value at a level is `gold_at_kl` of its prompt means. A run whose mean KL never reaches a level counts with
    the gold of its last eval point (what it reached within its budget; `reached` says which), so no run is dropped.
    The pseudo-value of prompt p is P·value − (P − 1)·(the value with prompt p left out): their mean is the value
    (up to the jackknife's bias correction) and their spread over prompts is what the prompts contribute to it.
    Returns value [..., L], pseudo [..., L, P] and reached [..., L].
    """
    kl, gold, levels = (np.asarray(a, dtype=float) for a in (kl, gold, levels))
    P = kl.shape[-1]

    def read(k, g):  # [..., E] -> [..., L]
        v = gold_at_kl(k[..., None, :], g[..., None, :], levels)
        return np.where(np.isnan(v), g[..., -1:], v)

    km, gm = kl.mean(-1), gold.mean(-1)
    value = read(km, gm)
    reached = (km[..., None, :] >= levels[:, None]).any(-1)
    if P == 1:
        return value, value[..., None], reached
    left_out = [np.swapaxes((x.sum(-1, keepdims=True) - x) / (P - 1), -1, -2) for x in (kl, gold)]  # [..., P, E]
    pseudo = P * value[..., None] - (P - 1) * np.swapaxes(read(*left_out), -1, -2)
    return value, pseudo, reached


@dataclass
class Contrast:
    """Σ_i w_i·(mean of group i's run values), with its Welch interval (`t_contrast`). Arrays where the inputs carry
    leading experiment axes. `seed_var`: Σ w_i² s_i²/n_i; `prompt_var`: σ̂²_prompt/P, the prompts' share that the
    seeds' spread does not hold (0 without per-prompt values); `noise_ms`: per group, the residual mean square of its
    seed × prompt table of pseudo-values (a run's own prompt noise: its mean's variance is noise_ms/P)."""

    estimate: np.ndarray
    se: np.ndarray
    df: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    p: np.ndarray
    seed_var: np.ndarray
    prompt_var: np.ndarray
    noise_ms: list
    n_prompts: int


def t_contrast(values: list, pseudo: list | None, weights=(1.0, -1.0), confidence: float = 0.95) -> Contrast:
    """Welch's t-interval for a contrast of group means of per-run values, with a term for the shared prompts.

    `values`: per group, [..., n_i] each run's value (n_i ≥ 2); `pseudo`: per group, [..., n_i, P] its prompt
    pseudo-values (`at_levels`), or None. Model: pseudo-value of run j of group i on prompt p =
    μ_i + π_ip + s_ij + e_ijp (π_ip: the prompt's effect on group i, shared by its seeds; s_ij: the seed; e_ijp: noise).
    The seeds' spread s_i² holds Var(s) + Var(e)/P but not the π term, which every run of a group shares; the
    contrast's prompt term is estimated from D_p = Σ w_i·(group i's mean on prompt p): Var_p(D_p) holds Var(Σ w_i π_ip)
    plus Σ w_i² Var(e_i)/n_i, the latter estimated by each group's residual mean square and subtracted (floored at 0),
    so nothing is counted twice. se² = Σ w_i² s_i²/n_i + σ̂²_prompt/P, degrees of freedom by Welch–Satterthwaite.
    With shared prompts and identical prompt effects, π cancels in a difference (the paired design) and the term is
    the prompt × method interaction; for one group's mean (w = 1) it is the prompts' own variance.
    """
    values = [np.asarray(v, dtype=float) for v in values]
    w = np.asarray(weights, dtype=float)
    n = [v.shape[-1] for v in values]
    var = [v.var(-1, ddof=1) for v in values]
    estimate = sum(wi * v.mean(-1) for wi, v in zip(w, values))
    parts = [wi**2 * s2 / ni for wi, s2, ni in zip(w, var, n)]
    seed_var = sum(parts)
    prompt_var, noise_ms, P, prompt_df_term = np.zeros_like(seed_var), [], 1, 0.0
    if pseudo is not None and all(np.asarray(y).shape[-1] > 1 for y in pseudo):
        pseudo = [np.asarray(y, dtype=float) for y in pseudo]
        P = pseudo[0].shape[-1]
        for y, ni in zip(pseudo, n):
            resid = y - y.mean(-1, keepdims=True) - y.mean(-2, keepdims=True) + y.mean((-2, -1), keepdims=True)
            noise_ms.append((resid**2).sum((-2, -1)) / ((ni - 1) * (P - 1)))
        d_var = sum(wi * y.mean(-2) for wi, y in zip(w, pseudo)).var(-1, ddof=1)  # of D_p over the prompts
        noise = [wi**2 * ms / ni for wi, ms, ni in zip(w, noise_ms, n)]
        prompt_var = np.clip(d_var - sum(noise), 0, None) / P
        # Satterthwaite for a difference of mean squares: half the variance of the estimate. Var_p(D_p) has P − 1
        # degrees of freedom but holds the noise too, so where noise dominates the term is known far less well.
        prompt_df_term = np.where(
            prompt_var > 0,
            (d_var**2 / (P - 1) + sum(v**2 / ((ni - 1) * (P - 1)) for v, ni in zip(noise, n))) / P**2,
            0.0,
        )
    se2 = seed_var + prompt_var
    with np.errstate(divide="ignore", invalid="ignore"):
        df = se2**2 / (sum(p**2 / (ni - 1) for p, ni in zip(parts, n)) + prompt_df_term)
        se = np.sqrt(se2)
        half = np.where(se > 0, t_dist.ppf(0.5 + confidence / 2, df) * se, 0.0)  # identical runs: a point
        p = np.where(se > 0, 2 * t_dist.sf(np.abs(estimate) / se, df), np.where(estimate == 0, 1.0, 0.0))
    return Contrast(estimate, se, df, estimate - half, estimate + half, p, seed_var, prompt_var, noise_ms, P)


def t_mean(values) -> dict[str, float]:
    """Run-level values (seconds, FLOPs, a final metric) -> n, mean, between-run std and the 95% t-interval of the mean
    (`t_contrast` with one group and no prompt term); no interval from fewer than 2."""
    v = np.asarray(values, dtype=float)
    if v.size < 2:
        return {
            "n": v.size,
            "mean": float(v[0]) if v.size else math.nan,
            "std": math.nan,
            "lo": math.nan,
            "hi": math.nan,
        }
    c = t_contrast([v], None, weights=(1.0,))
    return {"n": v.size, "mean": float(v.mean()), "std": float(v.std(ddof=1)), "lo": float(c.lo), "hi": float(c.hi)}


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (family-wise error at most the level of the test)."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p)
    adjusted = np.maximum.accumulate(np.minimum(1.0, (p.size - np.arange(p.size)) * p[order]))
    out = np.empty_like(p)
    out[order] = adjusted
    return out


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


def t_power(difference: float, sd_a: float, sd_b: float, n: int, prompt_var: float = 0.0, n_prompts: int = 1) -> float:
    """Power of the two-sided 5% Welch test (`t_contrast`) with n seeds per method, for a true difference of this
    size: the noncentral t with Welch–Satterthwaite degrees of freedom. The seeds' sds are of per-run values; the
    prompt term (`Contrast.prompt_var`, variance of the difference's mean over the prompts) does not shrink with
    seeds."""
    seed = (sd_a**2 + sd_b**2) / n
    se2 = seed + prompt_var
    if se2 == 0:
        return 1.0 if difference else 0.0
    df = se2**2 / ((sd_a**4 + sd_b**4) / (n**2 * (n - 1)) + prompt_var**2 / max(n_prompts - 1, 1))
    crit, ncp = t_dist.ppf(0.975, df), abs(difference) / math.sqrt(se2)
    # P(|Z + ncp| > crit·√(V/df)), V ~ χ²(df), averaged over V's quantiles: the noncentral t's two tails, where
    # scipy's `nct` returns NaN at the few degrees of freedom and large noncentralities of 2-3 seeds
    v = chi2.ppf((np.arange(4000) + 0.5) / 4000, df) / df
    s = crit * np.sqrt(v)
    return float(np.mean(norm.sf(s - ncp) + norm.cdf(-s - ncp)))


def seeds_for_power(
    difference: float,
    sd_a: float,
    sd_b: float,
    prompt_var: float = 0.0,
    n_prompts: int = 1,
    power: float = 0.8,
    most: int = 1000,
) -> float:
    """The fewest seeds per method (≥ 2) whose Welch test has `power` for a true difference of this size (`t_power`).
    NaN where an sd is unknown (one seed); inf for no difference, or where the prompt term alone leaves the test short
    of `power` at `most` seeds (more eval prompts, not seeds, are then what it needs)."""
    if any(math.isnan(x) for x in (difference, sd_a, sd_b, prompt_var)):
        return math.nan
    if difference == 0:
        return math.inf
    for n in range(2, most + 1):
        if t_power(difference, sd_a, sd_b, n, prompt_var, n_prompts) >= power:
            return float(n)
    return math.inf


def sd_limits(sd: float, n: int, coverage: float = 0.8) -> tuple[float, float]:
    """The `coverage` confidence limits of a normal standard deviation estimated from n values (chi-square, n − 1
    degrees of freedom): at 3 seeds an sd is known only to within a factor of about 0.6 to 3 (80%)."""
    if n < 2 or math.isnan(sd):
        return math.nan, math.nan
    tail = (1 - coverage) / 2
    return (sd * math.sqrt((n - 1) / chi2.ppf(1 - tail, n - 1)), sd * math.sqrt((n - 1) / chi2.ppf(tail, n - 1)))


def verdict_words(lo: float, hi: float, n_a: int, n_b: int, a: str = "PPO", b: str = "DPO") -> str:
    """The verdict in words: `a` ahead, `b` ahead, or not distinguishable at this many seeds; no verdict from one
    seed of either (its interval would hold the eval prompts' variation only, not the seeds')."""
    if min(n_a, n_b) < 2:
        few = a if n_a < 2 else b
        return (
            f"No verdict: {few} has {min(n_a, n_b)} seed, so no interval can include the variation between "
            "seeds; run more seeds (`seeds:` in the profile)."
        )
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
        second = np.where(d > 0, -d * np.log(d), 0.0) if form == "rl" else -(d**2)
    (alpha, beta), *_ = np.linalg.lstsq(np.stack([d, second], axis=1), gain, rcond=None)
    return float(alpha), float(beta)


def gao_curve(d, alpha: float, beta: float, form: str) -> np.ndarray:
    d = np.asarray(d, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d > 0, d * (alpha - beta * (np.log(d) if form == "rl" else d)), 0.0)
