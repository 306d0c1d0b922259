"""Issue #20, item 3: the console shows one bar a stage with its key numbers, not the libraries' chatter (a
"Loading weights" bar at every model load, TRL's log dict at every step); `--verbose` brings the chatter back."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rlhf.models import load_causal_lm
from rlhf.evaluate import brief
from rlhf.trl_callbacks import _ProgressBar, set_verbose

STEP_LOGS = {"loss": 0.5, "rewards/margins": 0.25, "rewards/accuracies": 0.75, "grad_norm": 1.5}


@pytest.fixture
def console():
    """`set_verbose` for one test; the libraries' defaults (verbose) after it."""
    yield set_verbose
    set_verbose(True)


def _train_two_steps(desc: str) -> None:
    """What Trainer does to its progress callback over two logged steps."""
    bar, args, control = _ProgressBar(desc), SimpleNamespace(), SimpleNamespace()
    state = SimpleNamespace(is_world_process_zero=True, max_steps=2, global_step=0)
    bar.on_train_begin(args, state, control)
    for step in (1, 2):
        state.global_step = step
        bar.on_step_end(args, state, control)
        bar.on_log(args, state, control, logs=STEP_LOGS)
    bar.on_train_end(args, state, control)


@pytest.mark.parametrize("verbose", [False, True])
def test_quiet_by_default_and_verbose_brings_the_libraries_output_back(console, verbose, tiny_path, capsys):
    console(verbose)
    load_causal_lm(tiny_path)
    _train_two_steps("DPO seed 0")
    out, err = capsys.readouterr()
    assert ("Loading weights" in err) == verbose
    assert ("{'loss': '0.5'" in out) == verbose  # TRL's dict of a step, as Trainer prints it
    # either way: one bar named after its stage, ETA and the step's key numbers in its postfix
    assert "DPO seed 0: 100%" in err and "<00:00" in err and "loss=0.500, margin=0.250, acc=0.750" in err


def test_an_eval_point_in_one_short_line():
    assert (
        brief(
            {
                "eval/gold": 0.05233,
                "eval/gold_sem": 0.1073,
                "eval/kl": 0.2847,
                "eval/length": 8.0,
                "heldout/implicit_accuracy": 0.4375,
                "heldout/implicit_margin": -0.006167,
            }
        )
        == "gold 0.052, ± 0.107, KL 0.285, implicit acc 0.438, margin -0.006"
    )
