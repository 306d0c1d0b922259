"""The house in layers (README, Layout): every import of every module, read from its source, obeys four floors.

    rlhf/                                the foundation: imports no other package of the project
    sft/ reward_model/ ppo/ dpo/         the stages: the foundation only, never another stage or method
    rloo/ online_dpo/
    analysis/                            beside the stages: the foundation only
    baselines/                           the controls: the foundation and the stages
    pipelines/                           orchestration on top: anything

Imports inside functions count, and so do `importlib.import_module("...")` calls with a literal name.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from rlhf.config import PROJECT_ROOT

STAGES = ("sft", "reward_model", "ppo", "dpo", "rloo", "online_dpo")
PACKAGES = ("rlhf", *STAGES, "analysis", "baselines", "pipelines")
# What each package may import from the project besides itself.
ALLOWED = {
    "rlhf": set(),
    **{stage: {"rlhf"} for stage in STAGES},
    "analysis": {"rlhf"},
    "baselines": {"rlhf", *STAGES},
    "pipelines": set(PACKAGES),
}


def imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, relative imports resolved against `package`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, package if node.level else node.module))
        elif (
            isinstance(node, ast.Call)
            and "import_module" in (getattr(node.func, "attr", None), getattr(node.func, "id", None))
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            out.append((node.lineno, node.args[0].value))
    return out


def layer_violations(root: Path) -> list[str]:
    """Every import under `root` that breaks a rule of the module docstring, as 'file:line: a imports b'."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            for line, module in imported_modules(path, package):
                top = module.split(".")[0]
                if top in PACKAGES and top != package and top not in ALLOWED[package]:
                    found.append(f"{path.relative_to(root)}:{line}: {package} imports {module}")
    return found


def test_the_project_obeys_its_layers():
    assert layer_violations(PROJECT_ROOT) == []


def test_every_package_is_checked():
    """A new top-level package of the project has to be placed on a floor here."""
    on_disk = {p.parent.name for p in PROJECT_ROOT.glob("*/__init__.py")}
    assert on_disk - {"tests"} == set(PACKAGES)


@pytest.mark.parametrize(
    "file, line, rule",
    [
        ("rlhf/evaluate.py", "from ppo.core import whiten", "rlhf imports ppo.core"),
        ("rlhf/data.py", "import sft", "rlhf imports sft"),
        ("rlhf/reference.py", "from pipelines.stages import sft_step", "rlhf imports pipelines.stages"),
        ("ppo/core.py", "from dpo.loss import dpo_loss", "ppo imports dpo.loss"),
        ("dpo/loss.py", "import ppo.core", "dpo imports ppo.core"),
        ("dpo/loss.py", "from reward_model.train import train_reward_model", "dpo imports reward_model.train"),
        (
            "reward_model/train.py",
            "from pipelines.stages import build_preference_set",
            "reward_model imports pipelines.stages",
        ),
        ("analysis/metrics.py", "from ppo.core import whiten", "analysis imports ppo.core"),
        ("baselines/best_of_n.py", "from analysis.metrics import RUN", "baselines imports analysis.metrics"),
        ("sft/train.py", "def f():\n    from dpo import trainer", "sft imports dpo"),
        (
            "rlhf/models.py",
            "import importlib\nimportlib.import_module('reward_model.train')",
            "rlhf imports reward_model.train",
        ),
    ],
)
def test_a_broken_layer_is_caught(tmp_path, file, line, rule):
    for package in PACKAGES:
        shutil.copytree(PROJECT_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / file
    target.write_text(target.read_text() + "\n" + line + "\n")
    (violation,) = layer_violations(tmp_path)
    assert violation.startswith(file) and violation.endswith(rule)
