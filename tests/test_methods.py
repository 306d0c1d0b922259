"""The methods table (rlhf/methods.py): every entry consistent with the code and the Makefile it names, and a method
added there reaching the command line, the grid, the run keys and the report's names without another edit."""

from __future__ import annotations

import dataclasses
import re

import pytest
from matplotlib.colors import is_color_like

from analysis import plots as P
from analysis.stats import GAO_FORMS
from pipelines import __main__ as cli
from pipelines import grid
from rlhf import methods
from rlhf.config import PROJECT_ROOT, Config, load_config
from rlhf.errors import UserError
from rlhf.keys import run_key
from rlhf.methods import METHODS, Method, commands, grid_methods

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
        if m.entry:
            try:
                function = cli.entry_point(m.entry)
            except (ImportError, AttributeError) as e:
                errors.append(f"{name}: entry {m.entry} does not import ({e})")
            else:
                errors += [f"{name}: entry {m.entry} is not callable"] if not callable(function) else []
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
    ],
)
def test_a_broken_entry_is_named(broken, error):
    toy = Method("toy", "Toy", "#123456", section="dpo", entry="pipelines.stages:sft_main")
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


@pytest.fixture
def toy(monkeypatch):
    """A method added the way the next one is: this file (its entry point) and one entry in the table."""
    toy = Method(
        "toy",
        "Toy method",
        "#123456",
        section="dpo",
        entry=f"{__name__}:toy_main",
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
    # the report and the plots: its legend name, colour and place
    assert P.name("toy") == "Toy method" and P.family("toy") == "toy"
    assert P.legend_rank("toy") < P.legend_rank("an-unknown-method")


def test_an_unknown_or_renamed_method_in_the_grid_is_one_line(toy):
    with pytest.raises(UserError, match=r"unknown method 'sft-chosen'; it is now 'preferred-ft' \(one of .*toy"):
        load_config("tiny", ["grid.methods=[sft-chosen]"])


def test_the_old_preferred_ft_section_is_told_where_it_moved():
    for overrides in (["sft.learning_rate=0.1"], ["sft={epochs: 2}"]):
        with pytest.raises(UserError, match=r"unknown config key 'sft'; it is now 'preferred_ft "):
            load_config("tiny", overrides)
