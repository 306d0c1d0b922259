import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.__main__ import main as cli
from rlhf.config import PROJECT_ROOT, Config, load_config
from rlhf.errors import UserError
from rlhf.keys import preference_set_key


def test_profiles_load_offline():
    for name in ("default", "tiny", "hh", "imdb-gpt2", "gpu"):
        cfg = load_config(name)
        assert isinstance(cfg, Config) and cfg.profile == name
    assert load_config("imdb-gpt2").hub_access and not load_config("default").hub_access


def test_the_gpu_profile_is_the_frontier_offline():
    """Issue #22, item 1: a beta sweep x several seeds of both methods and the controls, thousands of pairs and at
    least 500 test prompts, with no hub."""
    cfg = load_config("gpu")
    assert not cfg.hub_access and cfg.model.name_or_path.startswith("embedded:") and cfg.task.name == "sentiment"
    assert len(cfg.beta_sweep) >= 3 and len(cfg.seeds) >= 3
    assert {"ppo", "dpo", "ppo-gt", "bon", "preferred-ft"} <= set(cfg.grid.methods)
    assert cfg.data.n_prompts * cfg.data.responses_per_prompt // 2 >= 2000
    assert cfg.task.n_eval_prompts - cfg.task.n_validation_prompts >= 500 and cfg.eval.n_prompts is None


def test_unknown_key_names_key_and_neighbours():
    with pytest.raises(UserError) as e:
        load_config("tiny", ["data.sed=3"])
    assert "'data.sed'" in str(e.value) and "did you mean 'seed'" in str(e.value)
    with pytest.raises(UserError, match="unknown config key 'bta'.*did you mean 'beta'"):
        load_config("tiny", ["bta=0.2"])


def test_unknown_key_in_yaml_file_is_named(tmp_path):
    (tmp_path / "p.yaml").write_text("beta: 0.1\ndata:\n  n_promts: 3\n")
    with pytest.raises(UserError, match=r"p\.yaml: unknown config key 'data\.n_promts'.*did you mean 'n_prompts'"):
        load_config("p", config_dir=tmp_path)


def test_dotted_overrides_parse_yaml_values():
    cfg = load_config(
        "tiny", ["data.seed=7", "beta=0.5", "seeds=[3, 4]", "data.n_prompts=null", "reward_model.learning_rate=1e-4"]
    )
    assert cfg.data.seed == 7 and cfg.beta == 0.5 and cfg.seeds == [3, 4] and cfg.data.n_prompts is None
    assert cfg.reward_model.learning_rate == 1e-4  # YAML 1.1 alone would read "1e-4" as a string


@pytest.mark.parametrize(
    "override, message",
    [
        ("beta=-1", "'beta': must be positive"),
        ("data.batch_size=0", "'data.batch_size': must be positive"),
        ("data.seed=abc", "'data.seed': expected an integer"),
        ("data.labeling=vote", "'data.labeling': 'vote' is not one of"),
        ("data.responses_per_prompt=3", "'data.responses_per_prompt': must be an even number"),
        ("seeds=1", "'seeds': expected a list"),
        ("model=3", "section 'model' must be a mapping"),
        ("beta", "must look like key=value"),
        ("report_to=[tensorbord]", "'report_to': 'tensorbord' is not one of"),
        ("report_to=[wandb]", "'report_to': wandb is not installed here"),  # not a dependency: CI never has it
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config("tiny", [override])


def test_unknown_profile_lists_profiles():
    with pytest.raises(UserError, match="unknown profile 'nope'.*tiny"):
        load_config("nope")


def test_cli_prints_one_line_error_without_traceback():
    out = subprocess.run(
        [sys.executable, "-m", "pipelines", "config", "--profile", "tiny", "data.sed=1"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("error: unknown config key 'data.sed'") and "Traceback" not in out.stderr


def test_the_preference_set_key_reads_only_its_sections():
    a, b = load_config("tiny"), load_config("tiny", ["beta=0.3"])
    assert preference_set_key(a) == preference_set_key(b)
    c = load_config("tiny", ["data.seed=9"])
    assert preference_set_key(a) != preference_set_key(c)


def test_keys_added_later_leave_the_cache_hash_as_it_was_while_at_their_default():
    """A preference set built before `model.tf32` or `task.gold_model` existed keeps its hash (and is reused); turning
    such a key away from that default changes the hash."""
    import dataclasses
    import hashlib
    import json

    cfg = load_config("default", ["task.n_validation_prompts=0", "model.attention=sdpa"])  # every key added later
    # at its default
    added_later = (
        "tf32",
        "attention",
        "gradient_checkpointing",
        "gold_model",
        "gold_positive_label",
        "gold_batch_size",
        "n_validation_prompts",
    )
    before = {
        s: {k: v for k, v in dataclasses.asdict(getattr(cfg, s)).items() if k not in added_later}
        for s in ("model", "task", "data")
    }
    assert preference_set_key(cfg) == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()
    tf32 = load_config("default", ["task.n_validation_prompts=0", "model.attention=sdpa", "model.tf32=true"])
    assert preference_set_key(tf32) != preference_set_key(cfg)


# Every path and list key with a bad value: (override or overrides, the key its one line names, what it says).
# {file} is an existing file, {locked} a directory this user cannot write into.
BAD_PATHS_AND_LISTS = [
    (("task.name=preferences", "task.path="), "task.path", "is required for task 'preferences'"),
    (("sft_stage.enabled=true", "sft_stage.path="), "sft_stage.path", "is required with sft_stage.source=corpus"),
    ("model.name_or_path=", "model.name_or_path", "must not be empty"),
    ("runs_dir={file}/runs", "runs_dir", "is a file"),
    ("runs_dir={locked}/runs", "runs_dir", "is not writable"),
    ("runs_dir=", "runs_dir", "must not be empty"),
    ("runs_dir=[runs]", "runs_dir", "expected a string"),
    ("report.out_dir={file}/reports", "report.out_dir", "is a file"),
    ("report.out_dir={locked}", "report.out_dir", "is not writable"),
    ("report.out_dir=", "report.out_dir", "must not be empty"),
    ("seeds=[0, 0]", "seeds", "lists 0 more than once"),
    ("seeds=[]", "seeds", "must list at least one seed"),
    ("seeds=[0, one]", "seeds[1]", "expected an integer"),
    ("seeds=[-1]", "seeds", "a seed must lie in [0, 2**32)"),
    ("reward_model.seed=-1", "reward_model.seed", "a seed must lie in [0, 2**32)"),  # not a list: every seed key
    ("seeds=null", "seeds", "expected a list"),
    ("beta_sweep=[0.1, 0.1]", "beta_sweep", "lists 0.1 more than once"),
    ("beta_sweep=[0.1, high]", "beta_sweep[1]", "expected a number"),
    ("beta_sweep=[0]", "beta_sweep", "every beta must be positive"),
    ("report_to=[tensorboard, tensorboard]", "report_to", "lists 'tensorboard' more than once"),
    ("report_to=[3]", "report_to[0]", "expected a string"),
    ("report_to=3", "report_to", "expected list[str] | str"),
    ("report_to=tensorbord", "report_to", "'tensorbord' is not one of"),
    ("lora.target_modules=[q_proj, q_proj]", "lora.target_modules", "lists 'q_proj' more than once"),
    ("lora.target_modules=['']", "lora.target_modules", "must not contain empty names"),
    ("bon.n=[]", "bon.n", "must list at least one N"),
    ("bon.n=[4, 4]", "bon.n", "lists 4 more than once"),
    ("bon.n=[four]", "bon.n[0]", "expected an integer"),
    ("sweep.learning_rates=[]", "sweep.learning_rates", "must list positive learning rates"),
    ("sweep.learning_rates=[1e-5, 1e-5]", "sweep.learning_rates", "lists 1e-05 more than once"),
    ("sweep.epochs=[1, 1]", "sweep.epochs", "lists 1 more than once"),
    ("sweep.ppo_epochs=[]", "sweep.ppo_epochs", "must list positive integers"),
    ("grid.methods=[]", "grid.methods", "must list at least one method"),
    ("grid.methods=[dpo, dpo]", "grid.methods", "lists 'dpo' more than once"),
    ("grid.methods=[kto]", "grid.methods", "unknown method 'kto'"),
    ("report.kl_levels=[]", "report.kl_levels", "must be a list of KL levels"),
    ("report.kl_levels=[5, 5]", "report.kl_levels", "lists 5.0 more than once"),
    ("report.kl_levels=[five]", "report.kl_levels[0]", "expected a number"),
]


def _overrides(case: str | tuple[str, ...]) -> tuple[str, ...]:
    return (case,) if isinstance(case, str) else case


@pytest.mark.parametrize(
    "overrides, key, says", BAD_PATHS_AND_LISTS, ids=[" ".join(_overrides(case[0])) for case in BAD_PATHS_AND_LISTS]
)
def test_a_bad_path_or_list_is_one_line_naming_the_key(overrides, key, says, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root writes into any mode; no one writes into a process's /proc entry
        locked = Path(f"/proc/{os.getpid()}")
    assert not os.access(locked, os.W_OK)
    overrides = [o.format(file=tmp_path / "file", locked=locked) for o in _overrides(overrides)]
    assert cli(["config", "--profile", "tiny", *overrides]) == 2  # a traceback would raise here instead
    err = capsys.readouterr().err
    assert err.startswith(f"error: config key '{key}': ") and err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "file").is_dir() and not (locked / "runs").exists()  # nothing was created


@pytest.mark.parametrize(
    "given, trackers", [("tensorboard", ["tensorboard"]), ("none", []), ("[tensorboard]", ["tensorboard"]), ("[]", [])]
)
def test_report_to_takes_a_string_as_trainingarguments_does(given, trackers, tmp_path):
    assert load_config("tiny", [f"report_to={given}"]).report_to == trackers
    (tmp_path / "p.yaml").write_text(f"report_to: {given}\n")  # from a profile's file too
    assert load_config("p", config_dir=tmp_path).report_to == trackers
    assert "tensorboard" in load_config("tiny", ["report_to=all"]).report_to  # every tracker installed here
