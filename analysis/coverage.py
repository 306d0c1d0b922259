"""`make coverage`: the verdict's interval (analysis/stats.py: `at_levels`, `t_contrast`) checked by simulation, as
a table: its coverage, its false "ahead" when the two methods are the same, and its power at a true difference.

Each simulated experiment is what the benchmark does, vectorised over experiments: two methods with known gold-KL
curves, n seeds each, 5 eval points a run, 128 eval prompts shared by every run. Runs differ in speed (where their
eval points fall in KL), by a seed effect on gold, and by their own prompt-sampling noise; prompts carry an effect
shared by every run, and optionally a prompt × method interaction (each method's own effect of a prompt, shared by
its seeds). Each run is read at a fixed KL level exactly as the report reads it. The generators are in `GENERATORS`;
`default` is calibrated to the variance split measured on the default profile's runs (docs/analysis.md).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from analysis import stats as S

LEVEL = 4.0  # nats: inside every simulated run's reach (its last eval point is at 10-14 nats)
EVAL_KL = np.linspace(0, 12, 5) ** 1.3 / 12**0.3  # an average run's 5 eval points in KL: 0, 2.0, 4.9, 8.3, 12


def curve(kl, a=0.30, b=0.08):
    """A gold-KL curve of Gao et al.'s RL form in d = √KL, d(a − b log d): concave, as the default's runs are."""
    d = np.sqrt(np.asarray(kl, dtype=float))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d > 0, d * (a - b * np.log(np.where(d > 0, d, 1))), 0.0)


@dataclass(frozen=True)
class Generator:
    """Per method (a, b): the true seed-to-seed sd of gold; per prompt and eval point: the noise sd of a run's
    gold (its mean over P prompts has sd noise_sd/√P); the sd of a prompt's effect shared by every run, and of a
    prompt's effect particular to one method (the interaction)."""

    seed_sd: tuple[float, float]
    noise_sd: float
    prompt_sd: float = 0.3
    interaction_sd: float = 0.0


# The default's split, measured on its 3 + 3 seeds (docs/analysis.md, "The variance split"), as the root mean square
# over the three KL levels of each component: true seed sd PPO 0.055, DPO 0.026; a run's own prompt noise 0.032 on its
# mean over 128 prompts (0.36 a prompt). The interaction measured 0-0.16 a prompt on the difference; 0.15 a method
# (0.21 on the difference) is above every measured value.
GENERATORS = {
    "synthetic, seed sd 0.1": Generator(seed_sd=(0.1, 0.1), noise_sd=0.15),
    "default's split": Generator(seed_sd=(0.055, 0.026), noise_sd=0.36),
    "default's split + interaction 0.15": Generator(seed_sd=(0.055, 0.026), noise_sd=0.36, interaction_sd=0.15),
}


def experiments(
    rng: np.random.Generator, gen: Generator, n_seeds: int, difference: float, count: int, n_prompts: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """`count` experiments: per-prompt KL and gold [count, 2 methods, n_seeds, E, P]. Method a's curve is b's plus
    `difference`·√(KL/LEVEL), so a − b is `difference` at LEVEL and 0 at π_ref."""
    shape = (count, 2, n_seeds)
    E, P = EVAL_KL.size, n_prompts
    kl_means = EVAL_KL * rng.uniform(0.85, 1.15, size=(*shape, 1))  # [count, 2, n, E]: each run's speed
    kl = kl_means[..., None] * rng.gamma(4.0, 0.25, size=(*shape, E, P))  # per prompt, mean kl_means
    lift = np.array([difference, 0.0])[None, :, None, None] * np.sqrt(kl_means / LEVEL)
    seed = rng.normal(size=(*shape, 1)) * np.array(gen.seed_sd)[None, :, None, None]
    prompts = rng.normal(0, gen.prompt_sd, size=(count, 1, 1, 1, P))
    interaction = rng.normal(0, gen.interaction_sd, size=(count, 2, 1, 1, P))
    gold = (
        (curve(kl_means) + lift + seed)[..., None]
        + prompts
        + interaction
        + rng.normal(0, gen.noise_sd, size=(*shape, E, P))
    )
    return kl, gold


def verdicts(kl: np.ndarray, gold: np.ndarray) -> S.Contrast:
    """a − b at LEVEL by the report's estimator, one Welch interval per experiment."""
    value, pseudo, _ = S.at_levels(kl, gold, [LEVEL])  # [count, 2, n, 1], [count, 2, n, 1, P]
    return S.t_contrast([value[:, 0, :, 0], value[:, 1, :, 0]], [pseudo[:, 0, :, 0], pseudo[:, 1, :, 0]])


def check(
    gen: Generator, n_seeds: int, count: int, seed: int, difference: float = 0.1, chunk: int = 250
) -> dict[str, float]:
    """Coverage of the truth and false "ahead" rate with the methods equal, and the rate of the right "ahead" at a
    true difference (with the noncentral t's prediction of it, `S.t_power`, from the true sds)."""
    rng = np.random.default_rng(seed)
    covered = wrong = right = 0
    for start in range(0, count, chunk):
        size = min(chunk, count - start)
        null = verdicts(*experiments(rng, gen, n_seeds, 0.0, size))
        covered += int(np.sum((null.lo <= 0) & (0 <= null.hi)))
        wrong += int(np.sum((null.lo > 0) | (null.hi < 0)))
        alt = verdicts(*experiments(rng, gen, n_seeds, difference, size))
        right += int(np.sum(alt.lo > 0))
    run_sd = [float(np.hypot(s, gen.noise_sd / np.sqrt(128))) for s in gen.seed_sd]
    prompt_var = 2 * gen.interaction_sd**2 / 128
    return {
        "coverage": covered / count,
        "false ahead": wrong / count,
        "power": right / count,
        "t power": S.t_power(difference, *run_sd, n_seeds, prompt_var, 128),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", type=int, default=2000, help="null and alternative experiments per cell")
    parser.add_argument("--seeds", type=int, nargs="+", default=[2, 3, 5, 8], help="seeds per method")
    args = parser.parse_args(argv)
    print(
        f"Welch t with a prompt term at KL {LEVEL:g}: {args.experiments} null and {args.experiments} experiments at "
        "a true difference of 0.1 gold per cell, 128 prompts, 5 eval points a run"
    )
    print(f"{'generator':36} {'seeds':>5} {'coverage':>9} {'false ahead':>12} {'power at 0.1':>13} {'t predicts':>11}")
    for i, (name, gen) in enumerate(GENERATORS.items()):
        for n in args.seeds:
            r = check(gen, n, args.experiments, seed=1000 * i + n)
            print(
                f"{name:36} {n:>5} {r['coverage']:>9.3f} {r['false ahead']:>12.3f} {r['power']:>13.3f} "
                f"{r['t power']:>11.3f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
