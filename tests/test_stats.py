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
    both = S.gold_at_kl(np.stack([d**2, d**2])[:, None, :], np.stack([0.1 * d, gold])[:, None, :],
                        np.array([[1.0, 2.25, 4.0]]))
    assert both.shape == (2, 3) and both[1, 1] == pytest.approx(1.625) and both[0, 0] == pytest.approx(0.1)


def concave(kl, a=0.35, b=0.08):
    """A gold-KL curve of Gao et al.'s RL form in d = √KL: concave in KL (and in d)."""
    d = np.sqrt(kl)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d > 0, d * (a - b * np.log(np.where(d > 0, d, 1))), 0.0)


def test_matched_kl_estimate_is_unbiased_where_the_chord_is_not():
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


def synthetic_method(rng, curve, n_seeds, prompt_effect, n_eval=7, seed_sd=0.03, noise_sd=0.15):
    """n_seeds runs of one method: per run [E, P] KL and gold. Seeds differ in speed (where their eval points fall
    in KL) and by a seed effect on gold; prompts share `prompt_effect` across every run (the paired design)."""
    runs = []
    P = prompt_effect.size
    for _ in range(n_seeds):
        kl_means = np.linspace(0, 12, n_eval) ** 1.3 / 12**0.3 * rng.uniform(0.85, 1.15)
        kl = kl_means[:, None] * rng.gamma(4.0, 0.25, size=(n_eval, P))  # per prompt, mean kl_means
        gold = curve(kl_means)[:, None] + rng.normal(0, seed_sd) + prompt_effect[None, :] + \
            rng.normal(0, noise_sd, size=(n_eval, P))
        runs.append((kl, gold))
    return runs


def test_bootstrap_interval_covers_the_true_difference():
    """Two methods with known curves (true PPO − DPO at KL 4 = concave(4, .35) − concave(4, .30)); 8 seeds each, 64
    prompts; over 150 repeats the 95% interval covers the truth in 85-99% of them (a percentile bootstrap over 8
    seeds runs a little short of 95%: measured 0.91), and the "ahead"/"not distinguishable" words follow the interval."""
    rng = np.random.default_rng(1)
    level = 4.0
    truth = float(concave(level, a=0.35) - concave(level, a=0.30))
    covered, words = 0, set()
    repeats = 150
    for r in range(repeats):
        prompts = rng.normal(0, 0.3, size=64)
        curves = {("ppo", 0.1): synthetic_method(rng, lambda k: concave(k, a=0.35), 8, prompts, seed_sd=0.1),
                  ("dpo", 0.1): synthetic_method(rng, lambda k: concave(k, a=0.30), 8, prompts, seed_sd=0.1)}
        draws = S.Draws.make(64, 300, seed=r)
        m = S.matched_kl(curves, list(curves), [1.0], draws, fixed_level=level)
        lo, hi = S.interval(m.replicates[("ppo", 0.1)][:, 0] - m.replicates[("dpo", 0.1)][:, 0])
        covered += lo <= truth <= hi
        sentence = S.verdict_words(lo, hi, 8, 8)
        words.add(sentence.split(":")[0].split(" at ")[0])
        assert sentence.startswith("PPO ahead") == (lo > 0) and sentence.startswith("Not distinguishable") == (
            lo <= 0 <= hi)
    print(f"coverage {covered / repeats:.3f}")
    assert 0.85 <= covered / repeats <= 0.99, covered / repeats
    assert words == {"PPO ahead", "Not distinguishable"}  # both outcomes occur at this effect size


def test_matched_kl_recomputes_the_common_reach_in_every_replicate():
    """Without a fixed level, the matched KL is the lowest of the compared runs' largest KL, observed and per
    replicate: every compared run then has a value in every replicate (no NaN from a run just short of it)."""
    rng = np.random.default_rng(2)
    prompts = rng.normal(0, 0.3, size=32)
    curves = {("ppo", 0.1): synthetic_method(rng, concave, 3, prompts),
              ("dpo", 0.1): synthetic_method(rng, concave, 3, prompts),
              ("bon", 0.1): [(np.array([[0.0], [0.5]]), np.array([[0.1], [0.2]]))]}  # run-level only, short of it
    m = S.matched_kl(curves, [("ppo", 0.1), ("dpo", 0.1)], [1.0, 0.5], S.Draws.make(32, 200, 0))
    observed_max = min(np.mean(k, -1).max() for g in (("ppo", 0.1), ("dpo", 0.1)) for k, _ in curves[g])
    assert m.level == pytest.approx(observed_max)
    assert not np.isnan(m.replicates[("ppo", 0.1)]).any() and not np.isnan(m.replicates[("dpo", 0.1)]).any()
    assert np.isnan(m.per_run[("bon", 0.1)][0, 0])  # Best of N never reaches it
    assert m.levels.std() > 0 and m.per_run[("ppo", 0.1)].shape == (3, 2)


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


def test_words_and_power_by_hand():
    assert S.verdict_words(0.01, 0.2, 3, 4).startswith("PPO ahead")
    assert S.verdict_words(-0.2, -0.01, 3, 4).startswith("DPO ahead")
    assert S.verdict_words(-0.1, 0.2, 3, 4) == ("Not distinguishable at 3 PPO and 4 DPO seeds: the 95% interval of "
                                                "PPO − DPO contains 0.")
    assert S.verdict_words(0.1, 0.2, 1, 4).startswith("No verdict: PPO has 1 seed")
    # (1.959964 + 0.841621)^2 (0.03^2 + 0.04^2) / 0.05^2 = 7.849 · 0.0025 / 0.0025 = 7.85 -> 8
    assert S.seeds_for_power(0.05, 0.03, 0.04) == 8
    assert math.isnan(S.seeds_for_power(0.05, math.nan, 0.04)) and S.seeds_for_power(0.0, 0.1, 0.1) == math.inf


def test_gao_fits_recover_known_coefficients():
    rng = np.random.default_rng(3)
    d = np.linspace(0, 4, 30)
    rl = d * (0.9 - 0.3 * np.log(np.where(d > 0, d, 1))) + rng.normal(0, 0.01, d.size)
    bon = d * (0.8 - 0.15 * d) + rng.normal(0, 0.01, d.size)
    assert S.fit_gao(d, rl, "rl") == pytest.approx((0.9, 0.3), abs=0.02)
    assert S.fit_gao(d, bon, "bon") == pytest.approx((0.8, 0.15), abs=0.02)
    assert S.gao_curve([0.0, 1.0], 0.9, 0.3, "rl").tolist() == pytest.approx([0.0, 0.9])
