"""One preference set for both pipelines (manifest schema in docs/data.md).

For a gold-reward task: for each training prompt sample K responses from pi_ref, score them with the gold
reward, pair them (0,1), (2,3), ..., and label each pair by Bradley-Terry sampling,
P(y1 > y2) = sigmoid((r1 - r2) / tau), or by argmax. Held-out pairs come from the eval prompts the same
way. Tasks with real preferences (hh) bring their pairs. The set is saved as a `datasets` folder in TRL's
preference format (prompt / chosen / rejected, plus gold scores) with a manifest, under a directory named
by its key (rlhf/keys.py): it is built once and reused while the manifest matches, and a new config builds a
new folder instead of overwriting the old one.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict, load_from_disk
from tqdm.auto import tqdm

from rlhf.atomic import atomic_write_json, temporary_name
from rlhf.config import PROJECT_ROOT, Config
from rlhf.errors import UserError, read_json
from rlhf.flops import forward_flops, pass_parameters
from rlhf.keys import PREFERENCE_SET, preference_set_key, shared
from rlhf.models import autocast, load_causal_lm, load_tokenizer, resolve_model_path
from rlhf.reference import reference_model
from rlhf.sequences import chunks, sample
from rlhf.tasks import Task, check_pair, load_task


@dataclass
class PreferenceSet:
    path: Path
    manifest: dict
    train: Dataset
    heldout: Dataset  # from the test prompts: the pairs every report scores
    validation: Dataset  # from the validation prompts (`task.n_validation_prompts`): what sweeps score

    @property
    def sha256(self) -> str:
        return self.manifest["sha256"]

    def scored_pairs(self, split: str) -> Dataset:
        """The pairs an evaluation on `split` (`eval.split`) scores: held-out (test) or validation pairs."""
        return self.validation if split == "validation" else self.heldout


def budget_pairs(cfg: Config, prefs: PreferenceSet) -> Dataset:
    """The pairs every stage trained on the preference set trains on (`budget.pairs`): the first that many of its
    train split, the same for the reward model, DPO and Preferred-FT and for every seed (a seed draws their order,
    not a different subset of them)."""
    n = cfg.budget.pairs
    if n is not None and n > len(prefs.train):
        raise UserError(
            f"config key 'budget.pairs': {n}, but the preference set {prefs.path} has only "
            f"{len(prefs.train)} training pairs (raise data.n_prompts, or lower budget.pairs)"
        )
    return prefs.train if n is None else prefs.train.select(range(n))


def budget_record(pairs: int, passes: int) -> dict[str, int]:
    """What a run's manifest records of the data it trained on: pairs, passes, and pair presentations."""
    return {"pairs": pairs, "passes": passes, "pair_presentations": pairs * passes}


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def label_pair(r1: float, r2: float, labeling: str, tau: float, rng: random.Random) -> tuple[bool | None, float]:
    """Which of two responses is preferred: (first_wins, P(first wins)); first_wins is None for a dropped tie.

    Bradley-Terry: first wins with probability sigmoid((r1 - r2) / tau), the preference model behind eq. (1).
    Argmax: the higher gold reward wins; exact ties carry no preference and are dropped.
    """
    if labeling == "argmax":
        p = 1.0 if r1 > r2 else 0.0 if r1 < r2 else 0.5
        return (None if r1 == r2 else r1 > r2), p
    p = sigmoid((r1 - r2) / tau)
    return rng.random() < p, p


def _pairs_from_samples(
    prompts: list[str], policy, tokenizer, task: Task, cfg: Config, rng: random.Random, desc: str
) -> tuple[list[dict], dict]:
    """Sample K responses a prompt from pi_ref, score with gold, pair and label. Returns (pairs, stats)."""
    d = cfg.data
    k = d.responses_per_prompt
    device = next(policy.parameters()).device
    pairs, golds, stats = (
        [],
        [],
        {
            "empty": 0,
            "identical": 0,
            "tie_dropped": 0,
            "agree": 0,
            "decisive": 0,
            "sampling_seconds": 0.0,
            "sampled_tokens": 0,
            "sampling_flops": 0,
        },
    )
    for s in tqdm(list(chunks(len(prompts), d.batch_size)), desc=desc, unit="batch"):
        batch_prompts = [p for p in prompts[s] for _ in range(k)]  # prompt i's K samples are rows iK..iK+K-1
        start = time.perf_counter()
        batch = sample(
            policy, tokenizer, batch_prompts, d.max_new_tokens, d.temperature, autocast(cfg.model.precision, device)
        )
        stats["sampling_seconds"] += time.perf_counter() - start
        stats["sampled_tokens"] += int(batch.response_mask.sum())
        stats["sampling_flops"] += forward_flops(pass_parameters(policy), int(batch.attention_mask.sum()))
        texts = tokenizer.batch_decode(batch.response_ids, skip_special_tokens=True)
        scores = task.gold_reward(texts)
        golds += scores
        for i in range(0, len(texts), 2):
            (t1, r1), (t2, r2) = (texts[i], scores[i]), (texts[i + 1], scores[i + 1])
            if not t1.strip() or not t2.strip():
                stats["empty"] += 1
                continue
            if t1 == t2:
                stats["identical"] += 1
                continue
            first_wins, p = label_pair(r1, r2, d.labeling, d.bt_temperature, rng)
            if first_wins is None:
                stats["tie_dropped"] += 1
                continue
            if r1 != r2:
                stats["decisive"] += 1
                stats["agree"] += int(first_wins == (r1 > r2))
            (c, rc), (rj, rr) = ((t1, r1), (t2, r2)) if first_wins else ((t2, r2), (t1, r1))
            pairs.append(
                {
                    "prompt": batch_prompts[i],
                    "chosen": c,
                    "rejected": rj,
                    "gold_chosen": rc,
                    "gold_rejected": rr,
                    "p_chosen": p if first_wins else 1 - p,
                }
            )
    n = len(golds)
    mean = sum(golds) / n
    std = math.sqrt(sum((g - mean) ** 2 for g in golds) / max(1, n - 1))
    stats.update(
        {
            "samples": n,
            "gold_mean": mean,
            "gold_std": std,
            "label_agrees_with_gold_argmax": stats["agree"] / stats["decisive"] if stats["decisive"] else None,
        }
    )
    return pairs, stats


def preference_dir(cfg: Config) -> Path:
    name = f"preferences-{preference_set_key(cfg)[:12]}"
    return PROJECT_ROOT / cfg.runs_dir / cfg.profile / "data" / name


def _dataset_sha256(folder: Path) -> str:
    """sha256 over the arrow data shards (state.json holds fingerprints that are not content; cache-*.arrow
    files that `datasets` may add beside the shards are not content either)."""
    h = hashlib.sha256()
    for f in sorted(folder.rglob("data-*.arrow")):
        h.update(f.relative_to(folder).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def load_preferences(cfg: Config) -> PreferenceSet | None:
    """The stored set for this config, or None when there is none (or it no longer matches)."""
    path = preference_dir(cfg)
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        return None
    try:
        manifest = read_json(manifest_path)
    except UserError as e:
        raise UserError(f"{e}; delete {path} to rebuild the preference set") from None
    if manifest.get("config_hash") != preference_set_key(cfg):
        return None
    if _dataset_sha256(path / "dataset") != manifest.get("sha256"):
        raise UserError(
            f"{path}: the stored preference set does not match its manifest's sha256 (edited or "
            "half-written?); delete the folder to rebuild it"
        )
    # In memory: later .map() calls by the trainers must not write cache files into the shared folder.
    ds = load_from_disk(str(path / "dataset"), keep_in_memory=True)
    validation = ds["validation"] if "validation" in ds else ds["heldout"].select([])  # none set aside
    return PreferenceSet(path, manifest, ds["train"], ds["heldout"], validation)


def build_preferences(cfg: Config) -> PreferenceSet:
    """Build (or reuse) the shared preference set for `cfg`."""
    existing = load_preferences(cfg)
    if existing is not None:
        return existing
    start = time.perf_counter()
    model_path = resolve_model_path(reference_model(cfg), cfg.hub_access)  # pi_ref samples the pairs
    tokenizer = load_tokenizer(model_path)
    task = load_task(cfg.task, tokenizer, cfg.hub_access)
    stats: dict = {"dropped_while_parsing": task.dropped}
    if task.gold_reward is None:
        train = [check_pair(p, f"train pair {i}") for i, p in enumerate(task.train_pairs or [])]
        heldout = [check_pair(p, f"held-out pair {i}") for i, p in enumerate(task.heldout_pairs or [])]
        validation = [check_pair(p, f"validation pair {i}") for i, p in enumerate(task.validation_pairs or [])]
    else:
        policy = load_causal_lm(model_path, cfg.model.attention).to(
            torch.device("cpu") if not torch.cuda.is_available() else "cuda"
        )
        policy.eval()
        n_train = cfg.data.n_prompts or len(task.train_prompts)
        n_held = cfg.data.n_heldout_prompts or len(task.eval_prompts)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.data.seed)
            rng = random.Random(cfg.data.seed)
            train, stats["train"] = _pairs_from_samples(
                task.train_prompts[:n_train], policy, tokenizer, task, cfg, rng, "preference pairs (train)"
            )
            heldout, stats["heldout"] = _pairs_from_samples(
                task.eval_prompts[:n_held], policy, tokenizer, task, cfg, rng, "preference pairs (held-out)"
            )
            validation = []
            if task.validation_prompts:
                validation, stats["validation"] = _pairs_from_samples(
                    task.validation_prompts, policy, tokenizer, task, cfg, rng, "preference pairs (validation)"
                )
    if not train or not heldout:
        raise UserError(
            f"the preference set has no usable pairs (train {len(train)}, held-out {len(heldout)}): {stats}"
        )
    path = preference_dir(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    tmp.mkdir()
    try:
        splits = {"train": train, "heldout": heldout, **({"validation": validation} if validation else {})}
        DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(str(tmp / "dataset"))
        manifest = {
            "config_hash": preference_set_key(cfg),
            "config": shared(cfg, PREFERENCE_SET),  # what config_hash is the sha256 of
            "model": cfg.model.name_or_path,
            "model_path": model_path,
            "task": cfg.task.name,
            "seed": cfg.data.seed,
            "counts": {"train": len(train), "heldout": len(heldout), "validation": len(validation)},
            "sha256": _dataset_sha256(tmp / "dataset"),
            "stats": stats,
            "build_seconds": time.perf_counter() - start,
        }
        atomic_write_json(tmp / "manifest.json", manifest)
        # A stale folder for this hash (manifest missing or mismatched) is moved aside whole before it is deleted:
        # deleted in place, a kill could leave its manifest beside half its data, a set that looks tampered with.
        stale = temporary_name(path)
        if path.exists():
            os.replace(path, stale)
        os.replace(tmp, path)
        shutil.rmtree(stale, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_preferences(cfg)
