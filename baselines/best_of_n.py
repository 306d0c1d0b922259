"""Best-of-N (the DPO paper's Fig. 2): draw N responses from pi_ref, keep the one the learned reward model r_phi
scores highest. Nothing is trained; the compute goes into sampling, N responses for every prompt.

    best_of_n(cfg, prefs, reward_model_path) -> BestOfNResult

On the shared evaluator's eval prompts and sampling settings, max(bon.n) candidates per prompt are drawn once, in
rounds: round j samples every eval prompt in the evaluator's batches with seed eval.seed + j, so round 0 is the very
sample the evaluator draws from pi_ref (N = 1 is the reference's own eval point). Every candidate is scored by r_phi
and by the gold reward; for each N the first N candidates of a prompt compete, so all Ns share one set of samples.
The KL of the Best-of-N policy is not estimated but bounded (docs/baselines.md):

    KL(pi_BoN || pi_ref) <= log N - (N - 1) / N
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from rlhf.atomic import atomic_write_text
from rlhf.config import Config
from rlhf.data import PreferenceSet
from rlhf.evaluate import EvalContext, eval_batches, make_eval_context, per_prompt, response_metrics, response_stats
from rlhf.flops import forward_flops, pass_parameters
from rlhf.models import default_device, freeze, load_causal_lm, load_scalar_model, load_tokenizer, resolve_model_path
from rlhf.reference import reference_model
from rlhf.rundir import RunDir
from rlhf.sequences import reward_scores

METHOD = "bon"


def kl_bound(n: int) -> float:
    """Upper bound on KL(pi_BoN || pi_ref) in nats for best of n (Stiennon et al. 2020; Beirami et al. 2024 prove it
    an upper bound). It is the KL itself where no single response carries probability of its own (a continuous
    reward distribution), and loose where a few responses hold much of pi_ref's mass."""
    return math.log(n) - (n - 1) / n


def pick_best(scores: torch.Tensor, n: int) -> torch.Tensor:
    """[prompts, candidates] scores -> for each prompt the index of the highest-scoring of its first n candidates
    (the earliest on a tie, as torch.argmax returns)."""
    return scores[:, :n].argmax(dim=1)


@dataclass
class Candidates:
    """max(bon.n) responses for every eval prompt, each field indexed [prompt][candidate]; candidate j is round j's
    sample."""

    texts: list[list[str]]
    lengths: list[list[int]]  # response tokens, EOS included
    ended: list[list[bool]]  # ended with EOS
    proxy: list[list[float]]  # r_phi(x, y)
    seconds: list[float]  # per round: wall-clock of sampling and scoring
    tokens: list[int]  # per round: prompt + response tokens sampled
    flops: list[int]  # per round: FLOPs of sampling and scoring them (forward passes, rlhf/flops.py)


@torch.inference_mode()
def draw_candidates(ctx: EvalContext, reward_model: PreTrainedModel, n_max: int) -> Candidates:
    """n_max rounds of the evaluator's sampling from pi_ref, round j seeded with eval.seed + j, scored by r_phi."""
    rounds: dict[str, list[list]] = {"texts": [], "lengths": [], "ended": [], "proxy": []}  # [round][prompt]
    seconds, tokens = [], []
    n_params = pass_parameters(ctx.ref_model) + pass_parameters(reward_model, "scalar")  # sampling, then r_phi
    for j in tqdm(range(n_max), desc="Best-of-N: rounds of samples from pi_ref"):
        start = time.perf_counter()
        this_round = {key: [] for key in rounds}
        n_tokens = 0
        for batch in eval_batches(ctx.ref_model, ctx, ctx.cfg.seed + j, desc=f"round {j + 1}"):
            with ctx.autocast():
                this_round["proxy"] += reward_scores(reward_model, batch, ctx.tokenizer).tolist()
            for key, values in zip(("texts", "lengths", "ended"), response_stats(batch, ctx.tokenizer)):
                this_round[key] += values
            n_tokens += int(batch.attention_mask.sum())
        for key, values in this_round.items():
            rounds[key].append(values)
        seconds.append(time.perf_counter() - start)
        tokens.append(n_tokens)
    by_prompt = {key: [list(row) for row in zip(*values)] for key, values in rounds.items()}
    return Candidates(**by_prompt, seconds=seconds, tokens=tokens, flops=[forward_flops(n_params, n) for n in tokens])


def _chosen(table: list[list], best: list[int]) -> list:
    """Each prompt's entry for its chosen candidate."""
    return [row[j] for row, j in zip(table, best, strict=True)]


@dataclass
class BestOfNResult:
    run_dir: Path
    evals: dict[int, dict[str, float]]  # N -> the metrics of its eval row


def run_identity(cfg: Config, reward_model_path: Path) -> tuple[str, int, dict]:
    """The method, seed and extra inputs a Best-of-N run's directory is keyed by (rlhf.rundir.run_key): the same
    for the run and for the pipeline asking whether it is done already."""
    return (
        METHOD,
        cfg.eval.seed,
        {
            "reward_model_path": str(reward_model_path),
            "bon_n": sorted(set(cfg.bon.n)),
            "reference_model": resolve_model_path(reference_model(cfg), cfg.hub_access),
        },
    )


def best_of_n(cfg: Config, prefs: PreferenceSet, reward_model_path: Path) -> BestOfNResult:
    """Best-of-N for every N in `bon.n`, ranked by the reward model at `reward_model_path`, into one run directory
    runs/<profile>/bon/<run-id>/ with one eval row per N (step = N, `eval/kl` = the bound)."""
    device = default_device()
    path = resolve_model_path(reference_model(cfg), cfg.hub_access)
    tokenizer = load_tokenizer(path)
    ref = freeze(load_causal_lm(path, cfg.model.attention).to(device))
    reward_model = freeze(
        load_scalar_model(str(reward_model_path), tokenizer.pad_token_id, cfg.model.attention).to(device)
    )
    ns = sorted(set(cfg.bon.n))
    method, seed, extra = run_identity(cfg, reward_model_path)
    # no resume points: a killed run starts again from the start, in its own directory
    run, _ = RunDir.open(cfg, method, seed, device, prefs.sha256, extra=extra)
    evals = {}
    with run.running():
        ctx = make_eval_context(cfg, prefs, ref, tokenizer, device)
        with run.stage("sample_and_score", device) as timing:
            c = draw_candidates(ctx, reward_model, ns[-1])
            timing["flops"] = sum(c.flops)
        # The gold reward is the measurement, not part of Best-of-N: scored outside its clock.
        gold = [ctx.gold_reward(texts) for texts in c.texts] if ctx.gold_reward is not None else None
        atomic_write_text(
            run.path / "samples" / "candidates.jsonl",
            "".join(
                json.dumps(
                    {
                        "prompt_index": i,
                        "candidate": j,
                        "response": c.texts[i][j],
                        "proxy": c.proxy[i][j],
                        **({"gold": gold[i][j]} if gold else {}),
                    },
                    ensure_ascii=False,
                )
                + "\n"
                for i in range(len(c.texts))
                for j in range(ns[-1])
            ),
        )
        for n in ns:
            best = pick_best(torch.tensor(c.proxy), n).tolist()
            texts, proxy = _chosen(c.texts, best), _chosen(c.proxy, best)
            golds = _chosen(gold, best) if gold else None
            lengths, ended = _chosen(c.lengths, best), _chosen(c.ended, best)
            metrics = {"eval/kl": kl_bound(n), "bon/n": n, **response_metrics(texts, lengths, ended, golds, proxy)}
            # Best of n costs the sampling and scoring of n rounds, spent at inference on every prompt.
            run.log(
                {
                    "kind": "eval",
                    "step": n,
                    "wall_seconds": sum(c.seconds[:n]),
                    "tokens": sum(c.tokens[:n]),
                    "flops": sum(c.flops[:n]),
                    **metrics,
                }
            )
            bound = [kl_bound(n)] * len(texts)  # every prompt's KL is the bound: no estimate exists (docs/baselines.md)
            run.write_samples(n, per_prompt(ctx.prompts, texts, bound, None, lengths, ended, golds, proxy))
            evals[n] = metrics
    return BestOfNResult(run.path, evals)
