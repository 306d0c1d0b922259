"""RLOO (Ahmadian et al. 2024, "Back to Basics"): eq. (2) without a value model, through TRL's RLOOTrainer.

    train(cfg, prefs, seed, reward_model_path) -> TrlStageResult

Each step samples k = `rloo.num_generations` completions for each of rollout_batch_size / k training prompts from the
current policy (temperature 1) and scores each with PPO's reward model r_phi (this seed's, never the gold reward).
TRL then puts eq. (2)'s KL penalty into the sequence's reward, summed over its tokens, with our beta:

    R(x, y) = r_phi(x, y) - beta * sum_t [log pi_old(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)]

and the advantage of each completion is its R minus the mean R of the other k - 1 completions of its prompt (the
leave-one-out baseline, unbiased because it does not depend on the completion itself). The loss is REINFORCE on the
sequence log-prob, -A * log pi(y | x), in TRL's clipped form (the ratio is 1 with one pass, `num_iterations`: 1).
Its expected gradient is that of eq. (2) with the sequence KL, so its optimum is eq. (5)'s pi* (tests/test_bandit.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
import trl
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from rlhf.config import Config
from rlhf.data import PreferenceSet
from rlhf.distributed import per_process
from rlhf.flops import forward_flops, train_flops
from rlhf.online import RewardFunction, run_online
from rlhf.online import run_identity as online_identity
from rlhf.trl_callbacks import quiet_progress_bar, run_dir_args
from rlhf.trl_stage import TrlStageResult

METHOD = "rloo"


def trainer_args(cfg: Config, seed: int, output_dir: Path, device: torch.device) -> trl.RLOOConfig:
    """TRL's arguments for RLOO on eq. (2): our beta on the sequence KL, pure ancestral sampling at temperature 1
    (the distribution the evaluator and DPO's beta assume), one fresh rollout batch per optimiser step."""
    r = cfg.rloo
    return trl.RLOOConfig(
        output_dir=str(output_dir),
        beta=cfg.beta,  # the same key as PPO's KL coefficient: R = r_phi - beta * KL(pi_old || pi_ref) per sequence
        num_generations=r.num_generations,
        per_device_train_batch_size=per_process(r.rollout_batch_size, "rloo.rollout_batch_size"),  # completions
        gradient_accumulation_steps=1,  # so one generation batch per optimiser step (TRL's steps_per_generation)
        num_iterations=r.num_iterations,
        epsilon=r.cliprange,
        normalize_advantages=r.normalize_advantages,
        max_steps=r.iterations,
        max_completion_length=r.max_new_tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,  # TRL's defaults too: said here because beta's meaning rests on them
        learning_rate=r.learning_rate,
        lr_scheduler_type=r.lr_scheduler,
        max_grad_norm=r.max_grad_norm,
        disable_dropout=True,  # the ratio pi/pi_old is exactly 1 on the first pass, and the KL carries no dropout
        **{
            **run_dir_args(cfg.model, cfg.weight_decay, seed, device, r.checkpoint_every),
            # RLOOTrainer counts the prompt + completion tokens it samples itself; Trainer's counter finds no ids
            "include_num_input_tokens_seen": "no",
        },
    )


def build_trainer(
    cfg: Config,
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Dataset,
    reward: RewardFunction,
    seed: int,
    output_dir: Path,
    callbacks: list[TrainerCallback],
) -> trl.RLOOTrainer:
    """The RLOO trainer for one run: `policy` from pi_ref, `reward` the only reward function. TRL loads its own frozen
    pi_ref from the policy's folder (or, with LoRA, disables the adapters)."""
    args = trainer_args(cfg, seed, output_dir, policy.device)
    trainer = trl.RLOOTrainer(
        model=policy,
        reward_funcs=reward,
        args=args,
        train_dataset=prompts,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    return quiet_progress_bar(trainer, f"RLOO seed {seed}")


def flops_per_token(cfg: Config, n_policy: int, n_reward: int) -> int:
    """Compute per sampled prompt + completion token: sampling (a policy forward, KV cache), TRL's scoring passes
    (log pi_old, log pi_ref, r_phi: forward), and `num_iterations` training passes of the policy, as PPO counts."""
    return forward_flops(n_policy + 2 * n_policy + n_reward, 1) + cfg.rloo.num_iterations * train_flops(n_policy, 1)


def run_identity(cfg: Config, reward_model_path: Path) -> tuple[str, dict]:
    return online_identity(METHOD, reward_model_path)


def train(cfg: Config, prefs: PreferenceSet, seed: int, reward_model_path: Path) -> TrlStageResult:
    """One RLOO run from pi_ref against the reward model at `reward_model_path`, into runs/<profile>/rloo/<run-id>/."""
    return run_online(
        cfg,
        prefs,
        seed,
        reward_model_path,
        METHOD,
        "RLOO",
        cfg.rloo.eval_every,
        build_trainer,
        lambda n_policy, n_reward: flops_per_token(cfg, n_policy, n_reward),
        add_special_tokens=True,
    )
