"""What makes two runs, or two things runs share, the same: every key that decides reuse is computed here.

A method's run (PPO, DPO, the baselines, pi_ref's evaluation) is found again by its `run_key`, a model other runs
build on by its artefact key (`reward_model_key`, `sft_key`): a completed run is reused, an interrupted one
resumed (rlhf/rundir.py). What runs share outside their directories, the preference set and the caches of pi_ref's
passes, lives under a name made from its key. Every key reads the config through the role each field declares
where it is defined (the second argument of `_f` in rlhf/config.py):

    IDENTITY   what is computed depends on it: it counts in every key that reads its section
    NEUTRAL    the same numbers at another cost (gradient checkpointing): it counts in the keys of runs, which
               record their seconds and memory, not in those of what runs of any cost share
    OUTSIDE    not a setting of what is computed (which runs to launch, where they go, how often resume points are
               saved, the report): it counts in no key
    added(v)   a field that joined the keys at version v (IDENTITY, or `added(v, NEUTRAL)`): a key of an older
               version leaves it out while it holds its default, so that adding it orphans no run and invalidates
               no cache

Each kind of key keeps the version its form was fixed at (`Form` below); a field added to the config now is
`added(4)`. A section with an `enabled` switch (LoRA, the SFT stage) whose switch is left out is left out whole:
switched off, it computes nothing. So such a section joins a kind of key late by being read as the keys before its
switch was added read it (`SFT_LORA`): it counts where it is switched on, and every key with it off stays the same.

Raising a kind's version re-keys it on purpose. What a run was keyed by before stays found: `run_keys` gives the key
of today's version and the keys earlier versions gave the same run, each with the run directory it went to
(`RENAMED`: a method or section that changed its name keeps, in the keys of the versions before, the name it had).
The reward model's key has one version only: raising it to 3 retrains every reward model once, and the runs built on
one run again with the new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from rlhf.methods import own_sections

if TYPE_CHECKING:
    from datasets import Dataset

    from rlhf.config import Config


class Role(NamedTuple):
    kind: str  # "identity", "neutral" or "outside"
    version: int = 0  # the version of the keys that first held the field


IDENTITY, NEUTRAL, OUTSIDE = Role("identity"), Role("neutral"), Role("outside")


def added(version: int, role: Role = IDENTITY) -> Role:
    return role._replace(version=version)


class Form(NamedTuple):
    version: int  # fields `added` after it count only away from their default
    neutral: bool  # NEUTRAL fields count: the key of a run, which records its cost


# Version 1 added model.tf32, task.gold_*, task.n_validation_prompts, eval.split and the LoRA and SFT-stage
# switches; version 2 weight_decay; version 3 renamed Preferred-FT (`RENAMED`), and the reward model's key reads the
# whole model section (before, the model's name alone: a reward model trained in one precision was reused by runs
# in another), re-keying every reward model once on purpose; model.attention is `added(4)`.
SHARED = Form(0, neutral=False)  # the preference set and pi_ref's caches: shared by runs whatever their cost
REWARD_MODEL = Form(3, neutral=True)
SFT_MODEL = Form(1, neutral=True)
# LoRA joined the SFT model's key late (before, a stage trained with adapters and one without shared a key): read as
# version 0 read it, before its switch was `added(1)`, it counts switched on and leaves every other SFT key as it was
SFT_LORA = SFT_MODEL._replace(version=0)
RUN = Form(3, neutral=True)

# version -> {name from that version on: the name before it}, for methods (run directories) and config sections
RENAMED = {3: {"preferred-ft": "sft-chosen", "preferred_ft": "sft"}}


def name_at(name: str, version: int) -> str:
    """`name` as the keys of `version` wrote it."""
    for since in sorted(RENAMED, reverse=True):
        if version < since:
            name = RENAMED[since].get(name, name)
    return name


def name_now(name: str) -> str:
    """Today's name of a method or section that a run of an older version was written under."""
    for since in sorted(RENAMED):
        name = {before: now for now, before in RENAMED[since].items()}.get(name, name)
    return name


def check_roles(cls: type, prefix: str = "") -> None:
    """Every field of the config dataclass `cls` declares its role; a field without one would count in every key
    unseen, and orphan every completed run."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            check_roles(hints[f.name], f"{prefix}{f.name}.")
        elif not isinstance(f.metadata.get("role"), Role):
            raise TypeError(
                f"config key '{prefix}{f.name}' declares no role: give it IDENTITY, NEUTRAL, OUTSIDE or "
                "added(4) (rlhf/keys.py)"
            )


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _counts(f: dataclasses.Field, value: Any, form: Form) -> bool:
    role = f.metadata["role"]
    if role.kind == "outside" or (role.kind == "neutral" and not form.neutral):
        return False
    return role.version <= form.version or value != _default(f)


def _kept(section: Any, form: Form) -> dict[str, Any]:
    values = dataclasses.asdict(section)
    return {f.name: values[f.name] for f in dataclasses.fields(section) if _counts(f, values[f.name], form)}


def settings(cfg: Config, names: Iterable[str], form: Form) -> dict[str, Any]:
    """The named sections and top-level fields of `cfg` as a key of `form` reads them: each with the fields that
    count, and none left empty or switched off."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    out = {}
    for name in names:
        value = getattr(cfg, name)
        if not dataclasses.is_dataclass(value):
            if _counts(fields[name], value, form):
                out[name] = value
        elif (kept := _kept(value, form)) and ("enabled" in kept or not hasattr(value, "enabled")):
            out[name] = kept
    return out


def digest(payload: Any, sort_keys: bool = True) -> str:
    """sha256 of `payload` as JSON, its keys sorted: the one hash behind every key and cache name."""
    return hashlib.sha256(json.dumps(payload, sort_keys=sort_keys, default=str).encode()).hexdigest()


def run_key(
    cfg: Config,
    method: str,
    seed: int,
    data_sha256: str | None,
    extra: dict[str, Any] | None,
    version: int = RUN.version,
) -> str:
    """sha256 of what a run of `method` computes from: method, seed, data, extra inputs (the reward model's path)
    and the config's shared sections with the method's own (rlhf/methods.py: a method's own section keys its runs
    alone, so tuning DPO's learning rate leaves PPO's completed runs reusable). Only a run with the same key
    continues an interrupted one, or stands for it once completed. `version`: the key as that version gave it."""
    own = own_sections()
    names = [f.name for f in dataclasses.fields(cfg) if method in own.get(f.name, [method])]
    kept = settings(cfg, names, RUN._replace(version=version))
    return digest(
        {
            "method": name_at(method, version),
            "seed": seed,
            "data_sha256": data_sha256,
            "extra": extra or {},
            "config": {name_at(k, version): v for k, v in kept.items()},
        }
    )


def run_keys(
    cfg: Config, method: str, seed: int, data_sha256: str | None, extra: dict[str, Any] | None
) -> list[tuple[str, str]]:
    """(run directory's method, run key) of a run of `method` as today's version keys it, then as each version
    before a rename keyed it: where a run completed or interrupted then is found."""
    versions = [RUN.version, *(since - 1 for since in sorted(RENAMED, reverse=True) if since <= RUN.version)]
    return list(
        dict.fromkeys((name_at(method, v), run_key(cfg, method, seed, data_sha256, extra, v)) for v in versions)
    )


def reward_model_key(cfg: Config, data_sha256: str, seed: int) -> dict[str, Any]:
    """What a trained reward model depends on: an interrupted reward-model run with this key is resumed, a completed
    one reused by every later run. It holds the seed the model trains with (whichever `reward_model.per_seed`
    picks), the model section (the backbone, its precision and attention kernel) and the pairs by the budget's count
    and passes."""
    return {
        "data_sha256": data_sha256,
        "task": cfg.task.name,
        "reward_model": _kept(cfg.reward_model, REWARD_MODEL) | {"seed": seed},
        "budget": {"pairs": cfg.budget.pairs, "passes": cfg.budget.passes(cfg.reward_model.epochs)},
        **settings(cfg, ["model", "sft_stage", "lora", "weight_decay"], REWARD_MODEL),
    }


def sft_key(cfg: Config, rows: Dataset) -> dict[str, Any]:
    """What the SFT stage's model depends on: an interrupted SFT run with this key is resumed, a completed one's
    model is pi_ref. LoRA's settings where the stage trains adapters (`SFT_LORA`)."""
    return {
        **settings(cfg, ["model", "sft_stage", "weight_decay"], SFT_MODEL),
        **settings(cfg, ["lora"], SFT_LORA),
        "texts_sha256": digest(rows.to_dict()),
    }


# pi_ref (the base model, or the SFT stage's) samples the pairs, and is evaluated on the task's prompts
PREFERENCE_SET = ("model", "sft_stage", "task", "data")
REFERENCE_SAMPLES = ("model", "sft_stage", "task", "eval")


def shared(cfg: Config, names: Iterable[str]) -> dict[str, Any]:
    """`settings` of what every run shares (the preference set, pi_ref's caches), which pi_ref computes: where pi_ref
    is the SFT stage's model, LoRA's settings too where that stage trained adapters (switched off, they leave every
    key as it was)."""
    return settings(cfg, [*names, "lora"] if cfg.sft_stage.enabled else names, SHARED)


def preference_set_key(cfg: Config) -> str:
    return digest(shared(cfg, PREFERENCE_SET))


def eval_settings(cfg: Config) -> dict[str, Any]:
    """What makes two runs' eval points comparable, for their manifests: the same pi_ref, prompts, pairs and eval
    settings (`hash`), and the split and temperature in words. The report never pools two hashes."""
    return {
        "hash": digest(shared(cfg, (*PREFERENCE_SET, "eval")))[:16],
        "split": cfg.eval.split,
        "temperature": cfg.eval.temperature,
    }


def reference_cache_names(cfg: Config, arithmetic: str, data_sha256: str) -> tuple[str, str]:
    """The eval cache's files of pi_ref's own eval samples and of its log-probs of this preference set's held-out
    pairs. Besides the config they depend on the arithmetic: `precision: auto` is fp32 on one machine and bf16 on
    another sharing the runs directory."""
    samples = f"pi_ref-{digest(shared(cfg, REFERENCE_SAMPLES))[:12]}-{arithmetic}"
    return f"{samples}.pt", f"{samples}-pairs-{data_sha256[:12]}.pt"


def scored_pairs_name(arithmetic: str, batch_size: int, pairs: list[list[str]]) -> str:
    """The file in a reward model's folder that keeps its accuracy and margin on these held-out pairs: what a frozen
    model's scores of them depend on besides the model are the pairs, their batch (padding) and the arithmetic."""
    return f"heldout-pairs-{digest([arithmetic, batch_size, pairs])[:16]}.json"


def reference_logps_name(
    reference: str, cut: int | None, batch_size: int, torch_version: str, arithmetic: str, ids: list[list[list[int]]]
) -> str:
    """The eval cache's file of pi_ref's log-probs of DPO's training pairs, keyed by everything they are computed
    from: the model, the token ids, where they are cut, the batch, torch and the arithmetic."""
    payload = {
        "reference": reference,
        "cut": cut,
        "batch_size": batch_size,
        "torch": torch_version,
        "arithmetic": arithmetic,
        "ids": ids,
    }
    return f"dpo-ref-logps-{digest(payload, sort_keys=False)[:16]}.pt"  # in the order the kept files were named by
