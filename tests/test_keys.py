"""Every key that decides reuse, pinned: run keys, the reward model's and the SFT model's keys, the preference set's,
the evaluation caches' names, for every profile under a few variations. tests/keys.json holds them as the code
computed them before the identity module existed; a completed run stays reusable only while its key is the same."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from datasets import Dataset

from reward_model.train import reward_model_key
from rlhf.config import load_config
from rlhf.data import PreferenceSet, data_sections, preference_dir
from rlhf.evaluate import EvalContext, _rm_pair_metrics_file
from rlhf.reference import sft_key
from rlhf.rundir import run_key

PINNED = Path(__file__).with_name("keys.json")
PROFILES = ("default", "tiny", "hh", "gpu", "imdb-gpt2")
VARIANTS = {
    "as-is": [],
    "beta": ["beta=0.05"],
    "checkpointing": ["model.gradient_checkpointing=true"],
    "added": ["model.tf32=true", "task.n_validation_prompts=4", "eval.split=validation", "task.gold_batch_size=16"],
    "lora": ["lora.enabled=true", "lora.r=4", "weight_decay=0.01"],
    "sft-stage": ["sft_stage.enabled=true", "sft_stage.path=corpus.jsonl"],
    "not-settings": ["seeds=[0, 5]", "runs_dir=elsewhere", "resume=false", "report.spike_k=3", "sweep.seed=3",
                     "grid.jobs=2", "reward_model.checkpoint_every=3", "ppo.checkpoint_every=2",
                     "dpo.checkpoint_every=5", "rloo.checkpoint_every=5", "online_dpo.checkpoint_every=5"],
    "own-sections": ["dpo.learning_rate=0.123", "ppo.learning_rate=0.123", "rloo.learning_rate=0.123",
                     "online_dpo.batch_size=6", "sft.learning_rate=0.123", "bon.n=[1]",
                     "reward_model.learning_rate=0.123"],
    "reward-model": ["reward_model.per_seed=false", "reward_model.seed=3", "budget.pairs=16",
                     "reward_model.epochs=2"],
}
SEEDS = (0, 1)
DATA, RM, REF = "d" * 64, "runs/p/reward_model/r/checkpoints/final", "a/model/folder"
CORPUS = Dataset.from_dict({"text": ["one text", "another"]})
CHOSEN = Dataset.from_dict({"prompt": ["a prompt"], "completion": ["its chosen response"]})
PAIRS = [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "q", "chosen": "d", "rejected": "s"}]


def run_keys(cfg) -> dict[str, str]:
    """Every method's run key for this config at seed 0 and 1, with the extra inputs each method passes."""
    prefs = PreferenceSet(path=None, manifest={"sha256": DATA}, train=None, heldout=None, validation=None)
    online = {"reward_model_path": RM, "num_processes": 1}
    out = {}
    for seed in SEEDS:
        methods = {
            "reference": (cfg, cfg.eval.seed, DATA, {"reference_model": REF}),
            "ppo": (cfg, seed, DATA, online),
            "ppo-gt": (cfg, seed, DATA, {"reward_model_path": None, "num_processes": 1}),
            "dpo": (cfg, seed, DATA, online),
            "dpo-ipo": (cfg.with_values({"dpo.loss_type": "ipo"}), seed, DATA, online),
            "dpo-robust": (cfg.with_values({"dpo.loss_type": "robust", "dpo.label_smoothing": 0.1}), seed, DATA,
                           online),
            "rloo": (cfg, seed, DATA, online),
            "online-dpo": (cfg, seed, DATA, online),
            "bon": (cfg, cfg.eval.seed, DATA, {**online, "bon_n": sorted(set(cfg.bon.n)), "reference_model": REF}),
            "sft-chosen": (cfg, seed, DATA, {"reference_model": REF}),
            "reward_model": (cfg, seed, DATA, {"reward_model_key": reward_model_key(cfg, prefs, seed),
                                               "reference_model": REF}),
        }
        for method, (c, s, data, extra) in methods.items():
            out[f"seed{seed}/{method}"] = run_key(c, method, s, data, extra)
    key = sft_key(cfg, CORPUS)
    out["sft"] = run_key(cfg, "sft", cfg.sft_stage.seed, key["texts_sha256"],
                         {"sft_key": key, "base_model_path": REF, "texts": len(CORPUS)})
    return out


def artifact_keys(cfg) -> dict:
    prefs = PreferenceSet(path=None, manifest={"sha256": DATA}, train=None, heldout=None, validation=None)
    out = {f"reward_model/seed{seed}": reward_model_key(cfg, prefs, seed) for seed in SEEDS}
    out["sft/corpus"], out["sft/chosen"] = sft_key(cfg, CORPUS), sft_key(cfg, CHOSEN)
    out["preferences"] = {"folder": preference_dir(cfg).name, "config_hash": cfg.section_hash(*data_sections(cfg))}
    out["eval_settings"] = cfg.eval_settings()
    for arithmetic in ("cpu-fp32", "cuda-bf16"):
        cache = f"pi_ref-{cfg.section_hash(*cfg.reference_sections(), 'task', 'eval')[:12]}-{arithmetic}.pt"
        pairs = f"{Path(cache).stem}-pairs-{DATA[:12]}.pt"
        ctx = EvalContext(prompts=[], ref_model=None, tokenizer=None, cfg=cfg.eval, autocast=None,
                          heldout_pairs=PAIRS, arithmetic=arithmetic)
        out[f"eval_cache/{arithmetic}"] = [cache, pairs, _rm_pair_metrics_file(Path("rm"), ctx).name]
    return out


def dpo_reference_cache() -> str:
    """The name of DPO's cache of pi_ref's log-probs of its pairs, for fixed inputs."""
    key = hashlib.sha256(json.dumps({
        "reference": REF, "cut": 128, "batch_size": 8, "torch": "2.0.0", "arithmetic": "cpu-no",
        "ids": [[[1, 2], [3]], [[4, 5], [6]], [[7], [8, 9]]]}).encode()).hexdigest()
    return f"dpo-ref-logps-{key[:16]}.pt"


def keys_of_today() -> dict:
    out = {"dpo_reference_cache": dpo_reference_cache()}
    for profile in PROFILES:
        for variant, overrides in VARIANTS.items():
            cfg = load_config(profile, overrides)
            for run_cfg in cfg.betas()[:2]:
                out.update({f"{profile}/{variant}/beta{run_cfg.beta:g}/{k}": v for k, v in run_keys(run_cfg).items()})
            out.update({f"{profile}/{variant}/{k}": v for k, v in artifact_keys(cfg).items()})
    return out


def test_every_key_is_what_it_was():
    assert json.loads(json.dumps(keys_of_today())) == json.loads(PINNED.read_text())
