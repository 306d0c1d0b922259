"""Issue #6 on `tiny`: kill -9 and resume, bad input named with nothing lost, numerical guards, determinism.

The kill tests run the CLI in a subprocess, kill it (SIGKILL) once a checkpoint is committed, run the same
command again, and compare with an uninterrupted run of the same seed: every number of metrics.jsonl (the
wall-clock fields aside), the eval samples and the final weights must be identical.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from analysis.load import read_run
from pipelines.__main__ import main as cli
from rlhf.atomic import read_jsonl
from rlhf.checkpoints import CHECKPOINT_RECORD
from rlhf.config import PROJECT_ROOT, load_config
from rlhf.models import resolve_model_path

# Allowed to differ between two runs: wall-clock, and the evaluator's own cost, which is 0 where pi_ref's samples
# came from the eval cache that the first run wrote.
TIMING = (
    "wall_seconds",
    "eval/seconds",
    "time/rollout",
    "time/scoring",
    "time/update",
    "eval/sampling_seconds",
    "eval/scoring_seconds",
    "eval/sampled_tokens",
    "eval/scored_tokens",
    "eval/flops",
    "step_time",
)  # TRL's RLOO and online DPO log each step's seconds
PPO = ("ppo.iterations=8", "ppo.checkpoint_every=2", "ppo.adaptive_kl=true")  # adaptive: beta must resume too
DPO = ("dpo.checkpoint_every=1", "dpo.batch_size=4", "budget.pairs=16")  # 4 half batches: TRL's steps are slow on CPU
RLOO = ("rloo.checkpoint_every=1",)  # the online methods: TRL's Trainer checkpoints, as DPO's
ONLINE_DPO = ("online_dpo.checkpoint_every=1",)
KILLED = [("ppo", PPO), ("dpo", DPO), ("rloo", RLOO), ("online-dpo", ONLINE_DPO)]


def _command(method: str, runs: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "pipelines", method, "--profile", "tiny", f"runs_dir={runs}", *overrides]


def _run(method: str, runs: Path, *overrides: str) -> subprocess.CompletedProcess:
    out = subprocess.run(
        _command(method, runs, *overrides), cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _runs_of(runs: Path, method: str) -> list[Path]:
    root = runs / "tiny" / method
    return sorted(root.iterdir()) if root.exists() else []


def _numbers(run_dir: Path) -> list[dict]:
    rows, bad = read_jsonl(run_dir / "metrics.jsonl")
    assert not bad
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def _message(err: str) -> str:
    """The one line the CLI prints for a user mistake or a divergence (progress bars may surround it)."""
    (line,) = [line for line in err.splitlines() if line.startswith(("error: ", "diverged: "))]
    return line


def _files(root: Path) -> dict[Path, bytes]:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_same_run(a: Path, b: Path) -> None:
    """Same numbers in every metrics row, same eval samples, same final weights."""
    assert _numbers(a) == _numbers(b)
    assert _files(a / "samples") == _files(b / "samples")
    assert (a / "checkpoints/final/model.safetensors").read_bytes() == (
        b / "checkpoints/final/model.safetensors"
    ).read_bytes()


def _kill_after_checkpoint(method: str, runs: Path, step: int, *overrides: str, log: Path) -> tuple[Path, int]:
    """Start the CLI, kill -9 it as soon as a run of `method` has committed a checkpoint at `step` or later (on a
    busy machine the poll can miss one: only the newest is kept); return the run and that checkpoint's step."""
    before = set(_runs_of(runs, method))
    with open(log, "w") as f:
        proc = subprocess.Popen(_command(method, runs, *overrides), cwd=PROJECT_ROOT, stdout=f, stderr=f)

    def committed() -> list[int]:
        return [
            int(p.parent.name.removeprefix("checkpoint-"))
            for p in (runs / "tiny" / method).glob(f"*/checkpoints/checkpoint-*/{CHECKPOINT_RECORD}")
        ]

    try:
        deadline = time.monotonic() + 300
        while not [n for n in committed() if n >= step]:
            assert proc.poll() is None, f"ended before a checkpoint at step {step}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.02)
    finally:
        proc.kill()  # SIGKILL: nothing runs after it, not even `finally` blocks
        proc.wait()
    (killed,) = set(_runs_of(runs, method)) - before
    assert json.loads((killed / "manifest.json").read_text())["status"] == "running"
    assert not (killed / "checkpoints" / "final").exists(), "the kill came after training ended"
    return killed, max(committed())


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """A runs directory with an uninterrupted run of PPO, DPO, RLOO and online DPO (and the preference set, the reward
    model)."""
    runs = tmp_path_factory.mktemp("runs")
    for method, overrides in KILLED:
        _run(method, runs, *overrides)
    return runs, {method: _runs_of(runs, method)[0] for method, _ in KILLED}


def _without(runs: Path, method: str, to: Path) -> Path:
    """A copy of the runs directory `runs` without `method`'s runs: `method` then trains anew there (a completed run
    with the same key would be reused), on the same preference set and reward model."""
    shutil.copytree(runs, to, ignore=lambda folder, names: [method] if Path(folder) == runs / "tiny" else [])
    return to


@pytest.mark.parametrize("method, overrides", KILLED)
def test_kill_9_then_rerun_resumes_and_ends_as_an_uninterrupted_run(baseline, tmp_path, method, overrides, step=2):
    runs, uninterrupted = _without(baseline[0], method, tmp_path / "runs"), baseline[1]
    rm_runs = _runs_of(runs, "reward_model")
    killed, step = _kill_after_checkpoint(method, runs, step, *overrides, log=tmp_path / "killed.log")
    before = _runs_of(runs, method)

    out = _run(method, runs, *overrides)
    assert f"resuming {killed} (status running) from its checkpoint at step {step}" in out.stdout
    assert "preference set reused" in out.stdout  # a finished stage is never redone
    assert _runs_of(runs, "reward_model") == rm_runs
    assert _runs_of(runs, method) == before  # resumed in place, no new run
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["status"] == "completed" and [r["from_step"] for r in manifest["resumed"]] == [step]
    assert [p.name for p in (killed / "checkpoints").glob("checkpoint-*")] == []  # resume points gone when done
    _assert_same_run(killed, uninterrupted[method])


@pytest.mark.parametrize("method, overrides", [("ppo", PPO), ("dpo", DPO)])
def test_same_seed_gives_identical_metrics(baseline, method, overrides):
    """A second run with the baseline's seed and config (here in this process, the baseline in a subprocess):
    identical numbers, wall-clock aside. With resume=false the completed run is not reused: the second is a new one."""
    import importlib

    runs, first = baseline
    before = set(_runs_of(runs, method))
    pipeline = importlib.import_module(f"pipelines.{method}_pipeline")
    assert pipeline.main(load_config("tiny", [f"runs_dir={runs}", *overrides, "resume=false"])) == 0
    (second,) = set(_runs_of(runs, method)) - before
    evals = [r for r in _numbers(second) if r["kind"] == "eval"]
    assert len(evals) >= 3 and evals[-1]["eval/kl"] != 0  # the policy moved: the comparison is not vacuous
    _assert_same_run(first[method], second)


@pytest.mark.parametrize("method, overrides", [("ppo", PPO), ("dpo", DPO)])
def test_a_command_run_again_reuses_its_completed_runs(baseline, method, overrides):
    """Issue #20, item 0: `make ppo` / `make dpo` run again over completed runs adds no run (the report would count
    a seed twice) and trains nothing: the newest completed run with the same key is reused, and said so."""
    runs, _ = baseline
    before = {p: _files(p) for p in _runs_of(runs, method)}
    out = _run(method, runs, *overrides)
    assert {p: _files(p) for p in _runs_of(runs, method)} == before  # no new run, not a byte changed
    (reused,) = [line for line in out.stdout.splitlines() if "completed before: reused" in line]
    assert f"{max(before)} (completed before" in reused  # the newest (run ids start with the time)


@pytest.mark.parametrize("method", ["bon", "preferred-ft"])
def test_a_baseline_run_again_is_reused_not_added(baseline, tmp_path, method):
    """`make bon` / `make preferred-ft` run again: the completed run is reused (the same run key), not added."""
    runs = _without(baseline[0], method, tmp_path / "runs")
    _run(method, runs)
    (first,) = _runs_of(runs, method)
    files = _files(first)
    out = _run(method, runs)
    assert _runs_of(runs, method) == [first] and _files(first) == files
    assert f"{first} (completed before: reused" in out.stdout


# --- numerical guards ------------------------------------------------------------------------------------------


def _nan_reward_at(iteration: int, monkeypatch) -> None:
    """Make the reward model score NaN on the rollouts of `iteration` (evaluation scores stay finite)."""
    import ppo.train

    real, calls = ppo.train.reward_scores, []

    def scores(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        return out * float("nan") if len(calls) == iteration else out

    monkeypatch.setattr(ppo.train, "reward_scores", scores)


def test_nan_reward_stops_ppo_at_that_iteration_keeps_the_checkpoint_and_shows_diverged(tmp_path, monkeypatch, capsys):
    runs = [f"runs_dir={tmp_path}", "ppo.checkpoint_every=2"]
    _nan_reward_at(3, monkeypatch)
    assert cli(["ppo", "--profile", "tiny", *runs]) == 3
    message = _message(capsys.readouterr().err)
    (run,) = _runs_of(tmp_path, "ppo")
    assert message == (
        f"diverged: PPO iteration 3: reward is nan [last metrics row: step 2; run marked diverged: "
        f"{run}; last good checkpoint: {run / 'checkpoints' / 'checkpoint-2'}]"
    )
    assert (run / "checkpoints" / "checkpoint-2" / CHECKPOINT_RECORD).exists()
    assert max(r["step"] for r in _numbers(run)) == 2
    record, *_ = read_run(run)  # what the report's tables say
    assert not record["included"] and record["status"] == "diverged"
    assert record["reason"] == "status diverged: Diverged: PPO iteration 3: reward is nan"

    monkeypatch.undo()  # a rerun does not resume a diverged run (it would diverge again): a new run starts
    assert cli(["ppo", "--profile", "tiny", *runs]) == 0
    assert len(_runs_of(tmp_path, "ppo")) == 2


def test_divergence_is_one_line_with_exit_status_3(baseline):
    """A learning rate of 1e30: the first step throws the weights to ~1e30 and the next minibatch's loss is NaN; PPO
    stops there, before the backward pass and the optimizer step."""
    runs, _ = baseline
    before = set(_runs_of(runs, "ppo"))
    out = subprocess.run(
        _command("ppo", runs, "ppo.learning_rate=1e30"), cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 3 and "Traceback" not in out.stderr
    assert _message(out.stderr).startswith("diverged: PPO iteration 1: loss is nan")
    (run,) = set(_runs_of(runs, "ppo")) - before
    assert json.loads((run / "manifest.json").read_text())["status"] == "diverged"


def test_nan_dpo_loss_stops_before_the_backward_pass(tmp_path, monkeypatch, capsys):
    import dpo.trainer

    real = dpo.trainer.trl.DPOTrainer.compute_loss

    def loss_nan_at_step_3(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        return result * float("nan") if self.state.global_step == 2 else result

    monkeypatch.setattr(dpo.trainer.trl.DPOTrainer, "compute_loss", loss_nan_at_step_3)
    assert cli(["dpo", "--profile", "tiny", f"runs_dir={tmp_path}", *DPO, "dpo.checkpoint_every=2"]) == 3
    (run,) = _runs_of(tmp_path, "dpo")
    assert _message(capsys.readouterr().err).startswith(
        f"diverged: DPO step 3: loss is nan [last metrics row: step 2; run marked diverged: {run}; last good "
        f"checkpoint: {run / 'checkpoints' / 'checkpoint-2'}]"
    )
    assert [r["step"] for r in _numbers(run) if r["kind"] == "train"] == [1, 2]


# --- bad input: one line naming the culprit, exit status 2, earlier runs byte-identical ---------------------------

GOOD_ROWS = [
    {"prompt": f"Question {i}?", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"} for i in range(6)
]


TORN_LINE = '{"prompt": "p", "cho'  # a line cut short


def _rows_file(path: Path, bad_row: object | str) -> Path:
    """Six good rows with `bad_row` as row 3 (a str is written as the raw line)."""
    lines = [json.dumps(r) for r in GOOD_ROWS]
    lines.insert(2, bad_row if isinstance(bad_row, str) else json.dumps(bad_row))
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    """(command-line arguments after `dpo --profile tiny runs_dir=...`, what the one-line message must say)."""
    prefs = ["task.name=preferences"]
    (tmp / "empty-folder").mkdir()
    broken = tmp / "broken-model"  # the tiny model with its weights file cut short
    broken.mkdir()
    for f in Path(resolve_model_path(load_config("tiny").model)).iterdir():
        (broken / f.name).write_bytes(f.read_bytes()[:1000] if f.suffix == ".safetensors" else f.read_bytes())
    (tmp / "empty.jsonl").write_text("")
    long_prompts = tmp / "long.jsonl"
    long_prompts.write_text("".join(json.dumps({**r, "prompt": "word " * 300}) + "\n" for r in GOOD_ROWS))
    return [
        (["bta=0.2"], "error: unknown config key 'bta'; did you mean 'beta'"),
        (["dpo.batch_sze=4"], "error: unknown config key 'dpo.batch_sze' in section 'dpo'; did you mean 'batch_size'"),
        (["beta=-0.1"], "error: config key 'beta': must be positive, got -0.1"),
        (["dpo.batch_size=0"], "error: config key 'dpo.batch_size': must be positive, got 0"),
        (["ppo.rollout_batch_size=0"], "error: config key 'ppo.rollout_batch_size': must be positive, got 0"),
        (["dpo.checkpoint_every=0"], "error: config key 'dpo.checkpoint_every': must be positive or null, got 0"),
        (["dpo.learning_rate=fast"], "config key 'dpo.learning_rate': expected a number, got 'fast'"),
        (["resume=maybe"], "config key 'resume': expected true or false, got 'maybe'"),
        (
            ["model.name_or_path=/no/such/model"],
            "error: model.name_or_path: '/no/such/model' is not a local folder, and this profile is offline",
        ),
        (
            [f"model.name_or_path={tmp / 'empty-folder'}"],
            f"error: model.name_or_path: '{tmp / 'empty-folder'}' has no config.json",
        ),
        (
            [f"model.name_or_path={broken}"],
            f"error: cannot load a causal LM from '{broken}': Error while deserializing header",
        ),
        (
            [*prefs, f"task.path={tmp / 'none.jsonl'}"],
            f"error: task.path: '{tmp / 'none.jsonl'}' is not a local file or folder, and this profile is offline",
        ),
        (
            [*prefs, f"task.path={_rows_file(tmp / 'missing.jsonl', {'prompt': 'p', 'chosen': 'a'})}"],
            "error: missing.jsonl row 3: field 'rejected' is missing",
        ),
        (
            [*prefs, f"task.path={_rows_file(tmp / 'number.jsonl', {'prompt': 'p', 'chosen': 'a', 'rejected': 3})}"],
            "error: number.jsonl row 3: field 'rejected' must be a string, got int",
        ),
        (
            [*prefs, f"task.path={_rows_file(tmp / 'list.jsonl', {'prompt': ['p'], 'chosen': 'a', 'rejected': 'b'})}"],
            "error: list.jsonl row 3: field 'prompt' must be a string, got list",
        ),
        (
            [*prefs, f"task.path={_rows_file(tmp / 'blank.jsonl', {'prompt': 'p', 'chosen': '  ', 'rejected': 'b'})}"],
            "error: blank.jsonl row 3: field 'chosen' is empty",
        ),
        (
            [*prefs, f"task.path={_rows_file(tmp / 'same.jsonl', {'prompt': 'p', 'chosen': 'x', 'rejected': 'x'})}"],
            "error: same.jsonl row 3: 'chosen' and 'rejected' are identical",
        ),
        ([*prefs, f"task.path={_rows_file(tmp / 'torn.jsonl', TORN_LINE)}"], "error: torn.jsonl row 3: invalid JSON"),
        (
            [*prefs, f"task.path={_rows_file(tmp / 'array.jsonl', ['p', 'a', 'b'])}"],
            "error: array.jsonl row 3: expected a JSON object with fields chosen, rejected (and prompt)",
        ),
        ([*prefs, f"task.path={tmp / 'empty.jsonl'}"], "error: empty.jsonl: 0 usable preference rows, need at least 5"),
        (
            [*prefs, f"task.path={long_prompts}", "task.max_prompt_tokens=64"],
            "error: long.jsonl: 0 usable preference rows, need at least 5 (a fifth are held out for evaluation; "
            "dropped: {'prompt longer than task.max_prompt_tokens': 6})",
        ),
        (["dpo.max_length=8"], "error: dpo.max_length=8: every training pair's prompt alone is that long"),
    ]


def test_bad_input_gets_one_line_naming_the_culprit_and_earlier_runs_stay_byte_identical(baseline, tmp_path, capsys):
    baseline, _ = baseline
    before = _files(baseline)
    tried = _bad_inputs(tmp_path)
    for args, message in tried:
        status = cli(["dpo", "--profile", "tiny", f"runs_dir={baseline}", *args])
        err = capsys.readouterr().err
        assert status == 2, (args, err[-2000:])
        assert message in _message(err) and "Traceback" not in err, (args, err[-2000:])
        assert {p: b for p, b in _files(baseline).items() if p in before} == before, args  # nothing earlier changed
    assert cli(["dpo", "--profile", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown profile 'nope'")
    assert cli(["ppo", "--profile", "tiny", f"runs_dir={baseline}", "reward_model.max_length=8"]) == 2
    assert _message(capsys.readouterr().err) == (
        "error: reward_model.max_length=8: every training pair is longer, "
        "so RewardTrainer drops them all; raise reward_model.max_length"
    )
    assert {p: b for p, b in _files(baseline).items() if p in before} == before

    # Only the two max_length cases get as far as a run directory: a new one each, failed with the error.
    new = set(_files(baseline)) - set(before)
    assert {p.parts[1] for p in new} == {"dpo", "reward_model"}
    for method, key in (("dpo", "dpo.max_length=8"), ("reward_model", "reward_model.max_length=8")):
        (failed,) = {p.parts[2] for p in new if p.parts[1] == method}
        manifest = json.loads((baseline / "tiny" / method / failed / "manifest.json").read_text())
        assert manifest["status"] == "failed" and key in manifest["error"]
    assert manifest["pairs"] == {"given": 32, "dropped_too_long": 32}  # the reward model's count


def test_corrupt_checkpoint_is_named_then_a_failed_run_resumes(tmp_path, monkeypatch, capsys):
    """A run that crashed at iteration 3 (checkpoint at 2): a corrupt checkpoint is refused with its name and
    nothing touched; once intact, the next run resumes it and takes each iteration once."""
    import ppo.train

    args = ["ppo", "--profile", "tiny", f"runs_dir={tmp_path}", "ppo.checkpoint_every=2"]
    real, calls = ppo.train.reward_scores, []

    def power_cut_at_iteration_3(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("power cut")
        return real(*a, **kw)

    monkeypatch.setattr(ppo.train, "reward_scores", power_cut_at_iteration_3)
    with pytest.raises(RuntimeError, match="power cut"):
        cli(args)
    monkeypatch.undo()
    (run,) = _runs_of(tmp_path, "ppo")
    assert json.loads((run / "manifest.json").read_text())["status"] == "failed"
    state = run / "checkpoints" / "checkpoint-2" / "pytorch_model.bin"
    intact = state.read_bytes()

    state.write_bytes(intact[: len(intact) // 2])  # a torn file (a disk filling up, a bad copy)
    before = _files(tmp_path)
    assert cli(args) == 2
    assert _message(capsys.readouterr().err) == (
        f"error: checkpoint {run}/checkpoints/checkpoint-2 is corrupt: pytorch_model.bin differs from what was saved "
        "(sha256); delete that folder to resume from an earlier checkpoint (or from the start), or set resume=false "
        "to leave this run as it is and start a new one"
    )
    assert _files(tmp_path) == before

    state.write_bytes(intact)
    assert cli(args) == 0
    assert f"resuming {run} (status failed) from its checkpoint at step 2" in capsys.readouterr().out
    assert _runs_of(tmp_path, "ppo") == [run]
    assert [r["step"] for r in _numbers(run) if r["kind"] == "train"] == [1, 2, 3, 4]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["error"] is None
    assert manifest["resumed"][0]["previous_error"] == "RuntimeError: power cut"


def test_killed_run_is_reported_as_killed(tmp_path):
    import torch

    from rlhf.rundir import RunDir

    run = RunDir.create(load_config("tiny", [f"runs_dir={tmp_path}"]), "dpo", 0, torch.device("cpu"), None)
    assert read_run(run.path)[0]["reason"] == "status running, still being written"
    run.release()  # as when its process is killed
    assert read_run(run.path)[0]["reason"] == "status running, killed (no live process; run it again to resume it)"


def test_over_long_pairs_are_counted(tiny_path, tokenizer, tmp_path):
    """DPO: pairs whose prompt alone is dpo.max_length tokens long are dropped, and TRL cuts the other pairs longer
    than that; counted."""
    import torch

    from dpo.trainer import build_trainer, count_long_pairs
    from rlhf.data import build_preferences
    from rlhf.models import freeze, load_causal_lm
    from rlhf.sequences import encode_completions

    cfg = load_config("tiny", [f"runs_dir={tmp_path}", "dpo.max_length=36"])
    prefs = build_preferences(cfg)
    trainer = build_trainer(
        cfg,
        load_causal_lm(tiny_path),
        freeze(load_causal_lm(tiny_path)),
        tokenizer,
        prefs.train,
        0,
        tmp_path / "out",
        [],
    )
    counts = count_long_pairs(trainer, 36)

    # The same counts from the pairs' token lengths, tokenised as TRL does (rlhf.sequences)
    prompts = prefs.train["prompt"]
    chosen, rejected = (encode_completions(tokenizer, prompts, prefs.train[side]) for side in ("chosen", "rejected"))
    prompt_len = chosen.prompt_mask.sum(dim=1)
    longest = prompt_len + torch.maximum(chosen.response_mask.sum(dim=1), rejected.response_mask.sum(dim=1))
    dropped, cut = int((prompt_len >= 36).sum()), int(((prompt_len < 36) & (longest > 36)).sum())
    assert dropped > 0 and cut > 0
    assert counts == {
        "given": len(prefs.train),
        "dropped_prompt_too_long": dropped,
        "used": len(prefs.train) - dropped,
        "truncated": cut,
    }
    assert count_long_pairs(trainer, None)["truncated"] == 0
