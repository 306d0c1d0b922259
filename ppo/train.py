"""Stage 2 of RLHF: PPO against the frozen reward model with a KL penalty to pi_ref,

    max_pi  E_{x ~ D, y ~ pi(.|x)} [ r_phi(x, y) ] - beta * KL( pi(.|x) || pi_ref(.|x) )        (2)

written in the manner of CleanRL's ppo.py: `ppo_iteration` is the algorithm, one function per step, and each
implementation detail of Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO", is named where it
happens (by its number in that paper where it has one). One iteration:

  1. `rollout`: sample one response per prompt from the current policy (KV cache, temperature T), truncated after
     the first EOS;
  2. `score`: in one no-grad pass each, log pi_old and log pi_ref (both at temperature T), V_old per token, and the
     reward r(x, y) per sequence; optional penalty for responses without EOS;
  3. `rewards_and_advantages`: -beta * (log pi_old - log pi_ref) per token + r on the last token (eq. 2); GAE;
     whitening;
  4. `update`: PPO epochs over shuffled minibatches, clipped surrogate + clipped value loss, gradient clipping;
  5. bookkeeping (`train_ppo`, `iteration_metrics`): the adaptive KL controller, clock, tokens, FLOPs, metrics,
     evaluation every `eval_every` iterations (time excluded), a resume point every `checkpoint_every` iterations
     (ppo/checkpoint.py).

A NaN or infinite reward, KL, loss or gradient norm stops the run at that iteration (`Diverged`), before the
optimizer step it would poison. With `resume`, a killed or failed run with the same config and seed is
continued from its last checkpoint and ends with the same numbers as an uninterrupted one.

Runs under `accelerate launch` (DDP): each process samples its own share of the prompts; metrics are averaged
across processes; evaluation and every write happen on the main process only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import PeftModel
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ppo import checkpoint
from ppo.core import (
    AdaptiveKLController,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae_advantages,
    kl_penalized_rewards,
    masked_mean,
    whiten,
)
from rlhf.config import Config, PPOConfig
from rlhf.data import PreferenceSet
from rlhf.distributed import check_finite_everywhere, check_replicas, num_processes, per_process, stop_together
from rlhf.errors import UserError, check_finite
from rlhf.evaluate import evaluate, make_eval_context
from rlhf.flops import forward_flops, pass_parameters, train_flops
from rlhf.models import (
    autocast,
    for_training,
    freeze,
    grad_scaler,
    load_causal_lm,
    load_scalar_model,
    load_tokenizer,
    resolve_model_path,
    save_model,
)
from rlhf.reference import reference_model
from rlhf.rundir import RunDir, manifest_of_model
from rlhf.sequences import SequenceBatch, position_ids_from_mask, response_logprobs, reward_scores, sample
from rlhf.tasks import load_task


class TokenValueModel(nn.Module):
    """V(s_t) at every position: the scalar model's backbone and head, not pooled to the last token.

    Initialised from r_phi and centred by r_phi's own shift, so V starts on the scale of the centred scores it
    must predict (uncentred, every V would be off by the shift, ~2.4 on the default profile, and GAE's
    advantages would be mostly that error). A module of its own (rather than a function reaching into the
    model) so DDP sees the value pass as a forward call and synchronises its gradients.
    """

    def __init__(self, scalar_model: nn.Module):
        super().__init__()
        self.scalar_model = scalar_model  # with LoRA a PeftModel: its adapters and its full-trained `score` train
        self.shift = float(getattr(scalar_model.config, "reward_shift", 0.0))

    def forward(self, batch: SequenceBatch) -> torch.Tensor:
        """Values of the response positions, [B, R]: the hidden state that predicts response token t gives V(s_t)."""
        model = self.scalar_model.get_base_model() if isinstance(self.scalar_model, PeftModel) else self.scalar_model
        backbone = getattr(model, model.base_model_prefix)
        mask = batch.attention_mask
        hidden = backbone(
            input_ids=batch.input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False
        ).last_hidden_state
        p_len = batch.prompt_ids.shape[1]
        values = model.score(hidden[:, p_len - 1 : -1]).squeeze(-1).float() - self.shift
        return values * batch.response_mask


@dataclass
class PPOResult:
    run_dir: Path
    steps: int  # PPO iterations taken
    final_metrics: dict[str, float]  # the shared evaluator's metrics at the last iteration
    policy_path: Path


@dataclass
class Learner:
    """What one PPO iteration acts on. `policy` and `value_model` are as accelerate prepared them (DDP-wrapped under
    several processes); `reward` is r(x, y) per sequence, [B]: the reward model's score, or the task's gold reward."""

    policy: nn.Module
    value_model: nn.Module
    ref: nn.Module
    reward: Callable[[SequenceBatch], torch.Tensor]
    tokenizer: PreTrainedTokenizerBase
    accelerator: Accelerator
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: Callable  # a fresh autocast context each call (rlhf.models.autocast), or a no-op one


@dataclass
class Experience:
    """One iteration's rollout, scored, as the PPO epochs learn from it: [B, R] per response token (zero on
    padding), [B] per episode."""

    batch: SequenceBatch
    mask: torch.Tensor  # float response mask
    old_logprobs: torch.Tensor  # log pi_old(y_t), the policy that sampled the rollout
    ref_logprobs: torch.Tensor  # log pi_ref(y_t)
    old_values: torch.Tensor  # V_old(s_t)
    scores: torch.Tensor  # r(x, y) per episode, after the missing-EOS penalty
    rewards: torch.Tensor  # per-token KL-penalised rewards, eq. (2)
    kl: torch.Tensor  # per-token log pi_old - log pi_ref
    advantages: torch.Tensor
    returns: torch.Tensor


def make_optimizer(
    policy: nn.Module, value_model: nn.Module, pc: PPOConfig, weight_decay: float
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """One AdamW over both models, as in CleanRL/TRL: loss = policy loss + vf_coef * value loss. Only the trainable
    parameters: all of them, or with LoRA the adapters and the value head. Fused (one kernel over all tensors, as
    Trainer's default for the TRL stages): on a 2-core CPU 0.08 s a step for 135M parameters against 0.49 s for the
    per-tensor loop, which was ~10% of a default-profile PPO update. Adam's epsilon 1e-5 (CleanRL's, and Huang et
    al.'s), where TRL's stages keep 1e-8; the weight decay is every stage's (`weight_decay`)."""
    optimizer = torch.optim.AdamW(
        [p for m in (policy, value_model) for p in m.parameters() if p.requires_grad],
        lr=pc.learning_rate,
        eps=1e-5,
        weight_decay=weight_decay,
        fused=True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # detail: linear learning-rate annealing to 0
        optimizer, lambda it: 1 - it / pc.iterations if pc.anneal_lr else 1.0
    )
    return optimizer, scheduler


def rollout(learner: Learner, prompts: list[str], pc: PPOConfig) -> SequenceBatch:
    """Step 1: one response per prompt from the current policy, truncated after its first EOS (Huang et al. 2024,
    detail 23.2: truncate and pad after EOS), which is also where `batch.ended` is set, once."""
    policy = learner.accelerator.unwrap_model(learner.policy)
    # detail: eval mode while sampling and scoring, train mode in the update (dropout is off in both, detail 7,
    # models.disable_dropout; train mode is what turns gradient checkpointing on)
    policy.eval()
    learner.value_model.eval()
    return sample(policy, learner.tokenizer, prompts, pc.max_new_tokens, pc.temperature, learner.amp())


def score(
    learner: Learner, batch: SequenceBatch, pc: PPOConfig, where: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 2: (log pi_old, log pi_ref, V_old, r) of the rollout, one batched pass per model with no autograd at all.
    Log-probs at the sampling temperature: those of the distribution the tokens came from."""
    policy = learner.accelerator.unwrap_model(learner.policy)
    with torch.inference_mode(), learner.amp():
        old_logprobs, _ = response_logprobs(policy, batch, pc.temperature)
        ref_logprobs, _ = response_logprobs(learner.ref, batch, pc.temperature)
        old_values = learner.value_model(batch).detach()
        scores = learner.reward(batch)
    check_finite_everywhere(where, reward=scores.sum())
    if pc.missing_eos_penalty is not None:  # detail 23.3: penalise responses cut off by the length cap
        scores = torch.where(batch.ended, scores, scores - pc.missing_eos_penalty)
    return old_logprobs, ref_logprobs, old_values, scores


def rewards_and_advantages(
    scores: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    old_values: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    pc: PPOConfig,
    where: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 3: per-token KL-penalised rewards (eq. 2), GAE advantages and returns (Schulman et al. 2016, eq. 16),
    advantages whitened over the batch's response tokens. Returns (rewards, kl, advantages, returns)."""
    rewards, kl = kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask, beta)
    check_finite_everywhere(where, kl=kl.sum())
    advantages, returns = gae_advantages(rewards, old_values, mask, pc.gamma, pc.lam)
    if pc.whiten_advantages:
        advantages = whiten(advantages, mask)
    return rewards, kl, advantages, returns


def update(
    learner: Learner, exp: Experience, pc: PPOConfig, local_mini_batch: int, where: str
) -> dict[str, list[float]]:
    """Step 4: `ppo_epochs` passes over shuffled minibatches, each one gradient step on the clipped surrogate
    (Schulman et al. 2017, eq. 7) + vf_coef * the clipped value loss. Returns each minibatch's statistics, in order."""
    learner.accelerator.unwrap_model(learner.policy).train()
    learner.value_model.train()
    stats: dict[str, list[float]] = {}
    for _ in range(pc.ppo_epochs):
        for idx in torch.randperm(len(exp.scores)).split(local_mini_batch):
            mb, mask = exp.batch.select(idx), exp.mask[idx]
            with learner.amp():
                new_logprobs, entropy = response_logprobs(learner.policy, mb, pc.temperature, with_entropy=True)
                new_values = learner.value_model(mb)
            pg_loss, pg_stats = clipped_policy_loss(
                new_logprobs, exp.old_logprobs[idx], exp.advantages[idx], mask, pc.cliprange
            )
            vf_loss, vf_stats = clipped_value_loss(
                new_values, exp.old_values[idx], exp.returns[idx], mask, pc.cliprange_value
            )
            loss = pg_loss + pc.vf_coef * vf_loss
            check_finite_everywhere(where, loss=loss, policy_loss=pg_loss, value_loss=vf_loss)
            step_stats = optimizer_step(learner, loss, pc.max_grad_norm, where)
            for key, value in {
                **pg_stats,
                **vf_stats,
                "loss/policy": pg_loss,
                "loss/value": vf_loss,
                "policy/entropy_token": masked_mean(entropy, mask),
                **step_stats,
            }.items():
                stats.setdefault(key, []).append(float(value.detach() if torch.is_tensor(value) else value))
    return stats


def optimizer_step(learner: Learner, loss: torch.Tensor, max_grad_norm: float, where: str) -> dict[str, float]:
    """Backward, clip, step, through accelerate (DDP averages the gradients) and the fp16 loss scaler (a no-op in
    other precisions). Returns the gradient norms, and with fp16 whether the scaler skipped the step."""
    accelerator, optimizer, scaler = learner.accelerator, learner.optimizer, learner.scaler
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(scaler.scale(loss))
    scaler.unscale_(optimizer)  # clip (and log) the true gradients, not the scaled ones
    # detail: gradient clipping, each model on its own: one global norm lets the value loss's large early
    # gradients shrink the policy's step
    grad_norm = accelerator.clip_grad_norm_(learner.policy.parameters(), max_grad_norm)
    vf_grad_norm = accelerator.clip_grad_norm_(learner.value_model.parameters(), max_grad_norm)
    norms = {"grad_norm": grad_norm, "val/grad_norm": vf_grad_norm}
    if not scaler.is_enabled():
        check_finite(where, grad_norm=grad_norm, value_grad_norm=vf_grad_norm)
        optimizer.step()
        return norms
    # fp16: an overflow is routine; the scaler skips that step
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()  # halves the scale after an overflow, doubles it after 2000 clean steps
    skipped = scaler.get_scale() < scale
    return {"amp/skip_rate": float(skipped), **({} if skipped else norms)}  # an inf norm is the overflow itself


def ppo_iteration(
    learner: Learner, prompts: list[str], beta: float, pc: PPOConfig, local_mini_batch: int, where: str
) -> tuple[Experience, dict[str, list[float]], dict[str, float]]:
    """Steps 1-4 of one PPO iteration on this process's `prompts`. Returns the experience, each minibatch's
    statistics, and the seconds each phase took."""
    start = time.perf_counter()
    batch = rollout(learner, prompts, pc)
    rollout_end = time.perf_counter()
    mask = batch.response_mask.float()
    old_logprobs, ref_logprobs, old_values, scores = score(learner, batch, pc, where)
    rewards, kl, advantages, returns = rewards_and_advantages(
        scores, old_logprobs, ref_logprobs, old_values, mask, beta, pc, where
    )
    exp = Experience(batch, mask, old_logprobs, ref_logprobs, old_values, scores, rewards, kl, advantages, returns)
    scoring_end = time.perf_counter()
    stats = update(learner, exp, pc, local_mini_batch, where)
    seconds = {
        "time/rollout": rollout_end - start,
        "time/scoring": scoring_end - rollout_end,
        "time/update": time.perf_counter() - scoring_end,
    }
    return exp, stats, seconds


def iteration_metrics(
    exp: Experience,
    stats: dict[str, list[float]],
    beta: float,
    pc: PPOConfig,
    gold: bool,
    mean_across: Callable[[torch.Tensor | float], float],
) -> dict[str, float]:
    """Step 5's train row (docs/ppo.md, Metrics): the rollout's objective terms, averaged across processes, and the
    update's statistics, each averaged over its minibatches and then across processes. `tokens/*` count this
    process's tokens through a model in each phase: scoring runs pi_old, pi_ref, V (and r_phi); the update runs
    policy and V every epoch."""
    mask, kl_per_episode = exp.mask, exp.kl.sum(dim=1)
    rollout_tokens = int(exp.batch.attention_mask.sum())
    return {
        "objective/kl": mean_across(kl_per_episode.mean()),
        "objective/entropy": mean_across((-exp.old_logprobs * mask).sum(dim=1).mean()),
        "objective/scores": mean_across(exp.scores.mean()),
        "objective/rlhf_reward": mean_across((exp.scores - beta * kl_per_episode).mean()),
        "objective/kl_coef": beta,
        "val/explained_variance": mean_across(explained_variance(exp.old_values, exp.returns, mask)),
        "episode/length": mean_across(mask.sum(dim=1).mean()),
        "episode/eos_rate": mean_across(exp.batch.ended.float().mean()),
        "tokens/rollout": int(exp.batch.response_mask.sum()),
        "tokens/scoring": rollout_tokens * (3 if gold else 4),
        "tokens/update": rollout_tokens * 2 * pc.ppo_epochs,
        **{k: mean_across(sum(v) / len(v)) for k, v in stats.items()},
    }


def run_identity(cfg: Config, reward_model_path: Path | None) -> tuple[str, dict]:
    """The method and the extra inputs a PPO (or PPO-GT) run's directory is keyed by (rlhf.rundir.run_key): the same
    for the run and for the pipeline asking whether it is done already."""
    gold = cfg.ppo.reward == "gold"
    return ("ppo-gt" if gold else "ppo"), {
        "reward_model_path": None if gold else str(reward_model_path),
        "num_processes": num_processes(),
    }


def train_ppo(cfg: Config, prefs: PreferenceSet, reward_model_path: Path | None, seed: int) -> PPOResult:
    """Run PPO (eq. 2) from pi_ref against the reward model at `reward_model_path`, or against the task's gold
    reward when `cfg.ppo.reward == "gold"` (PPO-GT; `reward_model_path` is then None); one run directory."""
    pc = cfg.ppo
    gold = pc.reward == "gold"
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = accelerator.device
    set_seed(seed)

    # --- models: policy initialised from pi_ref; value model from the reward model (PPO-GT has none: from
    # pi_ref with a fresh scalar head); pi_ref and r_phi frozen
    model_path = resolve_model_path(reference_model(cfg), cfg.hub_access)  # pi_ref (rlhf/reference.py)
    tokenizer = load_tokenizer(model_path)
    task = load_task(cfg.task, tokenizer, cfg.hub_access)
    if gold and task.gold_reward is None:
        raise UserError(f"ppo.reward: 'gold' needs a task with a gold reward; task '{cfg.task.name}' has none")
    attention = cfg.model.attention
    policy = for_training(load_causal_lm(model_path, attention), cfg, "CAUSAL_LM")  # with LoRA, ref stays full
    ref = freeze(load_causal_lm(model_path, attention)).to(device)
    reward_model = (
        None
        if gold
        else freeze(load_scalar_model(str(reward_model_path), tokenizer.pad_token_id, attention)).to(device)
    )
    value_scalar = load_scalar_model(str(model_path if gold else reward_model_path), tokenizer.pad_token_id, attention)
    if gold:  # a fresh head starts at V = 0 rather than at random values
        nn.init.zeros_(value_scalar.score.weight)
    # N of each model's pass (rlhf/flops.py), counted on the plain models, before LoRA or DDP wraps them
    n_policy, n_value = pass_parameters(ref), pass_parameters(value_scalar, "scalar")
    n_scoring = 2 * n_policy + n_value + (0 if gold else pass_parameters(reward_model, "scalar"))
    value_model = TokenValueModel(for_training(value_scalar, cfg, "SEQ_CLS"))
    optimizer, scheduler = make_optimizer(policy, value_model, pc, cfg.weight_decay)
    policy, value_model, optimizer = accelerator.prepare(policy, value_model, optimizer)

    def reward(batch: SequenceBatch) -> torch.Tensor:
        if gold:  # PPO-GT: the true reward of the decoded text, as the evaluator scores it
            texts = tokenizer.batch_decode(batch.response_ids, skip_special_tokens=True)
            return torch.tensor(task.gold_reward(texts), device=device, dtype=torch.float32)
        return reward_scores(reward_model, batch, tokenizer)

    scaler = grad_scaler(cfg.model.precision, device)  # fp16 only; otherwise it passes everything through
    checkpoint.track(accelerator, scheduler, scaler)
    learner = Learner(
        policy,
        value_model,
        ref,
        reward,
        tokenizer,
        accelerator,
        optimizer,
        scaler,
        amp=lambda: autocast(cfg.model.precision, device),
    )

    local_batch = per_process(pc.rollout_batch_size, "ppo.rollout_batch_size")  # each samples its own share
    local_mini_batch = per_process(pc.mini_batch_size, "ppo.mini_batch_size")
    prompt_order = torch.randperm(len(task.train_prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    kl_ctl = AdaptiveKLController(cfg.beta, pc.target_kl, pc.kl_horizon) if pc.adaptive_kl else None
    beta = cfg.beta

    main = accelerator.is_main_process
    method, extra = run_identity(cfg, reward_model_path)
    run, resume_from = RunDir.open(cfg, method, seed, device, prefs.sha256, extra=extra)
    run.manifest["reference_model"] = model_path
    # PPO's data budget is its reward model's: the pairs and passes stage 1 trained on (PPO-GT trains on none)
    run.manifest["budget"] = None if gold else manifest_of_model(reward_model_path).get("budget")
    # beta means DPO's beta only with a fixed KL coefficient and rollouts from pi_theta itself (temperature 1)
    run.manifest["kl_control"] = {"adaptive": pc.adaptive_kl, "rollout_temperature": pc.temperature}
    ctx = make_eval_context(cfg, prefs, ref, tokenizer, device) if main else None
    train_seconds, tokens, flops, final_eval = 0.0, 0, 0, {}

    def phase_flops(n_tokens: int) -> dict[str, int]:
        """FLOPs of one iteration's phases over `n_tokens` real rollout tokens: sampling runs the policy through
        prompt and response (the KV cache makes each token one forward token); scoring runs pi_old, pi_ref, V (and
        r_phi) forward; the update runs policy and V forward and backward every PPO epoch."""
        return {
            "rollout": forward_flops(n_policy, n_tokens),
            "scoring": forward_flops(n_scoring, n_tokens),
            "update": pc.ppo_epochs * train_flops(n_policy + n_value, n_tokens),
        }

    def run_eval(iteration: int) -> None:
        nonlocal final_eval
        with stop_together():  # the others wait here for the main process's evaluation, and stop with it
            if main:
                with run.stage("eval", device) as timing:
                    metrics, samples = evaluate(
                        accelerator.unwrap_model(policy), ctx, reward_model=reward_model, desc=f"eval @ {iteration}"
                    )
                    timing["flops"] = timing.get("flops", 0) + metrics["eval/flops"]
                run.log(
                    {
                        "kind": "eval",
                        "step": iteration,
                        "wall_seconds": train_seconds,
                        "tokens": tokens,
                        "flops": flops,
                        **metrics,
                    }
                )
                run.write_samples(iteration, samples)
                final_eval = metrics

    def mean_across(x: torch.Tensor | float) -> float:
        return accelerator.gather(torch.as_tensor(x, device=device, dtype=torch.float32).reshape(1)).mean().item()

    with run.running():
        first_iteration = 1
        if resume_from is None:
            run_eval(0)
        else:  # go on after the checkpoint's iteration, in the very state the interrupted run was in then
            progress = checkpoint.restore(resume_from, accelerator)
            first_iteration = progress["iteration"] + 1
            tokens, flops, train_seconds, beta, final_eval = (
                progress[k] for k in ("tokens", "flops", "train_seconds", "beta", "final_eval")
            )
            if kl_ctl is not None:
                kl_ctl.beta = beta
        bar = tqdm(
            range(first_iteration, pc.iterations + 1),
            desc=f"PPO seed {seed}",
            disable=not main,
            initial=first_iteration - 1,
            total=pc.iterations,
        )
        for iteration in bar:
            start = time.perf_counter()
            with run.stage("train", device) as timing:  # timings.json: train seconds, peak memory, FLOPs
                # this process's share of the next prompts, cycling through one seeded order
                first = (iteration - 1) * pc.rollout_batch_size + accelerator.process_index * local_batch
                prompts = [
                    task.train_prompts[prompt_order[(first + i) % len(prompt_order)]] for i in range(local_batch)
                ]
                where = f"PPO iteration {iteration}"
                exp, stats, seconds = ppo_iteration(learner, prompts, beta, pc, local_mini_batch, where)
                scheduler.step()

                # ---- 5. bookkeeping: metrics, KL controller, tokens, FLOPs, clock
                rollout_tokens = int(exp.batch.attention_mask.sum())
                row = {
                    **iteration_metrics(exp, stats, beta, pc, gold, mean_across),
                    "learning_rate": scheduler.get_last_lr()[0],
                    **seconds,
                    **{f"flops/{phase}": n for phase, n in phase_flops(rollout_tokens).items()},
                    **({"amp/loss_scale": scaler.get_scale()} if scaler.is_enabled() else {}),
                }
                check_finite(where, **{k: v for k, v in row.items() if k != "val/explained_variance"})
                if kl_ctl is not None:  # detail: adaptive KL coefficient (Ziegler et al. 2019)
                    beta = kl_ctl.update(row["objective/kl"], pc.rollout_batch_size)
                all_tokens = int(mean_across(rollout_tokens) * accelerator.num_processes)  # every process's
                tokens += all_tokens
                flops += sum(phase_flops(all_tokens).values())
                timing["flops"] = flops
                train_seconds += time.perf_counter() - start
            run.log(
                {
                    "kind": "train",
                    "step": iteration,
                    "wall_seconds": train_seconds,
                    "tokens": tokens,
                    "flops": flops,
                    **row,
                }
            )
            bar.set_postfix(
                score=f"{row['objective/scores']:.3f}",
                kl=f"{row['objective/kl']:.3f}",
                clip=f"{row['policy/clipfrac']:.3f}",
            )
            if iteration % pc.eval_every == 0 or iteration == pc.iterations:
                run_eval(iteration)
            if pc.checkpoint_every and iteration % pc.checkpoint_every == 0 and iteration < pc.iterations:
                checkpoint.save(
                    run.path / "checkpoints",
                    iteration,
                    accelerator,
                    {
                        "tokens": tokens,
                        "flops": flops,
                        "train_seconds": train_seconds,
                        "beta": beta,
                        "final_eval": final_eval,
                    },
                )

        check_replicas(accelerator.unwrap_model(policy), run.manifest)
        policy_path = run.path / "checkpoints" / "final"
        if main:
            save_model(accelerator.unwrap_model(policy), tokenizer, policy_path)  # a plain model, LoRA merged
            run.manifest["train_seconds"] = train_seconds
        accelerator.wait_for_everyone()  # the policy is on disk before any process returns its path
    return PPOResult(run_dir=run.path, steps=pc.iterations, final_metrics=final_eval, policy_path=policy_path)
