"""analysis/stats.py: the verdict's estimator and intervals against hand computations and synthetic runs whose true
gold-KL curve is known. Offline, numpy only, a few seconds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis import stats as S
from analysis.metrics import first_crossing


def test_gold_at_kl_by_hand():
    d = np.array([0.0, 1.0, 2.0, 3.0])
    # gold linear in d = √KL is read exactly wherever it is read
    assert S.gold_at_kl(d**2, 0.1 * d, 2.25) == pytest.approx(0.15)
    # gold 0, 1, 2, 2: secants 1, 1, 0. At d = 1.5 (KL 2.25), segment [1, 2]: the slope at d = 1 is 1 (both secants
    # 1), at d = 2 it is 0 (the secants 1 and 0 differ in sign: a flat top stays flat). Hermite at t = 1/2:
    # 0.5·1 + 0.125·1·1 + 0.5·2 − 0.125·1·0 = 1.625 (a chord would say 1.5, and never overshoots 2 either).
    gold = np.array([0.0, 1.0, 2.0, 2.0])
    assert S.gold_at_kl(d**2, gold, 2.25) == pytest.approx(1.625)
    along = S.gold_at_kl(d**2, gold, np.linspace(4, 9, 11))  # monotone data, monotone and bounded curve
    assert np.all(np.diff(along) >= -1e-12) and along.max() <= 2 + 1e-12
    assert S.gold_at_kl(d**2, gold, 0.0) == 0.0  # the first point already at the level
    assert math.isnan(S.gold_at_kl(d**2, gold, 9.5))  # never reached
    # a trajectory whose KL dips: the first crossing counts (KL 4 is first reached between points 1 and 2)
    assert S.gold_at_kl([0, 9, 1, 16], [0, 3, 1, 4], 4) == pytest.approx(S.gold_at_kl([0, 9], [0, 3], 4))
    # vectorised over runs and levels: [2 runs] x [3 levels]
    both = S.gold_at_kl(
        np.stack([d**2, d**2])[:, None, :], np.stack([0.1 * d, gold])[:, None, :], np.array([[1.0, 2.25, 4.0]])
    )
    assert both.shape == (2, 3) and both[1, 1] == pytest.approx(1.625) and both[0, 0] == pytest.approx(0.1)


def concave(kl, a=0.35, b=0.08):
    """A gold-KL curve of Gao et al.'s RL form in d = √KL: concave in KL (and in d)."""
    d = np.sqrt(kl)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d > 0, d * (a - b * np.log(np.where(d > 0, d, 1))), 0.0)


def test_gold_at_kl_is_unbiased_where_the_chord_is_not():
    """Runs with 5 eval points on a known concave curve, noisy: the monotone cubic in √KL reads gold at KL 3 within
    0.005 on average over repeats (measured: +0.0003); the straight chord in KL reads it low (measured: −0.017)."""
    rng = np.random.default_rng(0)
    level, truth = 3.0, float(concave(3.0))
    cubic, chord = [], []
    for _ in range(400):
        kl = np.array([0.0, 1.2, 4.0, 8.5, 14.0]) * rng.uniform(0.8, 1.2)  # where eval points fall varies
        gold = concave(kl) + rng.normal(0, 0.01, kl.size)
        cubic.append(S.gold_at_kl(kl, gold, level))
        chord.append(first_crossing(kl, gold, level))  # the old estimator: a chord in KL
    bias_cubic, bias_chord = np.mean(cubic) - truth, np.mean(chord) - truth
    se = np.std(cubic) / math.sqrt(len(cubic))
    assert abs(bias_cubic) < 0.005 and abs(bias_cubic) < 4 * se + 0.002, bias_cubic
    assert bias_chord < -0.01 and bias_chord < -10 * se, (bias_chord, se)  # low, far beyond its noise


def test_bootstrap_mean_by_hand():
    draws = S.Draws.make(4, 500, seed=0)
    # run-level values: seeds only; identical runs give a degenerate interval at their value
    same = S.bootstrap_mean([np.array([0.3]), np.array([0.3])], draws, "g")
    assert (same["n"], same["mean"], same["lo"], same["hi"]) == (2, 0.3, 0.3, 0.3)
    assert math.isnan(S.bootstrap_mean([np.array([0.3])], draws, "g")["lo"])  # one run-level value: no interval
    # per-prompt values of one run: the interval is over its prompts and lies inside their range
    one = S.bootstrap_mean([np.array([0.0, 1.0, 2.0, 3.0])], draws, "h")
    assert one["mean"] == 1.5 and 0 <= one["lo"] < 1.5 < one["hi"] <= 3
    weights = draws.prompt_weights
    assert weights.shape == (500, 4) and np.allclose(weights.sum(1), 1)


def test_words_by_hand():
    assert S.verdict_words(0.01, 0.2, 3, 4).startswith("PPO ahead")
    assert S.verdict_words(-0.2, -0.01, 3, 4).startswith("DPO ahead")
    assert S.verdict_words(-0.1, 0.2, 3, 4) == (
        "Not distinguishable at 3 PPO and 4 DPO seeds: the 95% interval of PPO − DPO contains 0."
    )
    assert S.verdict_words(0.1, 0.2, 1, 4).startswith("No verdict: PPO has 1 seed")


def test_at_levels_by_hand():
    """A run's value at a level is gold_at_kl of its prompt means; its pseudo-values average to it where gold is
    linear in the prompts' values; a run short of a level counts with its last eval point, flagged."""
    d = np.array([0.0, 1.0, 2.0, 3.0])
    kl = np.repeat((d**2)[:, None], 4, axis=1)  # [E, P]: every prompt at the same KL
    gold = 0.1 * d[:, None] + np.array([0.0, 0.2, -0.1, 0.3])[None, :]  # gold linear in d, a prompt effect
    value, pseudo, reached = S.at_levels(kl, gold, [2.25, 16.0])
    assert value.tolist() == pytest.approx([0.15 + 0.1, 0.3 + 0.1])  # 0.1 is the prompts' mean effect
    assert reached.tolist() == [True, False]  # KL 16 is beyond its last point (9): gold there, 0.3 + 0.1
    # linear in d, a constant prompt effect: pseudo-value of prompt p = the run's curve + that prompt's effect
    assert pseudo[0].tolist() == pytest.approx([0.15, 0.35, 0.05, 0.45])
    assert pseudo.mean(-1).tolist() == pytest.approx(value.tolist())
    assert pseudo[1].tolist() == pytest.approx(gold[-1].tolist())  # short of the level: its last point, per prompt
    one, one_pseudo, _ = S.at_levels(kl[:, :1], gold[:, :1], [2.25])  # means only: no prompt axis to jackknife
    assert one_pseudo.shape == (1, 1) and one_pseudo[0, 0] == one[0]


def test_t_contrast_is_welch_by_hand():
    """Without a prompt term: Welch's interval and p, as scipy computes them from the same values."""
    from scipy.stats import ttest_ind

    a, b = np.array([0.41, 0.30, 0.33]), np.array([0.50, 0.52, 0.44, 0.47])
    c = S.t_contrast([a, b], None)
    ref = ttest_ind(a, b, equal_var=False)
    lo, hi = ref.confidence_interval(0.95)
    assert (float(c.estimate), float(c.lo), float(c.hi), float(c.p)) == pytest.approx(
        (a.mean() - b.mean(), lo, hi, ref.pvalue)
    )
    # by hand: se² = 0.003033/3 + 0.001233/4 and Welch–Satterthwaite's df
    va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 4
    assert float(c.df) == pytest.approx((va + vb) ** 2 / (va**2 / 2 + vb**2 / 3))
    one = S.t_mean([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975; 2) = 4.30265: 2 ± 4.30265/√3 = 2 ± 2.48414
    assert (one["mean"], one["std"], one["lo"], one["hi"]) == pytest.approx((2, 1, 2 - 2.48414, 2 + 2.48414), abs=1e-5)
    assert math.isnan(S.t_mean([0.3])["lo"]) and S.t_mean([0.3, 0.3])["lo"] == 0.3


def test_t_contrast_prompt_term_by_hand():
    """Pseudo-values = seed effect + a prompt × method effect, no noise: the residual mean square is 0 and the prompt
    term is the variance over prompts of the two methods' prompt effects' difference, over P."""
    seeds_a, seeds_b = np.array([0.0, 0.1]), np.array([0.2, 0.0, 0.1])
    effect_a, effect_b = np.array([0.3, -0.1, 0.0, 0.2]), np.array([0.1, 0.1, -0.2, 0.0])
    pa, pb = seeds_a[:, None] + effect_a[None, :], seeds_b[:, None] + effect_b[None, :]
    c = S.t_contrast([pa.mean(-1), pb.mean(-1)], [pa, pb])
    assert [float(m) for m in c.noise_ms] == pytest.approx([0.0, 0.0], abs=1e-15)
    assert float(c.prompt_var) == pytest.approx(np.var(effect_a - effect_b, ddof=1) / 4)
    assert float(c.seed_var) == pytest.approx(seeds_a.var(ddof=1) / 2 + seeds_b.var(ddof=1) / 3)
    # identical prompt effects cancel in the difference (the paired design): no prompt term
    same = S.t_contrast([pa.mean(-1), pa.mean(-1) - 0.1], [pa, pa - 0.1])
    assert float(same.prompt_var) == pytest.approx(0.0, abs=1e-15)
    # noise alone (no interaction): its residual mean square is subtracted, the term floors at 0, nothing twice
    rng = np.random.default_rng(0)
    na, nb = rng.normal(0, 0.3, (3, 200)), rng.normal(0, 0.3, (3, 200))
    noisy = S.t_contrast([na.mean(-1), nb.mean(-1)], [na, nb])
    assert float(noisy.noise_ms[0]) == pytest.approx(0.09, rel=0.15) and float(noisy.prompt_var) < 0.09 / 200 / 3


def test_holm_power_and_sd_limits_by_hand():
    assert S.holm([0.01, 0.04, 0.03]).tolist() == pytest.approx([0.03, 0.06, 0.06])  # 3·0.01, max(2·0.03, ...)
    # the textbook two-sample t-test: effect size 1 (sd 1) needs 17 per group for 80% power, 0.5 needs 64 (Welch's
    # df equals the pooled test's where the sds are equal)
    assert S.seeds_for_power(1.0, 1.0, 1.0) == 17 and S.seeds_for_power(0.5, 1.0, 1.0) == 64
    assert S.t_power(1.0, 1.0, 1.0, 17) == pytest.approx(0.807, abs=0.002)
    # at 2-3 seeds and a large noncentrality (where scipy's nct returns NaN): smaller sds never ask for more seeds
    for n in (2, 3, 4):
        assert 0 < S.t_power(0.245, 0.007, 0.071, n) <= S.t_power(0.245, 0.0043, 0.043, n) <= 1
    assert S.seeds_for_power(0.245, 0.0043, 0.043) <= S.seeds_for_power(0.245, 0.007, 0.071) == 3
    assert math.isnan(S.seeds_for_power(0.05, math.nan, 0.04)) and S.seeds_for_power(0.0, 0.1, 0.1) == math.inf
    # a prompt term that alone leaves the test short: no number of seeds resolves it
    assert S.seeds_for_power(0.05, 0.01, 0.01, prompt_var=0.03**2, n_prompts=128) == math.inf
    lo, hi = S.sd_limits(1.0, 3)  # √(2/χ²(0.9; 2)), √(2/χ²(0.1; 2)) = √(2/4.605), √(2/0.2107)
    assert (lo, hi) == pytest.approx((0.6590, 3.0808), abs=1e-4)


def test_gao_fits_recover_known_coefficients():
    rng = np.random.default_rng(3)
    d = np.linspace(0, 4, 30)
    rl = d * (0.9 - 0.3 * np.log(np.where(d > 0, d, 1))) + rng.normal(0, 0.01, d.size)
    bon = d * (0.8 - 0.15 * d) + rng.normal(0, 0.01, d.size)
    assert S.fit_gao(d, rl, "rl") == pytest.approx((0.9, 0.3), abs=0.02)
    assert S.fit_gao(d, bon, "bon") == pytest.approx((0.8, 0.15), abs=0.02)
    assert S.gao_curve([0.0, 1.0], 0.9, 0.3, "rl").tolist() == pytest.approx([0.0, 0.9])
