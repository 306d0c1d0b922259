"""The keys that decide reuse (rlhf/keys.py): every one pinned as computed before the identity module existed (a run
key as version 2 of the keys gave it, which the runs completed then hold), every key of today's version the same but
where a rename re-keyed it on purpose, and every config field declaring its role."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from datasets import Dataset

from rlhf.config import Config, ModelConfig, _f, load_config
from rlhf.data import preference_dir
from rlhf.evaluate import EvalContext, _rm_pair_metrics_file
from rlhf.keys import (
    IDENTITY,
    RENAMED,
    RUN,
    added,
    check_roles,
    eval_settings,
    name_at,
    preference_set_key,
    reference_cache_names,
    reference_logps_name,
    reward_model_key,
    run_key,
    run_keys,
    sft_key,
)
from rlhf.models import default_device
from rlhf.rundir import RunDir, completed_run

PINNED = Path(__file__).with_name("keys.json")
PROFILES = ("default", "tiny", "hh", "gpu", "imdb-gpt2")
VARIANTS = {
    "as-is": [],
    "beta": ["beta=0.05"],
    "checkpointing": ["model.gradient_checkpointing=true"],
    "added": ["model.tf32=true", "task.n_validation_prompts=4", "eval.split=validation", "task.gold_batch_size=16"],
    "lora": ["lora.enabled=true", "lora.r=4", "weight_decay=0.01"],
    "sft-stage": ["sft_stage.enabled=true", "sft_stage.path=corpus.jsonl"],
    "not-settings": [
        "seeds=[0, 5]",
        "runs_dir=elsewhere",
        "resume=false",
        "report.spike_k=3",
        "sweep.seed=3",
        "grid.jobs=2",
        "reward_model.checkpoint_every=3",
        "ppo.checkpoint_every=2",
        "dpo.checkpoint_every=5",
        "rloo.checkpoint_every=5",
        "online_dpo.checkpoint_every=5",
    ],
    "own-sections": [
        "dpo.learning_rate=0.123",
        "ppo.learning_rate=0.123",
        "rloo.learning_rate=0.123",
        "online_dpo.batch_size=6",
        "preferred_ft.learning_rate=0.123",
        "bon.n=[1]",
        "reward_model.learning_rate=0.123",
    ],
    "reward-model": ["reward_model.per_seed=false", "reward_model.seed=3", "budget.pairs=16", "reward_model.epochs=2"],
    "attention": ["model.attention=eager"],
}
SEEDS = (0, 1)
DATA, RM, REF = "d" * 64, "runs/p/reward_model/r/checkpoints/final", "a/model/folder"
CORPUS = Dataset.from_dict({"text": ["one text", "another"]})
CHOSEN = Dataset.from_dict({"prompt": ["a prompt"], "completion": ["its chosen response"]})
PAIRS = [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "q", "chosen": "d", "rejected": "s"}]
PINNED_VERSION = 2  # of the run keys in keys.json, each under the name its method had then


def every_run_key(cfg, version: int = PINNED_VERSION) -> dict[str, str]:
    """Every method's run key for this config at seed 0 and 1, with the extra inputs each method passes, as the keys
    of `version` gave it."""
    online = {"reward_model_path": RM, "num_processes": 1}
    out = {}
    for seed in SEEDS:
        methods = {
            "reference": (cfg, cfg.eval.seed, DATA, {"reference_model": REF}),
            "ppo": (cfg, seed, DATA, online),
            "ppo-gt": (cfg, seed, DATA, {"reward_model_path": None, "num_processes": 1}),
            "dpo": (cfg, seed, DATA, online),
            "dpo-ipo": (cfg.with_values({"dpo.loss_type": "ipo"}), seed, DATA, online),
            "dpo-robust": (
                cfg.with_values({"dpo.loss_type": "robust", "dpo.label_smoothing": 0.1}),
                seed,
                DATA,
                online,
            ),
            "rloo": (cfg, seed, DATA, online),
            "online-dpo": (cfg, seed, DATA, online),
            "bon": (cfg, cfg.eval.seed, DATA, {**online, "bon_n": sorted(set(cfg.bon.n)), "reference_model": REF}),
            "preferred-ft": (cfg, seed, DATA, {"reference_model": REF}),
        }
        for method, (c, s, data, extra) in methods.items():
            out[f"seed{seed}/{name_at(method, version)}"] = run_key(c, method, s, data, extra, version)
    return out


def artifact_keys(cfg) -> dict:
    out = {f"reward_model/seed{seed}": reward_model_key(cfg, DATA, seed) for seed in SEEDS}
    out["sft/corpus"], out["sft/chosen"] = sft_key(cfg, CORPUS), sft_key(cfg, CHOSEN)
    out["preferences"] = {"folder": preference_dir(cfg).name, "config_hash": preference_set_key(cfg)}
    out["eval_settings"] = eval_settings(cfg)
    for arithmetic in ("cpu-fp32", "cuda-bf16"):
        ctx = EvalContext(
            prompts=[],
            ref_model=None,
            tokenizer=None,
            cfg=cfg.eval,
            autocast=None,
            heldout_pairs=PAIRS,
            arithmetic=arithmetic,
        )
        out[f"eval_cache/{arithmetic}"] = [
            *reference_cache_names(cfg, arithmetic, DATA),
            _rm_pair_metrics_file(Path("rm"), ctx).name,
        ]
    return out


def keys_of_today() -> dict:
    out = {
        "dpo_reference_cache": reference_logps_name(
            REF, 128, 8, "2.0.0", "cpu-no", [[[1, 2], [3]], [[4, 5], [6]], [[7], [8, 9]]]
        )
    }
    for profile in PROFILES:
        for variant, overrides in VARIANTS.items():
            cfg = load_config(profile, overrides)
            for run_cfg in cfg.betas()[:2]:
                out.update(
                    {f"{profile}/{variant}/beta{run_cfg.beta:g}/{k}": v for k, v in every_run_key(run_cfg).items()}
                )
            out.update({f"{profile}/{variant}/{k}": v for k, v in artifact_keys(cfg).items()})
    return out


# Re-keyed on purpose since keys.json was pinned: the SFT stage's model trained with LoRA adapters (its key left them
# out, so one trained with adapters stood for one trained without), and what that model, as pi_ref, computes for
# every run: the preference set it samples and its eval caches (imdb-gpt2 is the profile whose SFT stage is on)
RE_KEYED = {f"{profile}/lora/sft/{texts}" for profile in PROFILES for texts in ("corpus", "chosen")} | {
    f"imdb-gpt2/lora/{shared}"
    for shared in ("preferences", "eval_settings", "eval_cache/cpu-fp32", "eval_cache/cuda-bf16")
}


def test_every_key_is_what_it_was():
    today, pinned = json.loads(json.dumps(keys_of_today())), json.loads(PINNED.read_text())
    for key in RE_KEYED:
        assert today.pop(key) != pinned.pop(key), key
    assert today == pinned


@pytest.mark.parametrize("profile", ["tiny", "imdb-gpt2"])
def test_the_sft_stages_model_is_keyed_by_its_lora_adapters_where_it_trains_them(profile):
    """LoRA on and off train two different SFT models: two keys. Switched off, its other settings compute nothing,
    and every SFT key stays as it was pinned before LoRA joined it."""
    cfg = load_config(profile, VARIANTS["sft-stage"])
    lora = cfg.with_values({"lora.enabled": True})
    assert sft_key(lora, CORPUS) != sft_key(cfg, CORPUS)
    assert sft_key(lora, CORPUS) != sft_key(lora.with_values({"lora.r": 4}), CORPUS)
    assert sft_key(cfg.with_values({"lora.r": 4}), CORPUS) == sft_key(cfg, CORPUS)
    assert sft_key(cfg, CORPUS) == json.loads(PINNED.read_text())[f"{profile}/sft-stage/sft/corpus"]


@pytest.mark.parametrize("profile", ["tiny", "imdb-gpt2"])
def test_what_pi_ref_shares_is_keyed_by_the_sft_stages_lora_adapters(profile):
    """Where pi_ref is the SFT stage's model, one trained with LoRA adapters samples another preference set and other
    eval samples than one trained without; where the stage is off, LoRA trains only the policies, and pi_ref's shared
    keys stay as they were."""
    on = load_config(profile, VARIANTS["sft-stage"])
    for sft in (on, on.with_values({"sft_stage.enabled": False})):
        lora = sft.with_values({"lora.enabled": True})
        differ = sft.sft_stage.enabled
        assert (preference_set_key(lora) != preference_set_key(sft)) == differ
        assert (eval_settings(lora) != eval_settings(sft)) == differ
        assert (reference_cache_names(lora, "cpu-fp32", DATA) != reference_cache_names(sft, "cpu-fp32", DATA)) == differ


def test_a_config_key_added_without_a_role_stops_the_import():
    """A field without a declared role would count in every key unseen: completed runs orphaned, or reused under a
    setting they never had. The check names it; a field with a role passes."""

    @dataclasses.dataclass
    class WithoutRole(ModelConfig):
        new_knob: int = 3

    @dataclasses.dataclass
    class WithRole(ModelConfig):
        new_knob: int = _f(3, IDENTITY, "a knob")

    for model, fails in ((WithoutRole, True), (WithRole, False)):
        cfg = dataclasses.make_dataclass(
            "Config", [("model", model, dataclasses.field(default_factory=model))], bases=(Config,)
        )
        if fails:
            with pytest.raises(TypeError, match="config key 'model.new_knob' declares no role"):
                check_roles(cfg)
        else:
            check_roles(cfg)


def test_a_config_key_added_now_orphans_no_run_and_no_cache():
    """A field declared `added(4)` counts in no key while at its default: every run, reward model, SFT model,
    preference set and cache keeps its key; set away from it, it counts wherever its section does."""

    @dataclasses.dataclass
    class WithNewKnob(ModelConfig):
        new_knob: int = _f(3, added(4), "a knob added after every kind of key was fixed")

    extended = dataclasses.make_dataclass(
        "Config", [("model", WithNewKnob, dataclasses.field(default_factory=WithNewKnob))], bases=(Config,)
    )
    cfg = load_config("tiny")

    def keys(c):
        return (
            run_key(c, "dpo", 0, DATA, None),
            reward_model_key(c, DATA, 0),
            sft_key(c, CORPUS),
            preference_set_key(c),
            eval_settings(c),
            reference_cache_names(c, "cpu-fp32", DATA),
        )

    def with_knob(value):
        values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
        return extended(**{**values, "model": WithNewKnob(**dataclasses.asdict(cfg.model), new_knob=value)})

    assert keys(with_knob(3)) == keys(cfg)
    changed = [a != b for a, b in zip(keys(with_knob(4)), keys(cfg))]
    assert changed == [True, True, True, True, True, True]  # every key reads the model section


@pytest.mark.parametrize("profile", ["tiny", "default"])
def test_a_rename_re_keys_the_renamed_method_alone(profile):
    """Today's keys are version 2's but where a method or section was renamed since: Preferred-FT's alone."""
    cfg = load_config(profile, ["preferred_ft.learning_rate=0.123"])
    now, pinned = every_run_key(cfg, RUN.version), every_run_key(cfg)
    renamed = {f"seed{s}/{m}" for s in SEEDS for m in ("preferred-ft", "sft-chosen")}
    assert {k: v for k, v in now.items() if k not in renamed} == {k: v for k, v in pinned.items() if k not in renamed}
    assert now["seed0/preferred-ft"] != pinned["seed0/sft-chosen"]
    assert RENAMED[3] == {"preferred-ft": "sft-chosen", "preferred_ft": "sft"}


def test_a_run_completed_before_the_rename_is_still_found(tmp_path):
    """A Preferred-FT run written as `sft-chosen` (its directory, its manifest's key of version 2, its config's `sft`
    section) is reused by `make preferred-ft`, and one interrupted then is resumed where it is."""
    cfg = load_config("tiny", [f"runs_dir={tmp_path}", "preferred_ft.learning_rate=0.123"])
    extra = {"reference_model": REF}
    ((old_dir, old_key),) = [(d, k) for d, k in run_keys(cfg, "preferred-ft", 0, DATA, extra) if d == "sft-chosen"]
    assert old_key == run_key(cfg, "preferred-ft", 0, DATA, extra, version=2)
    assert completed_run(cfg, "preferred-ft", 0, DATA, extra) is None
    old = RunDir.create(cfg, "preferred-ft", 0, default_device(), DATA, extra)  # today's, then made an old one
    old.release()
    moved = tmp_path / "tiny" / old_dir / old.path.name
    moved.parent.mkdir(parents=True)
    old.path.rename(moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    (moved / "manifest.json").write_text(
        json.dumps({**manifest, "method": old_dir, "run_key": old_key, "status": "failed"})
    )
    run, checkpoint = RunDir.open(cfg, "preferred-ft", 0, default_device(), DATA, extra)
    assert run.path == moved and checkpoint is None  # resumed in its own directory, from its start
    run.finish()
    assert completed_run(cfg, "preferred-ft", 0, DATA, extra) == moved
    assert completed_run(cfg.with_values({"preferred_ft.learning_rate": 0.5}), "preferred-ft", 0, DATA, extra) is None
