"""The verdict's interval (Welch's t with a prompt term, analysis/stats.py) holds its coverage at the seed counts the
benchmark runs, whatever the split between seed and prompt variance: simulated experiments of the benchmark's shape
(analysis/coverage.py; `make coverage` prints the whole table, 8 seeds included). Numpy only, vectorised, ~20 s."""

from __future__ import annotations

import numpy as np
import pytest

from analysis import coverage as C
from analysis import stats as S

EXPERIMENTS = 2000  # null and alternative experiments per cell: a rate of 0.05 is known to ±0.005 (one sd)
SEEDS = (2, 3, 5)


@pytest.fixture(scope="module")
def table():
    return {
        (name, n): C.check(gen, n, EXPERIMENTS, seed=100 * i + n)
        for i, (name, gen) in enumerate(C.GENERATORS.items())
        for n in SEEDS
    }


@pytest.mark.parametrize("name", list(C.GENERATORS))
@pytest.mark.parametrize("n", SEEDS)
def test_coverage_and_false_ahead(table, name, n):
    """Covers the truth in ≥ 0.93 of experiments (and, at 3 and 5 seeds, ≤ 0.99: not uninformatively wide); with the
    two methods identical it words a false "ahead" in ≤ 0.06 of them (only the primary level carries words)."""
    r = table[name, n]
    print(f"{name}, {n} seeds: {r}")
    assert r["coverage"] >= 0.93, r
    assert n < 3 or r["coverage"] <= 0.99, r
    assert r["false ahead"] <= 0.06, r


def test_power_at_five_seeds(table):
    """At a true difference of 0.1 gold with 5 seeds a method, the default's variance split (with or without a prompt
    × method interaction) gives the right "ahead" in ≥ 0.6 of experiments. With seed sd 0.1 no valid test can: the
    noncentral t says 0.28 (a z-test with the sds known, 0.35), and the simulation agrees with it within 0.05, as it
    does in every cell at 5 seeds."""
    for name in C.GENERATORS:
        r = table[name, 5]
        assert abs(r["power"] - r["t power"]) <= 0.05, (name, r)
    assert table["default's split", 5]["power"] >= 0.6
    assert table["default's split + interaction 0.15", 5]["power"] >= 0.6


def test_the_prompt_term_is_what_holds_coverage_under_an_interaction(monkeypatch):
    """The broken variant: the same interval without its prompt term (Welch over per-run values alone) covers less
    0.93 where prompts interact with the method (at 8 seeds, where the seeds' share of the variance is smallest;
    at 5 it words a false "ahead" in 0.069 of null experiments): the acceptance test above catches it."""

    def seeds_only(kl, gold):
        value, _, _ = S.at_levels(kl, gold, [C.LEVEL])
        return S.t_contrast([value[:, 0, :, 0], value[:, 1, :, 0]], None)

    monkeypatch.setattr(C, "verdicts", seeds_only)
    r = C.check(C.GENERATORS["default's split + interaction 0.15"], 8, EXPERIMENTS, seed=7)
    print(r)
    assert r["coverage"] < 0.93, r


def test_the_generators_hold_what_they_say():
    """A generator's runs differ by its seed sd and its prompt noise: the spread of per-run values at the level is
    their sum in quadrature (within sampling error), the quantity the interval must cover."""
    gen = C.GENERATORS["default's split"]
    kl, gold = C.experiments(np.random.default_rng(0), gen, 40, 0.0, 50)
    value, _, _ = S.at_levels(kl, gold, [C.LEVEL])
    sd = value[..., 0].std(axis=-1, ddof=1).mean(axis=0)  # per method, mean over experiments
    expected = np.hypot(gen.seed_sd, gen.noise_sd / np.sqrt(128))
    assert sd == pytest.approx(expected, rel=0.25)
