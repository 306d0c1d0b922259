"""DPO training, eq. (6): TRL's DPOTrainer (sigmoid loss), reporting into this project's run directory.

    train(cfg, prefs, seed) -> DPOResult

One run: load pi_theta and a frozen pi_ref with the shared loader, compute pi_ref's log-probs once for every
training pair the run will reach, train with TRL's DPOTrainer (beta = the top-level `beta`, PPO's KL
coefficient), run the shared evaluator at step 0, every `dpo.eval_every` steps and at the end, and save the
final policy.
Metric names and the gradient-weight derivation are in docs/dpo.md.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import trl
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_callback import ProgressCallback

from dpo.loss import dpo_gradient_weight, dpo_loss
from pipelines.config import Config
from pipelines.data import PreferenceSet
from pipelines.evaluate import evaluate
from pipelines.models import default_device, freeze, load_causal_lm, load_tokenizer, resolve_model_path, use_bf16
from pipelines.rundir import RunDir
from pipelines.sequences import chunks, pad_sequences, response_logprobs, shortest_first
from pipelines.stages import make_eval_context
from pipelines.tasks import PAIR_FIELDS

# Left out of train rows: two copies of our `tokens` (the same count of non-padding tokens through the policy), and
# Trainer's speed figures, whose clock includes evaluation.
_UNLOGGED_KEYS = ("num_tokens", "num_input_tokens_seen", "train_runtime", "train_tokens_per_second")


@dataclass
class DPOResult:
    run_dir: Path
    steps: int                        # optimiser steps taken
    train_seconds: float              # training wall-clock, evaluation excluded
    final_metrics: dict[str, float]   # the shared evaluator's metrics at the last step
    timings: dict[str, dict[str, float]]  # timings.json: seconds and peak memory per stage


class WeightLoggingDPOTrainer(trl.DPOTrainer):
    """TRL's DPOTrainer that also logs the gradient weight sigmoid(r_hat_l - r_hat_w): its mean and std over a batch.

    TRL computes the per-pair log-probs inside `_compute_loss` but logs only batch means, so a forward hook keeps
    the policy's output (per-token log-probs) and the weight is computed from it: no extra forward pass.
    Needs `precompute_ref_log_probs=True`, which puts pi_ref's log-probs in every batch; they are computed with
    the project's own `response_logprobs` (see `_precompute_ref_logps`).
    """

    def _compute_loss(self, model, inputs, return_outputs):
        outputs = []
        hook = model.register_forward_hook(lambda _module, _args, output: outputs.append(output))
        try:
            result = super()._compute_loss(model, inputs, return_outputs)
        finally:
            hook.remove()
        # The first forward is the policy's: per-token log-probs, zero off the responses; rows are [chosen; rejected].
        chosen_logps, rejected_logps = outputs[0].log_probs.detach().sum(dim=1).chunk(2)
        _, chosen_rewards, rejected_rewards = dpo_loss(chosen_logps, rejected_logps, inputs["ref_chosen_logps"],
                                                       inputs["ref_rejected_logps"], self.beta)
        weights = self.accelerator.gather(dpo_gradient_weight(chosen_rewards, rejected_rewards))
        metrics = self._metrics["train" if self.model.training else "eval"]
        metrics["dpo/grad_weight_mean"].append(weights.mean().item())
        metrics["dpo/grad_weight_std"].append(weights.std(unbiased=False).item())  # spread over this batch's pairs
        return result

    @torch.inference_mode()
    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """pi_ref's log-probs of every pair, once, with the project's one log-prob function, on the ids TRL tokenised
        (their first `max_length` tokens, as TRL's collator keeps). TRL's own pass runs its fused LM head over
        every position, prompt and padding included, wherever Triton is missing (a CPU); this one projects only
        the response positions. Each process computes every pair (TRL's shards them): fine for one frozen pass."""
        cut = self.args.max_length or None
        logps: dict[str, list[float]] = {"chosen": [], "rejected": []}
        for s in tqdm(list(chunks(len(dataset), batch_size)), desc=f"pi_ref log-probs ({name} pairs)", leave=False):
            rows = dataset[s]
            for side, out in logps.items():
                full = [(p + r)[:cut] for p, r in zip(rows["prompt_ids"], rows[f"{side}_ids"])]
                batch = pad_sequences([f[:len(p)] for f, p in zip(full, rows["prompt_ids"])],
                                      [f[len(p):] for f, p in zip(full, rows["prompt_ids"])],
                                      self.processing_class.pad_token_id)
                with torch.autocast(self.ref_model.device.type, torch.bfloat16, enabled=self.args.bf16):
                    out += response_logprobs(self.ref_model, batch.to(self.ref_model.device))[0].sum(dim=1).tolist()
        return dataset.add_column("ref_chosen_logps", logps["chosen"]).add_column("ref_rejected_logps",
                                                                                   logps["rejected"])


class _ProgressBar(ProgressCallback):
    """Trainer's progress bar (with ETA), showing loss and margin instead of printing every step's log dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}", margin=f"{logs['rewards/margins']:.3f}")


class EvalAndLogCallback(TrainerCallback):
    """Writes every training step as a `train` row and runs the shared evaluator (an `eval` row and samples) at
    step 0, every `eval_every` steps and at the end.

    The training clock (`wall_seconds`) runs only between evaluations, so eval time never counts as training;
    each stretch is also recorded as stage `train` in timings.json, each evaluation as stage `eval`.
    """

    def __init__(self, run: RunDir, evaluate_policy: Callable[[PreTrainedModel, int], tuple[dict, list]],
                 eval_every: int, device: torch.device):
        self.run, self.evaluate_policy, self.eval_every, self.device = run, evaluate_policy, eval_every, device
        self.train_seconds = 0.0  # closed stretches only; see `clock`
        self.last_eval: tuple[int, dict[str, float]] | None = None  # (step, metrics)
        self._stretch: contextlib.ExitStack | None = None
        self._stretch_start = 0.0

    def clock(self) -> float:
        """Training wall-clock seconds so far, evaluation excluded."""
        running = time.perf_counter() - self._stretch_start if self._stretch is not None else 0.0
        return self.train_seconds + running

    def _start_clock(self) -> None:
        self._stretch = contextlib.ExitStack()
        self._stretch.enter_context(self.run.stage("train", self.device))
        self._stretch_start = time.perf_counter()

    def _stop_clock(self) -> None:
        self.train_seconds = self.clock()
        self._stretch.close()
        self._stretch = None

    def _evaluate(self, model: PreTrainedModel, step: int, tokens: int) -> None:
        with self.run.stage("eval", self.device):
            metrics, samples = self.evaluate_policy(model, step)
        self.run.log({"kind": "eval", "step": step, "wall_seconds": self.train_seconds, "tokens": tokens, **metrics})
        self.run.write_samples(step, samples)
        self.last_eval = (step, metrics)
        shown = ("eval/gold", "eval/gold_sem", "eval/kl", "heldout/implicit_accuracy", "heldout/implicit_margin",
                 "heldout/gold_accuracy", "heldout/gold_margin")
        tqdm.write(f"  step {step}: " + "  ".join(f"{k}={metrics[k]:.4g}" for k in shown if k in metrics))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._evaluate(model, state.global_step, state.num_input_tokens_seen)
        self._start_clock()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.eval_every == 0:
            self._stop_clock()
            self._evaluate(model, state.global_step, state.num_input_tokens_seen)
            self._start_clock()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" not in logs:  # Trainer's end-of-training summary (its runtime includes evaluation): not a step
            return
        trl_logs = {k: v for k, v in logs.items() if k not in _UNLOGGED_KEYS}
        self.run.log({"kind": "train", "step": state.global_step, "wall_seconds": self.clock(),
                      "tokens": state.num_input_tokens_seen, **trl_logs})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._stop_clock()
        if self.last_eval is None or self.last_eval[0] != state.global_step:
            self._evaluate(model, state.global_step, state.num_input_tokens_seen)


def trainer_args(cfg: Config, seed: int, output_dir: Path, device: torch.device) -> trl.DPOConfig:
    """TRL's arguments for eq. (6): sigmoid loss, our beta, pi_ref's log-probs computed once before training."""
    d = cfg.dpo
    return trl.DPOConfig(
        output_dir=str(output_dir),
        loss_type=["sigmoid"],           # -log sigmoid(beta * (log-ratio_w - log-ratio_l)): eq. (6)
        beta=cfg.beta,                   # the same key as PPO's KL coefficient in eq. (2)
        precompute_ref_log_probs=True,   # pi_ref is frozen: one pass over the pairs, not one per epoch
        precompute_ref_batch_size=cfg.eval.batch_size,  # forward passes only: the evaluator's scoring batch
        learning_rate=d.learning_rate, lr_scheduler_type=d.lr_scheduler, warmup_steps=d.warmup_steps,
        per_device_train_batch_size=d.batch_size, gradient_accumulation_steps=d.gradient_accumulation_steps,
        num_train_epochs=d.epochs, max_steps=d.max_steps or -1, max_grad_norm=d.max_grad_norm,
        max_length=d.max_length,
        # transformers' new name for gradient checkpointing; setting the old one warns that it is deprecated
        activation_checkpointing=d.gradient_checkpointing,
        bf16=use_bf16(cfg.model.precision, device), dataloader_pin_memory=device.type == "cuda",
        seed=seed, data_seed=seed,
        # Our callback writes the metrics into the run directory: nothing of TRL's own goes to disk.
        logging_steps=1, report_to="none", save_strategy="no", eval_strategy="no",
        include_num_input_tokens_seen="non_padding",  # state.num_input_tokens_seen = our `tokens`
    )


def build_trainer(cfg: Config, policy: PreTrainedModel, ref: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                  pairs: Dataset, seed: int, output_dir: Path, callbacks: list[TrainerCallback]
                  ) -> WeightLoggingDPOTrainer:
    """The DPO trainer for one run. Building it computes pi_ref's log-probs of the pairs it uses (a progress bar)."""
    args = trainer_args(cfg, seed, output_dir, policy.device)
    # TRL precomputes pi_ref's log-probs of every pair it is given, so give it only the pairs `max_steps` reaches:
    # a seeded random subset, a draw like the one its shuffling sampler would make from all of them.
    used = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    if 0 < used < len(pairs):
        pairs = pairs.shuffle(seed=seed).select(range(used))
    # Shortest first, so each precompute batch is padded to about its own length (training shuffles them anyway).
    # An in-memory copy: TRL's map() calls would otherwise write cache files into the shared preference set's
    # folder and change the sha256 its manifest guards.
    order = shortest_first(tokenizer, *(pairs[k] for k in PAIR_FIELDS))
    pairs = Dataset.from_dict(pairs.select(order).select_columns(list(PAIR_FIELDS)).to_dict())
    trainer = WeightLoggingDPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=pairs,
                                      processing_class=tokenizer, callbacks=callbacks)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_ProgressBar())
    return trainer


def train(cfg: Config, prefs: PreferenceSet, seed: int) -> DPOResult:
    """One DPO run from pi_ref on the shared preference set, into runs/<profile>/dpo/<run-id>/."""
    device = default_device()
    path = resolve_model_path(cfg.model, cfg.hub_access)
    tokenizer = load_tokenizer(path)
    policy = load_causal_lm(path).to(device)
    ref = freeze(load_causal_lm(path).to(device))  # pi_ref: TRL's reference and the evaluator's, one copy
    run = RunDir.create(cfg, "dpo", seed, device, prefs.sha256)
    with run.running():
        ctx = make_eval_context(cfg, prefs, ref, tokenizer, device)
        callback = EvalAndLogCallback(
            run, lambda model, step: evaluate(model, ctx, implicit_beta=cfg.beta, desc=f"eval step {step}"),
            cfg.dpo.eval_every, device)
        with run.stage("ref_logps", device) as timing:
            trainer = build_trainer(cfg, policy, ref, tokenizer, prefs.train, seed, run.path / "checkpoints",
                                    [callback])
            timing["tokens"] = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(  # chosen and rejected rows
                trainer.train_dataset["prompt_ids"], trainer.train_dataset["chosen_ids"],
                trainer.train_dataset["rejected_ids"]))
        trainer.train()
        with run.stage("save", device):
            policy.save_pretrained(run.path / "checkpoints" / "final")
            tokenizer.save_pretrained(run.path / "checkpoints" / "final")
    step, metrics = callback.last_eval
    return DPOResult(run.path, step, callback.train_seconds, metrics, run.timings)
