"""Every method and stage of the study, once: what the command line, the grid, the run keys, the report and the plots
know of it.

A method's name is its command (`python -m pipelines <name>`, `make <name>`) and its run directory
(runs/<profile>/<name>/). Its `section` is the config section that keys its runs alone (rlhf/keys.py): tuning DPO's
learning rate leaves PPO's completed runs reusable. Its `entry` is the function the command line calls with the
resolved config, and its `flops` the estimate of one job of its command that `make all`'s clock adds up
(pipelines/clock.py), each named as "module:function" and imported (`pipelines.named`) only when it is called, so
that this table, at the foundation, imports nothing above it. Its `sweep` is the grid `make sweep` tunes it on.

Adding a method (KTO, GRPO, ...) is a package of its own with an entry point and a FLOPs estimate, its settings'
section in rlhf/config.py (each field with its role in the keys), and one entry here; the command line,
`grid.methods`, the clock, the sweep, the run keys, the report's legend and colours read it from this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class Sweep(NamedTuple):
    """A method's grid in `make sweep` (pipelines/sweep.py): its learning rate x one more decisive knob."""

    knob: str  # the config key it tries, or "module:function(cfg, value) -> {key: value}" where one value sets several
    values: str  # the sweep section's list of the knob's values (each method's lists as long: the same budget)
    runs: str | None = None  # the module of its `run_identity(cfg, reward model)` and `train(cfg, prefs, seed,
    #                          reward model)`, one run as its own command trains it; None: the reward model's stage


@dataclass(frozen=True)
class Method:
    name: str  # command and run directory: runs/<profile>/<name>/
    legend: str  # what the report and the plots call it (the DPO paper's Fig. 2 names)
    colour: str  # its colour in every plot
    section: str | None = None  # the config section that keys its runs alone; None: it reads shared ones only
    entry: str | None = None  # "module:function(cfg) -> exit status" its command calls; None: another's runs it
    flops: str | None = None  # "module:function(pipelines.clock.Work) -> FLOPs by kind": one job of its command
    command: str | None = None  # its command where not its name (PPO-GT: `ppo ppo.reward=gold`)
    overrides: tuple[str, ...] = ()  # key=value that command needs to run it, after the user's own
    family: str | None = None  # the method whose trainer, and so whose training series, it shares
    role: str = "method"  # "compared", "online", "baseline", "variant", "method"; "stage": not a policy
    reward_model: str = ""  # "trains": against PPO's reward model (or ranks by it), which its cost counts;
    #                                 "reports": scores its samples with it (DPO's proxy reward); "": neither
    per_beta: bool = True  # one run per beta of `beta_sweep` (else one, at `beta`)
    per_seed: bool = True  # one run per seed of `seeds` (else one, at eval.seed)
    trains: bool = False  # its command trains: under NPROC > 1 launched through `accelerate launch`
    in_grid: bool = True  # one of `grid.methods`' choices
    evaluated: bool = True  # its runs have policy eval points (the report pools them)
    gao: str | None = None  # Gao et al.'s form its gains follow (analysis.stats.GAO_FORMS): "rl", "bon"
    gold: bool = False  # optimises the task's gold reward, not what the preference pairs teach: outside the training
    #                     budget, and nothing to run where the task has no gold reward
    sweep: Sweep | None = None  # its grid in `make sweep`; None: the sweep refuses it

    @property
    def cli(self) -> str:
        return self.command or self.name

    @property
    def trainer(self) -> str:
        return self.family or self.name


# In legend order.
# fmt: off
METHODS: dict[str, Method] = {m.name: m for m in [
    Method("reference", "π_ref", "#555555", entry="pipelines.stages:reference_main",
           flops="pipelines.stages:reference_flops", role="stage", per_beta=False, per_seed=False, in_grid=False),
    Method("sft", "SFT stage (π_ref)", "#7f7f7f", entry="pipelines.stages:sft_main", role="stage", trains=True,
           in_grid=False, evaluated=False),
    Method("reward_model", "reward model", "#2ca02c", section="reward_model",
           entry="pipelines.stages:reward_model_main", flops="pipelines.stages:reward_model_flops",
           command="reward-model", role="stage", trains=True, in_grid=False, evaluated=False,
           sweep=Sweep("budget.epochs", "epochs")),
    Method("ppo", "PPO", "#1f77b4", section="ppo", entry="pipelines.ppo_pipeline:main",
           flops="pipelines.ppo_pipeline:flops", role="compared", reward_model="trains", trains=True, gao="rl",
           sweep=Sweep("ppo.ppo_epochs", "ppo_epochs", "pipelines.ppo_pipeline")),
    Method("ppo-gt", "PPO-GT", "#17becf", section="ppo", command="ppo", overrides=("ppo.reward=gold",), family="ppo",
           role="baseline", trains=True, gao="rl", gold=True),
    Method("rloo", "RLOO", "#bcbd22", section="rloo", entry="pipelines.online_pipeline:rloo_main",
           flops="pipelines.online_pipeline:rloo_flops", role="online", reward_model="trains", trains=True,
           sweep=Sweep("rloo.num_generations", "rloo_generations", "rloo")),
    Method("dpo", "DPO", "#ff7f0e", section="dpo", entry="pipelines.dpo_pipeline:main",
           flops="pipelines.dpo_pipeline:flops", role="compared", reward_model="reports", trains=True,
           sweep=Sweep("budget.epochs", "epochs", "dpo")),
    Method("online-dpo", "online DPO", "#ffbb78", section="online_dpo",
           entry="pipelines.online_pipeline:online_dpo_main", flops="pipelines.online_pipeline:online_dpo_flops",
           role="online", reward_model="trains", trains=True,
           sweep=Sweep("pipelines.online_pipeline:online_dpo_steps", "online_dpo_step_factors", "online_dpo")),
    # DPO's loss variants, run by `dpo` with dpo.loss_type=ipo|robust
    Method("dpo-ipo", "IPO", "#d62728", section="dpo", family="dpo", role="variant", reward_model="reports",
           in_grid=False),
    Method("dpo-robust", "rDPO", "#8c564b", section="dpo", family="dpo", role="variant", reward_model="reports",
           in_grid=False),
    Method("bon", "Best of N (KL: upper bound)", "#9467bd", section="bon", entry="pipelines.baselines_pipeline:bon",
           flops="pipelines.baselines_pipeline:bon_flops", role="baseline", reward_model="trains", per_beta=False,
           per_seed=False, gao="bon"),
    Method("preferred-ft", "Preferred-FT", "#e377c2", section="preferred_ft",
           entry="pipelines.baselines_pipeline:preferred_ft", flops="pipelines.baselines_pipeline:preferred_ft_flops",
           role="baseline", per_beta=False, trains=True),
]}
# fmt: on


def commands() -> dict[str, Method]:
    """The command line's commands that run a method or stage, each with its entry."""
    return {m.cli: m for m in METHODS.values() if m.entry}


def grid_methods() -> list[str]:
    return [m.name for m in METHODS.values() if m.in_grid]


def swept() -> list[str]:
    """`sweep.method`'s choices: the methods and stages with a grid to tune."""
    return [m.name for m in METHODS.values() if m.sweep]


def with_role(role: str) -> list[str]:
    return [m.name for m in METHODS.values() if m.role == role]


def own_sections() -> dict[str, list[str]]:
    """Config section -> the methods whose runs it keys (and no other method's)."""
    out: dict[str, list[str]] = {}
    for m in METHODS.values():
        if m.section:
            out.setdefault(m.section, []).append(m.name)
    return out
