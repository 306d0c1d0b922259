"""The one evaluator: every policy, every eval point, same prompts, same sampling seed.

Per eval point it samples one response per eval prompt (temperature from config, seeded identically each
time, without disturbing the training RNG) and reports:

* gold reward mean / std / standard error (tasks with a gold reward);
* proxy reward under a learned reward model, when one is given (the over-optimisation gap);
* KL(pi || pi_ref) per sequence: k1 = sum_t [log pi - log pi_ref] over the sampled response tokens, and
  k3 = sum_t [(r - 1) - log r] with r = pi_ref / pi (non-negative, lower variance);
* response length, distinct-2, EOS rate;
* on held-out pairs, accuracy and mean margin s(x, y_w) - s(x, y_l) of each scorer: gold (the label-noise
  ceiling), the explicit reward model r_phi, DPO's implicit reward beta * log pi / pi_ref;
* its own cost: seconds, tokens and FLOPs spent sampling and scoring (forward passes; rlhf/flops.py), counted
  apart from every method's training;
* per prompt (`per_prompt`): the response, its gold and proxy rewards, k1 and k3, length and EOS flag, which the run
  directory keeps for every eval prompt: the paired design (same prompts, same sampling seed for every policy)
  stays usable afterwards.

A policy with pi_ref's very weights (every run's step 0, and the reference run) is not sampled again: its
samples and log-probs are the same every time, so they are computed once per profile and eval config and kept
in `reference_cache`; its KL is 0 and its implicit margins are 0 without another forward pass. pi_ref's log-probs of
the held-out pairs, the same at every eval point of every DPO run, are likewise computed once per profile, by
pi_ref's own evaluation (`reference_pairs_cache`). Both are kept through `rlhf.atomic.cached` under names made from
their keys (rlhf/keys.py). A reward model's scores of the pairs are computed once, by its own stage, which keeps
their accuracy and margin in the model's folder (`store_rm_pair_metrics`): every run evaluated against it reads
them. The pairs are tokenised once, on the CPU; each pass moves them to its model's device.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.atomic import atomic_write_text, cached
from rlhf.config import PROJECT_ROOT, Config, EvalConfig
from rlhf.data import PreferenceSet
from rlhf.errors import UserError, check_finite
from rlhf.flops import forward_flops, pass_parameters
from rlhf.keys import reference_cache_names, scored_pairs_name
from rlhf.models import autocast, resolve_precision
from rlhf.sequences import SequenceBatch, chunks, encode_pairs, response_logprobs, reward_scores, sample, shortest_first
from rlhf.tasks import PAIR_FIELDS, GoldReward, load_task


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct n-grams / all n-grams over the whole sample set (whitespace tokens); 0 when there are none."""
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def mean_std_sem(values: list[float]) -> tuple[float, float, float]:
    """Mean, sample standard deviation and standard error of the mean."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std, std / math.sqrt(n)


def kl_estimates(
    policy_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence KL(pi || pi_ref) estimates from tokens sampled from pi: (k1, k3), each [B].

    k1 = sum_t log pi/pi_ref (unbiased, can be negative per sample); k3 = sum_t (r - 1 - log r),
    r = pi_ref/pi (unbiased and non-negative per token; Schulman's "Approximating KL divergence").
    """
    log_ratio = (policy_logprobs - ref_logprobs) * mask
    k3 = ((torch.exp(-log_ratio) - 1) + log_ratio) * mask
    return log_ratio.sum(dim=1), k3.sum(dim=1)


def pair_accuracy_margin(chosen: list[float], rejected: list[float]) -> tuple[float, float]:
    """Fraction of pairs where the scorer ranks chosen above rejected (ties count half), and the mean margin."""
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    acc = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / len(margins)
    return acc, sum(margins) / len(margins)


@dataclass
class EvalContext:
    """What stays fixed across eval points: prompts, held-out pairs, pi_ref, the gold reward, settings."""

    prompts: list[str]
    ref_model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    cfg: EvalConfig
    autocast: Callable[[], object]
    gold_reward: GoldReward | None = None
    heldout_pairs: list[dict] = field(default_factory=list)  # prompt / chosen / rejected (/ gold_chosen ...)
    arithmetic: str = ""  # device type and precision (`arithmetic`): a frozen model's scores depend on them too
    reference_cache: Path | None = None  # where pi_ref's own eval samples are kept (see the module docstring)
    reference_pairs_cache: Path | None = None  # where pi_ref's log-probs of the held-out pairs are kept
    _ref_pair_logps: tuple[torch.Tensor, torch.Tensor] | None = None  # pi_ref on held-out pairs, computed once
    _pair_batches: list | None = None
    _rm_pair_metrics: dict[int, dict[str, float]] = field(default_factory=dict)

    def pair_batches(self) -> list[tuple[SequenceBatch, SequenceBatch]]:
        """Held-out pairs as (chosen batch, rejected batch), tokenised once. Pairs are batched in order of length,
        so a batch is padded to about its own length (every pair metric is a mean: the order is free)."""
        if self._pair_batches is None:
            pairs = self.heldout_pairs
            pairs = [pairs[i] for i in shortest_first(self.tokenizer, *([p[k] for p in pairs] for k in PAIR_FIELDS))]
            self._pair_batches = [
                encode_pairs(self.tokenizer, *([p[k] for p in pairs[s]] for k in PAIR_FIELDS))
                for s in chunks(len(pairs), self.cfg.batch_size)
            ]
        return self._pair_batches


def arithmetic(cfg: Config, device: torch.device) -> str:
    """`cpu-bf16`, `cuda-fp32`, ...: what numbers a pass computes depends on besides its inputs (`precision: auto` is
    bf16 on one machine and fp32 on another sharing the runs directory)."""
    return f"{device.type}-{resolve_precision(cfg.model.precision, device)}"


def _rm_pair_metrics_file(folder: Path, ctx: EvalContext) -> Path:
    pairs = [[p[k] for k in PAIR_FIELDS] for p in ctx.heldout_pairs]
    return Path(folder) / scored_pairs_name(ctx.arithmetic, ctx.cfg.batch_size, pairs)


def store_rm_pair_metrics(folder: Path, ctx: EvalContext, metrics: dict[str, float]) -> None:
    """Keep a reward model's held-out accuracy and margin in its saved folder, for every run evaluated against it
    (`heldout_pair_metrics` reads them back where the pairs and arithmetic are the same)."""
    kept = {k: metrics[k] for k in ("heldout/rm_accuracy", "heldout/rm_margin")}
    atomic_write_text(_rm_pair_metrics_file(folder, ctx), json.dumps(kept) + "\n")


def has_reference_weights(policy: PreTrainedModel, ctx: EvalContext) -> bool:
    """Is `policy` pi_ref itself (every parameter equal)? Cheap next to one forward pass; stops at the first change."""
    ref = ctx.ref_model
    return ref is not None and all(
        torch.equal(p, q) for p, q in zip(policy.parameters(), ref.parameters(), strict=True)
    )


@torch.inference_mode()
def _sequence_logps(model: PreTrainedModel, batch: SequenceBatch, ctx: EvalContext) -> torch.Tensor:
    """log pi(y | x) of each sequence of a held-out batch (kept on the CPU, `pair_batches`), as float32 on the CPU:
    where the cache of pi_ref's keeps them."""
    with ctx.autocast():
        logps = response_logprobs(model, batch.to(model.device), temperature=1.0)[0]
    return logps.sum(dim=1).float().cpu()


def eval_batches(policy: PreTrainedModel, ctx: EvalContext, seed: int, desc: str) -> Iterator[SequenceBatch]:
    """One response per eval prompt sampled from `policy`, in batches of `eval.batch_size`, seeded with `seed`;
    fork_rng leaves the caller's (training) RNG exactly where it was."""
    cfg = ctx.cfg
    device = next(policy.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for s in tqdm(list(chunks(len(ctx.prompts), cfg.batch_size)), desc=desc, leave=False):
            yield sample(policy, ctx.tokenizer, ctx.prompts[s], cfg.max_new_tokens, cfg.temperature, ctx.autocast())


def response_stats(batch: SequenceBatch, tokenizer: PreTrainedTokenizerBase) -> tuple[list[str], list[int], list[bool]]:
    """Per response: decoded text, length in tokens (EOS included) and whether it ended with EOS."""
    return (
        tokenizer.batch_decode(batch.response_ids, skip_special_tokens=True),
        batch.response_lengths.tolist(),
        (batch.response_ids == tokenizer.eos_token_id).any(dim=1).tolist(),
    )


def response_metrics(
    texts: list[str], lengths: list[int], ended: list[bool], golds: list[float] | None, proxies: list[float] | None
) -> dict[str, float]:
    """The metrics of a set of responses, one per eval prompt: length, distinct-2, EOS rate, and the mean, std and
    standard error of the gold and proxy rewards where given."""
    metrics = {
        "eval/length": sum(lengths) / len(lengths),
        "eval/distinct2": distinct_n(texts, 2),
        "eval/eos_rate": sum(ended) / len(ended),
        "eval/n": float(len(texts)),
    }
    for name, values in (("gold", golds), ("proxy", proxies)):
        if values:
            metrics[f"eval/{name}"], metrics[f"eval/{name}_std"], metrics[f"eval/{name}_sem"] = mean_std_sem(values)
    return metrics


@torch.inference_mode()
def _samples_with_logprobs(
    policy: PreTrainedModel, ctx: EvalContext, is_reference: bool, cost: dict[str, float], desc: str
) -> list[dict[str, torch.Tensor]]:
    """One response per eval prompt from `policy` (the eval seed), with log pi and log pi_ref of each token at the
    sampling temperature: one dict of tensors per batch. pi_ref's own are read from (or written to) the cache."""
    device = next(policy.parameters()).device
    cache = ctx.reference_cache if is_reference else None
    return cached(cache, lambda: _sample_and_score(policy, ctx, is_reference, cost, desc), device)[0]


def _sample_and_score(
    policy: PreTrainedModel, ctx: EvalContext, is_reference: bool, cost: dict[str, float], desc: str
) -> list[dict[str, torch.Tensor]]:
    """`_samples_with_logprobs` computed now, its cost added to `cost`."""
    cfg = ctx.cfg
    out = []
    n_policy = pass_parameters(policy)
    n_scoring = n_policy + (0 if is_reference else pass_parameters(ctx.ref_model))
    start = time.perf_counter()
    for batch in eval_batches(policy, ctx, cfg.seed, desc):  # the same sampling seed at every eval point
        scoring = time.perf_counter()
        with ctx.autocast():
            logp = response_logprobs(policy, batch, cfg.temperature)[0]
            ref_logp = logp if is_reference else response_logprobs(ctx.ref_model, batch, cfg.temperature)[0]
        real_tokens = int(batch.attention_mask.sum())
        cost["sampling_seconds"] += scoring - start
        cost["sampled_tokens"] += int(batch.response_mask.sum())
        cost["scoring_seconds"] += time.perf_counter() - scoring
        cost["scored_tokens"] += real_tokens * (1 if is_reference else 2)
        # sampling (the KV cache makes each prompt and response token one forward token), then the log-prob passes
        cost["flops"] += forward_flops(n_policy + n_scoring, real_tokens)
        out.append({**vars(batch), "logp": logp, "ref_logp": ref_logp})
        start = time.perf_counter()
    return out


@torch.inference_mode()
def evaluate(
    policy: PreTrainedModel,
    ctx: EvalContext,
    reward_model: PreTrainedModel | None = None,
    implicit_beta: float | None = None,
    desc: str = "eval",
) -> tuple[dict[str, float], list[dict]]:
    """Evaluate `policy`; returns (metrics, samples). Pass `reward_model` for proxy reward and RM pair
    metrics, `implicit_beta` for DPO's implicit-reward pair metrics."""
    start = time.perf_counter()
    was_training = policy.training
    policy.eval()
    tok = ctx.tokenizer
    cost = dict.fromkeys(("sampling_seconds", "sampled_tokens", "scoring_seconds", "scored_tokens", "flops"), 0)
    is_reference = has_reference_weights(policy, ctx)
    texts, k1s, k3s, lengths, ended, proxies = [], [], [], [], [], []
    for b in _samples_with_logprobs(policy, ctx, is_reference, cost, desc):
        batch = SequenceBatch(b["prompt_ids"], b["prompt_mask"], b["response_ids"], b["response_mask"])
        if reward_model is not None:
            scoring = time.perf_counter()
            with ctx.autocast():
                proxies += reward_scores(reward_model, batch, tok).tolist()
            cost["scoring_seconds"] += time.perf_counter() - scoring
            cost["scored_tokens"] += int(batch.attention_mask.sum())
            cost["flops"] += forward_flops(pass_parameters(reward_model, "scalar"), int(batch.attention_mask.sum()))
        k1, k3 = kl_estimates(b["logp"], b["ref_logp"], batch.response_mask)
        k1s += k1.tolist()
        k3s += k3.tolist()
        for values, new in zip((texts, lengths, ended), response_stats(batch, tok)):
            values += new

    k1_mean, _, k1_sem = mean_std_sem(k1s)
    golds = ctx.gold_reward(texts) if ctx.gold_reward is not None else None
    metrics = {
        "eval/kl": k1_mean,
        "eval/kl_sem": k1_sem,
        "eval/kl_k3": mean_std_sem(k3s)[0],
        **response_metrics(texts, lengths, ended, golds, proxies),
    }
    metrics.update(heldout_pair_metrics(policy, ctx, reward_model, implicit_beta, cost, is_reference))
    check_finite(desc, **{k: metrics[k] for k in ("eval/kl", "eval/gold", "eval/proxy") if k in metrics})
    if was_training:
        policy.train()
    metrics["eval/seconds"] = time.perf_counter() - start
    metrics.update({f"eval/{k}": v for k, v in cost.items()})

    return metrics, per_prompt(ctx.prompts, texts, k1s, k3s, lengths, ended, golds, proxies)


# An eval point in one short line: the numbers the comparison turns on (the run directory has the rest)
_BRIEF = (
    ("gold", "eval/gold"),
    ("±", "eval/gold_sem"),
    ("proxy", "eval/proxy"),
    ("KL", "eval/kl"),
    ("implicit acc", "heldout/implicit_accuracy"),
    ("margin", "heldout/implicit_margin"),
)


def brief(metrics: dict[str, float]) -> str:
    """`gold 0.052, ± 0.107, proxy 0.011, KL 0.285, ...`: the evaluator's key metrics that `metrics` has, for the
    console."""
    return ", ".join(f"{name} {metrics[key]:.3f}" for name, key in _BRIEF if key in metrics)


def per_prompt(
    prompts: list[str],
    texts: list[str],
    k1s: list[float] | None,
    k3s: list[float] | None,
    lengths: list[int],
    ended: list[bool],
    golds: list[float] | None,
    proxies: list[float] | None,
) -> list[dict]:
    """One record per eval prompt, in prompt order: the sample and every number the evaluator measured on it. The
    run directory keeps them all (RunDir.write_samples), so the report can pair policies by prompt and bootstrap
    over prompts (docs/analysis.md)."""
    columns = {"kl": k1s, "kl_k3": k3s, "gold": golds, "proxy": proxies}
    return [
        {
            "prompt_index": i,
            "prompt": p,
            "response": t,
            "length": n,
            "eos": bool(e),
            **{k: v[i] for k, v in columns.items() if v},
        }
        for i, (p, t, n, e) in enumerate(zip(prompts, texts, lengths, ended, strict=True))
    ]


def heldout_pair_metrics(
    policy: PreTrainedModel | None,
    ctx: EvalContext,
    reward_model: PreTrainedModel | None,
    implicit_beta: float | None,
    cost: dict[str, float] | None = None,
    is_reference: bool = False,
) -> dict[str, float]:
    """Accuracy and margin on held-out pairs for gold, the explicit RM and DPO's implicit reward. Each frozen
    model's scores of the fixed pairs are computed once per context; `cost` (if given) counts the passes run, their
    tokens and FLOPs."""
    pairs = ctx.heldout_pairs
    if not pairs:
        return {}
    metrics: dict[str, float] = {}
    if "gold_chosen" in pairs[0]:
        acc, margin = pair_accuracy_margin([p["gold_chosen"] for p in pairs], [p["gold_rejected"] for p in pairs])
        metrics.update({"heldout/gold_accuracy": acc, "heldout/gold_margin": margin})
    if reward_model is None and implicit_beta is None:
        return metrics
    start, passes = time.perf_counter(), []  # N of each pass over the pairs run here
    batches, tok = ctx.pair_batches(), ctx.tokenizer
    if reward_model is not None:
        known = ctx._rm_pair_metrics
        if id(reward_model) not in known:
            stored = _rm_pair_metrics_file(reward_model.name_or_path, ctx)  # the folder it was loaded from
            if stored.is_file():  # its own stage scored these very pairs alike
                known[id(reward_model)] = json.loads(stored.read_text())
            else:
                on = reward_model.device
                with ctx.autocast():
                    chosen = torch.cat([reward_scores(reward_model, c.to(on), tok) for c, _ in batches]).tolist()
                    rejected = torch.cat([reward_scores(reward_model, r.to(on), tok) for _, r in batches]).tolist()
                passes.append(pass_parameters(reward_model, "scalar"))
                acc, margin = pair_accuracy_margin(chosen, rejected)
                known[id(reward_model)] = {"heldout/rm_accuracy": acc, "heldout/rm_margin": margin}
        metrics.update(known[id(reward_model)])
    if implicit_beta is not None and policy is not None:

        def reference_pair_logps() -> list[torch.Tensor]:  # once per profile: every run's pi_ref scores them alike
            passes.append(pass_parameters(ctx.ref_model))
            return [
                torch.cat([_sequence_logps(ctx.ref_model, c, ctx) for c, _ in batches]),
                torch.cat([_sequence_logps(ctx.ref_model, r, ctx) for _, r in batches]),
            ]

        if ctx._ref_pair_logps is None:
            ctx._ref_pair_logps = tuple(cached(ctx.reference_pairs_cache, reference_pair_logps)[0])
        ref_c, ref_r = ctx._ref_pair_logps
        if is_reference:  # pi / pi_ref = 1 on every pair: the margins are 0 without another pass
            pol_c, pol_r = ref_c, ref_r
        else:
            pol_c = torch.cat([_sequence_logps(policy, c, ctx) for c, _ in batches])
            pol_r = torch.cat([_sequence_logps(policy, r, ctx) for _, r in batches])
            passes.append(pass_parameters(policy))
        acc, margin = pair_accuracy_margin(
            (implicit_beta * (pol_c - ref_c)).tolist(), (implicit_beta * (pol_r - ref_r)).tolist()
        )
        metrics.update({"heldout/implicit_accuracy": acc, "heldout/implicit_margin": margin})
    if cost is not None:
        pair_tokens = sum(int(c.attention_mask.sum() + r.attention_mask.sum()) for c, r in batches)
        cost["scoring_seconds"] += time.perf_counter() - start
        cost["scored_tokens"] += len(passes) * pair_tokens
        cost["flops"] += forward_flops(sum(passes), pair_tokens)
    return metrics


def make_eval_context(cfg: Config, prefs: PreferenceSet, ref_model, tokenizer, device: torch.device) -> EvalContext:
    """The fixed evaluation setting of a profile: eval prompts, held-out pairs, pi_ref, gold reward."""
    task = load_task(cfg.task, tokenizer, cfg.hub_access)
    prompts = task.validation_prompts if cfg.eval.split == "validation" else task.eval_prompts
    if not prompts:
        raise UserError(
            "config key 'eval.split': 'validation' needs validation prompts; set "
            "task.n_validation_prompts (the eval prompts set aside for tuning)"
        )
    n = cfg.eval.n_prompts or len(prompts)
    heldout = prefs.scored_pairs(cfg.eval.split).to_list()[: cfg.eval.n_heldout_pairs or None]
    folder = PROJECT_ROOT / cfg.runs_dir / cfg.profile / "eval-cache"
    samples, pairs = reference_cache_names(cfg, arithmetic(cfg, device), prefs.sha256)
    return EvalContext(
        prompts=prompts[:n],
        ref_model=ref_model,
        tokenizer=tokenizer,
        cfg=cfg.eval,
        autocast=lambda: autocast(cfg.model.precision, device),
        gold_reward=task.gold_reward,
        heldout_pairs=heldout,
        arithmetic=arithmetic(cfg, device),
        reference_cache=folder / samples,
        reference_pairs_cache=folder / pairs,
    )
