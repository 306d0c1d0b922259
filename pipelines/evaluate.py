"""The one evaluator (SPEC §5): every policy, every eval point, same prompts, same sampling seed.

Per eval point it samples one response per eval prompt (temperature from config, seeded identically each
time, without disturbing the training RNG) and reports:

* gold reward mean / std / standard error (tasks with a gold reward);
* proxy reward under a learned reward model, when one is given (the over-optimisation gap);
* KL(pi || pi_ref) per sequence: k1 = sum_t [log pi - log pi_ref] over the sampled response tokens, and
  k3 = sum_t [(r - 1) - log r] with r = pi_ref / pi (non-negative, lower variance);
* response length, distinct-2, EOS rate;
* on held-out pairs, accuracy and mean margin s(x, y_w) - s(x, y_l) of each scorer: gold (the label-noise
  ceiling), the explicit reward model r_phi, DPO's implicit reward beta * log pi / pi_ref.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipelines.config import EvalConfig
from pipelines.errors import check_finite
from pipelines.sequences import SequenceBatch, chunks, encode_completions, response_logprobs, reward_scores, sample
from pipelines.tasks import GoldReward


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct n-grams / all n-grams over the whole sample set (whitespace tokens); 0 when there are none."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def mean_std_sem(values: list[float]) -> tuple[float, float, float]:
    """Mean, sample standard deviation and standard error of the mean."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std, std / math.sqrt(n)


def kl_estimates(policy_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor
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
    _ref_pair_logps: tuple[torch.Tensor, torch.Tensor] | None = None  # pi_ref on held-out pairs, computed once
    _pair_batches: list | None = None
    _rm_pair_metrics: dict[int, dict[str, float]] = field(default_factory=dict)

    def pair_batches(self) -> list[tuple[slice, SequenceBatch, SequenceBatch]]:
        """Held-out pairs as (slice, chosen batch, rejected batch), tokenised once."""
        if self._pair_batches is None:
            pairs = self.heldout_pairs
            self._pair_batches = []
            for s in chunks(len(pairs), self.cfg.batch_size):
                prompts = [p["prompt"] for p in pairs[s]]
                chosen = encode_completions(self.tokenizer, prompts, [p["chosen"] for p in pairs[s]])
                rejected = encode_completions(self.tokenizer, prompts, [p["rejected"] for p in pairs[s]])
                self._pair_batches.append((s, chosen, rejected))
        return self._pair_batches


@torch.inference_mode()
def _sequence_logps(model: PreTrainedModel, batch: SequenceBatch, ctx: EvalContext) -> torch.Tensor:
    with ctx.autocast():
        return response_logprobs(model, batch, temperature=1.0)[0].sum(dim=1)


def eval_batches(policy: PreTrainedModel, ctx: EvalContext, seed: int, desc: str) -> Iterator[SequenceBatch]:
    """One response per eval prompt sampled from `policy`, in batches of `eval.batch_size`, seeded with `seed`;
    fork_rng leaves the caller's (training) RNG exactly where it was."""
    cfg = ctx.cfg
    device = next(policy.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for s in tqdm(list(chunks(len(ctx.prompts), cfg.batch_size)), desc=desc, leave=False):
            yield sample(policy, ctx.tokenizer, ctx.prompts[s], cfg.max_new_tokens, cfg.temperature, ctx.autocast())


def response_stats(batch: SequenceBatch, tokenizer: PreTrainedTokenizerBase
                   ) -> tuple[list[str], list[int], list[bool]]:
    """Per response: decoded text, length in tokens (EOS included) and whether it ended with EOS."""
    return (tokenizer.batch_decode(batch.response_ids, skip_special_tokens=True), batch.response_lengths.tolist(),
            (batch.response_ids == tokenizer.eos_token_id).any(dim=1).tolist())


def response_metrics(texts: list[str], lengths: list[int], ended: list[bool], golds: list[float] | None,
                     proxies: list[float] | None) -> dict[str, float]:
    """The metrics of a set of responses, one per eval prompt: length, distinct-2, EOS rate, and the mean, std and
    standard error of the gold and proxy rewards where given."""
    metrics = {"eval/length": sum(lengths) / len(lengths), "eval/distinct2": distinct_n(texts, 2),
               "eval/eos_rate": sum(ended) / len(ended), "eval/n": float(len(texts))}
    for name, values in (("gold", golds), ("proxy", proxies)):
        if values:
            metrics[f"eval/{name}"], metrics[f"eval/{name}_std"], metrics[f"eval/{name}_sem"] = mean_std_sem(values)
    return metrics


@torch.inference_mode()
def evaluate(policy: PreTrainedModel, ctx: EvalContext, reward_model: PreTrainedModel | None = None,
             implicit_beta: float | None = None, desc: str = "eval") -> tuple[dict[str, float], list[dict]]:
    """Evaluate `policy`; returns (metrics, samples). Pass `reward_model` for proxy reward and RM pair
    metrics, `implicit_beta` for DPO's implicit-reward pair metrics."""
    start = time.perf_counter()
    was_training = policy.training
    policy.eval()
    cfg, tok = ctx.cfg, ctx.tokenizer
    texts, k1s, k3s, lengths, ended, proxies = [], [], [], [], [], []
    # The same sampling seed at every eval point.
    for batch in eval_batches(policy, ctx, cfg.seed, desc):
        with ctx.autocast():
            # KL is measured between the distributions actually sampled from (temperature applied).
            logp = response_logprobs(policy, batch, cfg.temperature)[0]
            ref_logp = response_logprobs(ctx.ref_model, batch, cfg.temperature)[0]
            if reward_model is not None:
                proxies += reward_scores(reward_model, batch, tok).tolist()
        k1, k3 = kl_estimates(logp, ref_logp, batch.response_mask)
        k1s += k1.tolist()
        k3s += k3.tolist()
        for values, new in zip((texts, lengths, ended), response_stats(batch, tok)):
            values += new

    k1_mean, _, k1_sem = mean_std_sem(k1s)
    golds = ctx.gold_reward(texts) if ctx.gold_reward is not None else None
    metrics = {"eval/kl": k1_mean, "eval/kl_sem": k1_sem, "eval/kl_k3": mean_std_sem(k3s)[0],
               **response_metrics(texts, lengths, ended, golds, proxies)}
    metrics.update(heldout_pair_metrics(policy, ctx, reward_model, implicit_beta))
    check_finite(desc, **{k: metrics[k] for k in ("eval/kl", "eval/gold", "eval/proxy") if k in metrics})
    if was_training:
        policy.train()
    metrics["eval/seconds"] = time.perf_counter() - start

    samples = [{"prompt": p, "response": t, "kl": k, **({"gold": g} if golds else {}),
                **({"proxy": r} if proxies else {})}
               for p, t, k, g, r in zip(ctx.prompts, texts, k1s, golds or [None] * len(texts),
                                        proxies or [None] * len(texts))][:cfg.n_samples_saved]
    return metrics, samples


def heldout_pair_metrics(policy: PreTrainedModel | None, ctx: EvalContext, reward_model: PreTrainedModel | None,
                         implicit_beta: float | None) -> dict[str, float]:
    """Accuracy and margin on held-out pairs for gold, the explicit RM and DPO's implicit reward."""
    pairs = ctx.heldout_pairs
    if not pairs:
        return {}
    metrics: dict[str, float] = {}
    if "gold_chosen" in pairs[0]:
        acc, margin = pair_accuracy_margin([p["gold_chosen"] for p in pairs], [p["gold_rejected"] for p in pairs])
        metrics.update({"heldout/gold_accuracy": acc, "heldout/gold_margin": margin})
    if reward_model is None and implicit_beta is None:
        return metrics
    batches, tok = ctx.pair_batches(), ctx.tokenizer
    if reward_model is not None:
        if id(reward_model) not in ctx._rm_pair_metrics:  # a frozen RM scores the fixed pairs the same every time
            with ctx.autocast():
                chosen = torch.cat([reward_scores(reward_model, c, tok) for _, c, _ in batches]).tolist()
                rejected = torch.cat([reward_scores(reward_model, r, tok) for _, _, r in batches]).tolist()
            acc, margin = pair_accuracy_margin(chosen, rejected)
            ctx._rm_pair_metrics[id(reward_model)] = {"heldout/rm_accuracy": acc, "heldout/rm_margin": margin}
        metrics.update(ctx._rm_pair_metrics[id(reward_model)])
    if implicit_beta is not None and policy is not None:
        if ctx._ref_pair_logps is None:  # pi_ref never changes: its pair log-probs are computed once
            ctx._ref_pair_logps = (torch.cat([_sequence_logps(ctx.ref_model, c, ctx) for _, c, _ in batches]),
                                   torch.cat([_sequence_logps(ctx.ref_model, r, ctx) for _, _, r in batches]))
        ref_c, ref_r = ctx._ref_pair_logps
        pol_c = torch.cat([_sequence_logps(policy, c, ctx) for _, c, _ in batches])
        pol_r = torch.cat([_sequence_logps(policy, r, ctx) for _, _, r in batches])
        acc, margin = pair_accuracy_margin((implicit_beta * (pol_c - ref_c)).tolist(),
                                           (implicit_beta * (pol_r - ref_r)).tolist())
        metrics.update({"heldout/implicit_accuracy": acc, "heldout/implicit_margin": margin})
    return metrics
