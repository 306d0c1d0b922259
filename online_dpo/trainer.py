"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"), through TRL's
OnlineDPOTrainer (trl.experimental.online_dpo in TRL 1.16).

    train(cfg, prefs, seed, reward_model_path) -> TrlStageResult

Each step samples two completions for each of `online_dpo.batch_size` training prompts from the current policy
(temperature 1), ranks each pair by PPO's reward model r_phi (this seed's, never the gold reward; the higher score is
y_w, a tie goes to the first), and takes one gradient step on eq. (6)'s loss with our beta,

    -log sigmoid(beta * [log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x)]),

as DPO does on the fixed preference set. The difference from DPO is only where the pairs come from: pi_theta now,
labelled by r_phi, instead of pi_ref once, labelled by the gold reward's Bradley-Terry draw.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

with warnings.catch_warnings():  # TRL warns that its experimental API may change: said once, in docs/online.md
    warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

from rlhf.config import Config
from rlhf.data import PreferenceSet
from rlhf.distributed import per_process
from rlhf.flops import forward_flops, train_flops
from rlhf.online import RewardFunction, run_online
from rlhf.online import run_identity as online_identity
from rlhf.trl_callbacks import quiet_progress_bar, run_dir_args
from rlhf.trl_stage import TrlStageResult

METHOD = "online-dpo"


def trainer_args(cfg: Config, seed: int, output_dir: Path, device: torch.device) -> OnlineDPOConfig:
    """TRL's arguments for online DPO: eq. (6)'s sigmoid loss with our beta, sampling at temperature 1 (TRL's default
    is 0.9: its pairs would come from another distribution than pi_theta, and its log-probs are taken at 1)."""
    o = cfg.online_dpo
    return OnlineDPOConfig(
        output_dir=str(output_dir),
        loss_type="sigmoid",
        beta=cfg.beta,  # eq. (6)'s beta, the same key as PPO's KL coefficient (TRL could also
        # take a list, one beta an epoch)
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=o.max_new_tokens,
        max_length=o.max_length,
        per_device_train_batch_size=per_process(o.batch_size, "online_dpo.batch_size"),  # prompts: a pair each
        max_steps=o.iterations,
        learning_rate=o.learning_rate,
        lr_scheduler_type=o.lr_scheduler,
        max_grad_norm=o.max_grad_norm,
        disable_dropout=True,
        **{
            **run_dir_args(cfg.model, cfg.weight_decay, seed, device, o.checkpoint_every),
            "include_num_input_tokens_seen": "no",
        },  # Trainer's counter finds no ids: the reward function counts them
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
) -> OnlineDPOTrainer:
    """The online DPO trainer for one run: `policy` from pi_ref, `reward` the only reward function; TRL keeps a frozen
    copy of the policy as pi_ref (or, with LoRA, disables the adapters)."""
    args = trainer_args(cfg, seed, output_dir, policy.device)
    trainer = OnlineDPOTrainer(
        model=policy,
        reward_funcs=reward,
        args=args,
        train_dataset=prompts,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    return quiet_progress_bar(trainer, f"online DPO seed {seed}")


def flops_per_token(n_policy: int, n_reward: int) -> int:
    """Compute per sampled prompt + completion token: sampling (a policy forward, KV cache), pi_ref's and r_phi's
    forward passes, and one training pass of the policy (its forward gives the log-probs of the loss)."""
    return forward_flops(n_policy + n_policy + n_reward, 1) + train_flops(n_policy, 1)


def run_identity(cfg: Config, reward_model_path: Path) -> tuple[str, dict]:
    return online_identity(METHOD, reward_model_path)


def train(cfg: Config, prefs: PreferenceSet, seed: int, reward_model_path: Path) -> TrlStageResult:
    """One online DPO run from pi_ref against the reward model at `reward_model_path`, into
    runs/<profile>/online-dpo/<run-id>/; the evaluator also reads its implicit reward on the held-out pairs."""
    return run_online(
        cfg,
        prefs,
        seed,
        reward_model_path,
        METHOD,
        "online DPO",
        cfg.online_dpo.eval_every,
        build_trainer,
        flops_per_token,
        add_special_tokens=False,
        counts_tokens=True,
        implicit_beta=cfg.beta,
    )
