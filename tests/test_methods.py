"""The methods table (rlhf/methods.py): every entry consistent with the code and the Makefile it names, and a method
added there reaching the command line, the grid, the clock, the sweep, the run keys and the report's names without
another edit."""

from __future__ import annotations

import dataclasses
import importlib
import math
import re

import pytest
from matplotlib.colors import is_color_like

from analysis import plots as P
from analysis.stats import GAO_FORMS
from pipelines import __main__ as cli
from pipelines import clock, grid, named, sweep
from rlhf import methods
from rlhf.config import PROJECT_ROOT, Config, SweepConfig, load_config
from rlhf.errors import UserError
from rlhf.keys import run_key
from rlhf.methods import METHODS, Method, Sweep, commands, grid_methods

# a profile's sizes, made up: what the clock's estimates count with, without loading a model
SIZES = clock.Sizes(
    n_lm=1000,
    n_scalar=1001,
    prompt_tokens=10.0,
    pair_tokens=20.0,
    eval_tokens=30.0,
    sampled_pairs=True,
    train_prompts=40,
    train_pairs=40,
    eval_prompts=50,
)

ROLES = {"compared", "online", "baseline", "variant", "method", "stage"}


def consistency_errors(table: dict[str, Method]) -> list[str]:
    """What is wrong with each entry of `table`, as 'name: problem'."""
    sections = {f.name for f in dataclasses.fields(Config)}
    errors = []
    for name, m in table.items():
        problems = [
            (m.name != name, "listed under another name"),
            (m.section is not None and m.section not in sections, f"section '{m.section}' is not in Config"),
            (not is_color_like(m.colour), f"colour {m.colour!r}"),
            (not m.legend, "no legend name"),
            (m.role not in ROLES, f"role {m.role!r}"),
            (m.reward_model not in ("", "trains", "reports"), f"reward_model {m.reward_model!r}"),
            (m.gao is not None and m.gao not in GAO_FORMS, f"Gao form {m.gao!r}"),
            (m.family is not None and m.family not in table, f"family '{m.family}' is no entry"),
            (m.entry is None and m.in_grid and m.cli not in commands(), "in the grid, but no command runs it"),
        ]
        errors += [f"{name}: {problem}" for bad, problem in problems if bad]
        for field, function in (("entry", m.entry), ("flops", m.flops)):
            errors += callable_errors(name, field, function) if function else []
        errors += sweep_errors(name, m) if m.sweep else []
    return errors


def callable_errors(name: str, field: str, function: str) -> list[str]:
    try:
        found = named(function)
    except (ImportError, AttributeError, ValueError) as e:
        return [f"{name}: {field} {function} does not import ({e})"]
    return [] if callable(found) else [f"{name}: {field} {function} is not callable"]


def sweep_errors(name: str, m: Method) -> list[str]:
    """What is wrong with a method's `Sweep`: a knob that is no config key, a list the sweep section lacks, a module
    of runs without the two functions every point is keyed and trained by."""
    knob, values, runs = m.sweep
    if ":" in knob:
        errors = callable_errors(name, "sweep knob", knob)
    else:
        section, _, key = knob.partition(".")
        known = hasattr(getattr(Config(), section, None), key)
        errors = [] if known else [f"{name}: sweep knob {knob} is no config key"]
    if values not in {f.name for f in dataclasses.fields(SweepConfig)}:
        errors.append(f"{name}: sweep values '{values}' is not in the sweep section")
    if m.section is None:
        errors.append(f"{name}: a sweep, but no section whose learning rate it tries")
    if runs is not None:
        try:
            module = importlib.import_module(runs)
        except ImportError as e:
            errors.append(f"{name}: sweep runs {runs} does not import ({e})")
        else:
            lacks = [f for f in ("run_identity", "train") if not callable(getattr(module, f, None))]
            errors += [f"{name}: sweep runs {runs} has no {', '.join(lacks)}"] if lacks else []
    return errors


def test_every_entry_is_consistent():
    assert consistency_errors(METHODS) == []


@pytest.mark.parametrize(
    "broken, error",
    [
        (dict(section="kto"), "toy: section 'kto' is not in Config"),
        (dict(entry="pipelines.nowhere:main"), "toy: entry pipelines.nowhere:main does not import"),
        (
            dict(entry="pipelines.stages:no_such_function"),
            "toy: entry pipelines.stages:no_such_function does not import",
        ),
        (dict(colour="#12345"), "toy: colour '#12345'"),
        (dict(gao="linear"), "toy: Gao form 'linear'"),
        (dict(flops="pipelines.dpo_pipeline:no_estimate"), "toy: flops pipelines.dpo_pipeline:no_estimate does not"),
        (dict(sweep=Sweep("dpo.no_such_knob", "epochs", "dpo")), "toy: sweep knob dpo.no_such_knob is no config key"),
        (dict(sweep=Sweep("budget.epochs", "toy_epochs", "dpo")), "toy: sweep values 'toy_epochs' is not in the sweep"),
        (dict(sweep=Sweep("budget.epochs", "epochs", "pipelines.stages")), "toy: sweep runs pipelines.stages has no"),
    ],
)
def test_a_broken_entry_is_named(broken, error):
    toy = Method(
        "toy",
        "Toy",
        "#123456",
        section="dpo",
        entry="pipelines.stages:sft_main",
        flops="pipelines.dpo_pipeline:flops",
        sweep=Sweep("budget.epochs", "epochs", "dpo"),
    )
    assert consistency_errors({"toy": toy}) == []
    (found,) = consistency_errors({"toy": dataclasses.replace(toy, **broken)})
    assert found.startswith(error)


def test_the_makefile_has_a_target_for_every_command():
    """`make <command>` for every method's and stage's command, the training ones under `accelerate launch`."""
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    trained = set(re.search(r"^TRAINED := (.*)$", makefile, re.M).group(1).split())
    assert trained == {name for name, m in commands().items() if m.trains}
    targets = set(re.findall(r"^([a-z-]+): setup", makefile, re.M)) | trained
    assert set(commands()) | {m.name for m in METHODS.values() if m.in_grid} <= targets


def toy_main(cfg: Config) -> int:
    """A method's entry point, as a new method's package would hold it: here it says which config it ran with."""
    toy_main.ran.append(cfg)
    return 0


toy_main.ran = []


def toy_flops(w: clock.Work) -> dict[str, float]:
    """Its FLOPs estimate for the clock, beside its entry point."""
    return {"training": 6.0 * w.s.n_lm}


@pytest.fixture
def toy(monkeypatch):
    """A method added the way the next one is: this file (its entry point) and one entry in the table."""
    toy = Method(
        "toy",
        "Toy method",
        "#123456",
        section="dpo",
        entry=f"{__name__}:toy_main",
        flops=f"{__name__}:toy_flops",
        role="online",
        reward_model="trains",
        trains=True,
    )
    monkeypatch.setitem(methods.METHODS, "toy", toy)
    toy_main.ran.clear()
    return toy


def test_a_method_added_to_the_table_reaches_every_consumer(toy, tmp_path):
    # the command line: a command, dispatched to its entry with the resolved config
    assert cli.main(["toy", "--profile", "tiny", f"runs_dir={tmp_path}", "beta=0.3"]) == 0
    assert [cfg.beta for cfg in toy_main.ran] == [0.3]
    # the grid: a choice of grid.methods, one job per beta x seed after that seed's reward model, launched as trains
    assert "toy" in grid_methods()
    cfg = load_config("tiny", ["grid.methods=[toy]", "seeds=[0,1]", "beta_sweep=[0.1,0.5]"])
    jobs = {job.label: job for job in grid.in_order(cfg)}
    assert jobs["toy-beta0.5-seed1"].needs == ("reference", "reward_model-seed1")
    assert grid.command_line(jobs["toy-beta0.5-seed1"], "tiny", [], ["accelerate", "launch"])[:3] == [
        "accelerate",
        "launch",
        "toy",
    ]
    # the run keys: its section keys its runs, and no other method's
    key = run_key(cfg, "toy", 0, "d", None)
    assert key != run_key(cfg.with_values({"dpo.learning_rate": 0.5}), "toy", 0, "d", None)
    assert key == run_key(cfg.with_values({"ppo.learning_rate": 0.5}), "toy", 0, "d", None)
    assert run_key(cfg, "ppo", 0, "d", None) == run_key(
        cfg.with_values({"dpo.learning_rate": 0.5}), "ppo", 0, "d", None
    )
    # the clock: its jobs counted by its own estimate
    assert clock.job_flops(cfg, "toy", jobs["toy-beta0.5-seed1"].overrides, SIZES) == {"training": 6000.0}
    # the sweep: refused in one line naming it, until its entry names the knob its sweep tries
    with pytest.raises(UserError, match="'sweep.method': 'toy' has no sweep"):
        load_config("tiny", ["sweep.method=toy"])
    # the report and the plots: its legend name, colour and place
    assert P.name("toy") == "Toy method" and P.family("toy") == "toy"
    assert P.legend_rank("toy") < P.legend_rank("an-unknown-method")


@pytest.mark.parametrize("name", grid_methods())
def test_every_method_of_the_grid_reaches_every_consumer_through_the_table(name):
    """What a method in `grid.methods` needs from each consumer, each found by its entry in the table: a method left
    out of one of them (by a hand list, or an entry without an estimate) fails here, named."""
    m = METHODS[name]
    # the command line takes its command: it fails later, at the profile, where an unknown command stops argparse
    assert cli.main([m.cli, "--profile", "no-such-profile"]) == 2
    # the grid: jobs that run its command with its overrides
    cfg = load_config("tiny", [f"grid.methods=[{name}]", "seeds=[0,1]"])
    jobs = grid.in_order(cfg)
    assert [job for job in jobs if job.command == m.cli and set(m.overrides) <= set(job.overrides)]
    # the clock: every job of its grid has an estimate, a positive count of FLOPs of each kind
    for label, work in clock.grid_work(cfg, jobs, SIZES).items():
        assert work and all(math.isfinite(f) and f > 0 for f in work.values()), (label, work)
    # the sweep: its grid tries its own section's learning rate, or the sweep refuses it in one line naming it
    if m.sweep:
        points = sweep.grid(cfg.with_values({"sweep.method": name}))
        assert points and all(f"{m.section}.learning_rate" in point for point in points)
    else:
        with pytest.raises(UserError, match=rf"^config key 'sweep.method': '{name}' has no sweep [^\n]*$"):
            load_config("tiny", [f"sweep.method={name}"])
    # the report and the plots: its legend name and colour
    assert P.name(name) == m.legend and P._palette([name]) == {m.legend: m.colour}


def test_a_method_in_the_grid_without_an_estimate_is_named(toy, monkeypatch):
    monkeypatch.setitem(methods.METHODS, "toy", dataclasses.replace(toy, flops=None))
    cfg = load_config("tiny", ["grid.methods=[toy]"])
    with pytest.raises(ValueError, match=r"no FLOPs estimate for the grid's command 'toy': .* `flops` of 'toy'"):
        clock.grid_work(cfg, grid.in_order(cfg), SIZES)


def test_the_clock_counts_what_the_first_job_of_a_command_caches_once():
    """pi_ref's log-probs of the pairs: the first DPO job of the grid computes and caches them, the later ones read
    them (dpo/trainer.py)."""
    cfg = load_config("tiny", ["grid.methods=[dpo]", "seeds=[0,1]"])
    work = [w for label, w in clock.grid_work(cfg, grid.in_order(cfg), SIZES).items() if label.startswith("dpo")]
    assert ["forward" in w for w in work] == [True, False]
    assert work[1] == {k: v for k, v in work[0].items() if k != "forward"}


def test_an_unknown_or_renamed_method_in_the_grid_is_one_line(toy):
    with pytest.raises(UserError, match=r"unknown method 'sft-chosen'; it is now 'preferred-ft' \(one of .*toy"):
        load_config("tiny", ["grid.methods=[sft-chosen]"])


def test_the_old_preferred_ft_section_is_told_where_it_moved():
    for overrides in (["sft.learning_rate=0.1"], ["sft={epochs: 2}"]):
        with pytest.raises(UserError, match=r"unknown config key 'sft'; it is now 'preferred_ft "):
            load_config("tiny", overrides)


@pytest.mark.parametrize("profile", ["default", "tiny", "hh", "gpu", "imdb-gpt2"])
def test_the_clock_counts_every_profile_with_its_nulls(profile):
    """`eval.n_prompts: null` (gpu) and `data.n_prompts: null` (hh, imdb-gpt2) mean every prompt: the clock counts
    them from the sizes, where `make all` once stopped on None arithmetic before its first job."""
    cfg = load_config(profile)
    work = clock.grid_work(cfg, grid.in_order(cfg), SIZES)
    assert work and all(math.isfinite(f) and f > 0 for w in work.values() for f in w.values())
    assert all(f > 0 for f in clock.data_flops(cfg, SIZES).values())


def test_the_clock_counts_k_over_2_pairs_a_prompt():
    """The preference set pairs responses (0,1), (2,3), ... (rlhf/data.py): K = 4 makes 2 pairs a prompt, not the
    6 pairings of 4."""
    sizes, _ = clock.measure_sizes(load_config("tiny", ["data.responses_per_prompt=4", "data.n_prompts=10"]))
    assert (sizes.train_prompts, sizes.train_pairs) == (10, 20)
