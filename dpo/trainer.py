"""DPO training, eq. (6): TRL's DPOTrainer (sigmoid loss), reporting into this project's run directory.

    train(cfg, prefs, seed) -> TrlStageResult

One run, through the driver of the TRL stages (rlhf/trl_stage.py): load pi_theta and a frozen pi_ref, compute pi_ref's
log-probs once for the budget's pairs (`budget.pairs`, the reward model's too), train with TRL's DPOTrainer (beta =
the top-level `beta`, PPO's KL coefficient), run the shared evaluator at step 0, every `dpo.eval_every` steps and at
the end, and save the final policy. `dpo.loss_type` swaps eq. (6) for one of TRL's variants (IPO, robust DPO) on the
same pairs, into runs/<profile>/dpo-<loss_type>/. Metric names and the gradient-weight derivation are in docs/dpo.md.

Every `dpo.checkpoint_every` steps Trainer saves a resume point (policy, optimizer, scheduler, RNG, position in
the data); with `resume`, a killed or failed run with the same config and seed goes on from the last one via
Trainer's own `resume_from_checkpoint`. A NaN or infinite loss, implicit reward or gradient norm stops the run
at that step (`Diverged`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import torch
import trl
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from dpo.loss import dpo_gradient_weight, dpo_loss
from rlhf.atomic import cached
from rlhf.config import Config
from rlhf.data import PreferenceSet, budget_pairs, budget_record
from rlhf.distributed import check_finite_everywhere, num_processes, per_process
from rlhf.errors import UserError
from rlhf.flops import forward_flops, pass_parameters
from rlhf.keys import reference_logps_name
from rlhf.sequences import chunks, pad_sequences, response_logprobs, shortest_first
from rlhf.tasks import PAIR_FIELDS
from rlhf.trl_callbacks import quiet_progress_bar, run_dir_args
from rlhf.trl_compat import ReferencePassDPOTrainer
from rlhf.trl_stage import TrlStage, TrlStageResult, run_trl_stage


class WeightLoggingDPOTrainer(ReferencePassDPOTrainer):
    """TRL's DPOTrainer that also logs the gradient weight sigmoid(r_hat_l - r_hat_w): its mean and std over a batch.

    TRL computes the per-pair log-probs inside `compute_loss` but logs only batch means, so a forward hook keeps
    the policy's output (per-token log-probs) and the weight is computed from it: no extra forward pass.
    Needs `precompute_ref_log_probs=True`, which puts pi_ref's log-probs in every batch; they are computed with
    the project's own `response_logprobs` (see `reference_logps`). The weight is that of eq. (6); the IPO
    and robust losses weight pairs differently, so it is logged for the sigmoid loss only.
    """

    def __init__(self, *args, ref_logps_cache: Path | None = None, attention: str = "sdpa", **kwargs):
        self.ref_logps_cache = ref_logps_cache  # set first: TRL's __init__ runs `reference_logps`
        self.attention = attention  # pi_ref's attention kernel (`model.attention`): its log-probs depend on it
        self.ref_logps_cached_seconds = 0.0  # what computing the pass took, where it was read from the cache
        self.grad_weights: dict[str, list[float]] = defaultdict(list)  # each batch's statistics since the last log
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = []
        hook = model.register_forward_hook(lambda _module, _args, output: outputs.append(output))
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            hook.remove()
        # Stop before the backward pass of a non-finite loss (Trainer would step on it, and log it as if fine).
        check_finite_everywhere(f"DPO step {self.state.global_step + 1}", loss=result[0] if return_outputs else result)
        # Trainer's own evaluation is off (the shared evaluator measures the policy): only training batches count.
        if self.loss_types != ["sigmoid"] or not self.model.training:
            return result
        # The first forward is the policy's: per-token log-probs, zero off the responses; rows are [chosen; rejected].
        chosen_logps, rejected_logps = outputs[0].log_probs.detach().sum(dim=1).chunk(2)
        _, chosen_rewards, rejected_rewards = dpo_loss(
            chosen_logps, rejected_logps, inputs["ref_chosen_logps"], inputs["ref_rejected_logps"], self.beta
        )
        weights = self.accelerator.gather(dpo_gradient_weight(chosen_rewards, rejected_rewards))
        self.grad_weights["dpo/grad_weight_mean"].append(weights.mean().item())
        self.grad_weights["dpo/grad_weight_std"].append(weights.std(unbiased=False).item())  # over this batch's pairs
        return result

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Trainer's log of a step, with the gradient weight's statistics averaged over the step's batches (as TRL
        averages its own metrics)."""
        logs.update({key: sum(values) / len(values) for key, values in self.grad_weights.items()})
        self.grad_weights.clear()
        super().log(logs, start_time)

    @torch.inference_mode()
    def reference_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """pi_ref's log-probs of every pair, once, with the project's one log-prob function, on the ids TRL tokenised
        (their first `max_length` tokens, as TRL's collator keeps). TRL's own pass runs its fused LM head over
        every position, prompt and padding included, wherever Triton is missing (a CPU); this one projects only
        the response positions. Each process computes every pair (TRL's shards them): fine for one frozen pass.

        Every DPO run on the same pairs (each seed, each sweep point: a seed draws the order of training, not of
        this pass) computes the same numbers, so they are kept in `ref_logps_cache`, keyed by everything they are
        computed from; a run that reads them is charged the seconds computing them took (`train`)."""
        cut = self.args.max_length or None

        def compute() -> dict:
            start = time.perf_counter()
            logps: dict[str, list[float]] = {"chosen": [], "rejected": []}
            for s in tqdm(list(chunks(len(dataset), batch_size)), desc=f"pi_ref log-probs ({name} pairs)", leave=False):
                rows = dataset[s]
                for side, out in logps.items():
                    full = [(p + r)[:cut] for p, r in zip(rows["prompt_ids"], rows[f"{side}_ids"])]
                    batch = pad_sequences(
                        [f[: len(p)] for f, p in zip(full, rows["prompt_ids"])],
                        [f[len(p) :] for f, p in zip(full, rows["prompt_ids"])],
                        self.processing_class.pad_token_id,
                    )
                    with self.accelerator.autocast():  # the precision of TRL's own forward passes
                        out += response_logprobs(self.ref_model, batch.to(self.ref_model.device))[0].sum(dim=1).tolist()
            return {**logps, "seconds": time.perf_counter() - start}

        cache = (
            None
            if self.ref_logps_cache is None
            else self.ref_logps_cache
            / reference_logps_name(
                self.ref_model.name_or_path,
                cut,
                batch_size,
                torch.__version__,
                f"{self.ref_model.device.type}-{self.accelerator.mixed_precision}-{self.attention}",
                [list(dataset[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")],
            )
        )
        logps, read = cached(cache, compute)
        self.ref_logps_cached_seconds = logps["seconds"] if read else 0.0
        return dataset.add_column("ref_chosen_logps", logps["chosen"]).add_column(
            "ref_rejected_logps", logps["rejected"]
        )


def method_name(cfg: Config) -> str:
    """The run-directory method of a DPO run: `dpo` for eq. (6), `dpo-<loss_type>` for a variant, so the report
    never pools a variant's runs with DPO's."""
    return "dpo" if cfg.dpo.loss_type == "sigmoid" else f"dpo-{cfg.dpo.loss_type}"


def run_identity(cfg: Config, reward_model_path: Path | None) -> tuple[str, dict]:
    """The method and the extra inputs a DPO run's directory is keyed by (rlhf.rundir.run_key): the same for the
    run and for the pipeline asking whether it is done already."""
    return method_name(cfg), {
        "reward_model_path": None if reward_model_path is None else str(reward_model_path),
        "num_processes": num_processes(),
    }


def trainer_args(cfg: Config, seed: int, output_dir: Path, device: torch.device) -> trl.DPOConfig:
    """TRL's arguments for eq. (6) (or the configured variant), our beta, pi_ref's log-probs computed once before
    training."""
    d = cfg.dpo
    return trl.DPOConfig(
        output_dir=str(output_dir),
        loss_type=[d.loss_type],  # sigmoid: -log sigmoid(beta * (log-ratio_w - log-ratio_l)), eq. (6)
        label_smoothing=d.label_smoothing,  # read by the robust loss only (the config rejects it elsewhere)
        beta=cfg.beta,  # the same key as PPO's KL coefficient in eq. (2)
        precompute_ref_log_probs=True,  # pi_ref is frozen: one pass over the pairs, not one per epoch
        precompute_ref_batch_size=cfg.eval.batch_size,  # forward passes only: the evaluator's scoring batch
        learning_rate=d.learning_rate,
        lr_scheduler_type=d.lr_scheduler,
        warmup_steps=d.warmup_steps,
        per_device_train_batch_size=per_process(d.batch_size, "dpo.batch_size"),
        gradient_accumulation_steps=d.gradient_accumulation_steps,
        num_train_epochs=cfg.budget.passes(d.epochs),
        max_grad_norm=d.max_grad_norm,
        max_length=d.max_length,
        **run_dir_args(cfg.model, cfg.weight_decay, seed, device, d.checkpoint_every),
    )


def build_trainer(
    cfg: Config,
    policy: PreTrainedModel,
    ref: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Dataset,
    seed: int,
    output_dir: Path,
    callbacks: list[TrainerCallback],
    ref_logps_cache: Path | None = None,
) -> WeightLoggingDPOTrainer:
    """The DPO trainer for one run. Building it computes pi_ref's log-probs of the pairs it uses (a progress bar),
    or reads them from `ref_logps_cache` where a run on the same pairs computed them."""
    max_length, n_given = cfg.dpo.max_length, len(pairs)
    if max_length:
        # TRL drops a pair whose prompt alone is max_length tokens or more: dropped here, counted and said.
        prompt_lengths = [len(ids) for ids in tokenizer(list(pairs["prompt"])).input_ids]  # tokenised as TRL does
        pairs = pairs.select([i for i, n in enumerate(prompt_lengths) if n < max_length])
        if not len(pairs):  # TRL would fail on the empty set with a cryptic error
            raise UserError(
                f"dpo.max_length={max_length}: every training pair's prompt alone is that long, so no "
                "pair is left to train on; raise dpo.max_length"
            )
    n_kept = len(pairs)
    args = trainer_args(cfg, seed, output_dir, policy.device)
    # Shortest first, so each precompute batch is padded to about its own length (training shuffles them anyway).
    # An in-memory copy: TRL's map() calls would otherwise write cache files into the shared preference set's
    # folder and change the sha256 its manifest guards.
    order = shortest_first(tokenizer, *(pairs[k] for k in PAIR_FIELDS))
    pairs = Dataset.from_dict(pairs.select(order).select_columns(list(PAIR_FIELDS)).to_dict())
    trainer = quiet_progress_bar(
        WeightLoggingDPOTrainer(
            model=policy,
            ref_model=ref,
            args=args,
            train_dataset=pairs,
            processing_class=tokenizer,
            callbacks=callbacks,
            ref_logps_cache=ref_logps_cache,
            attention=cfg.model.attention,
        ),
        f"{method_name(cfg).upper()} seed {seed}",
    )
    trainer.pair_counts = {"given": n_given, "dropped_prompt_too_long": n_given - n_kept}  # for count_long_pairs
    return trainer


def count_long_pairs(trainer: WeightLoggingDPOTrainer, max_length: int | None) -> dict[str, int]:
    """What happened to pairs longer than `dpo.max_length`: those whose prompt alone is that long were dropped
    (`build_trainer`), and TRL cut the responses of the others it trains on (`used`). Counted here, and said."""
    used = trainer.train_dataset
    lengths = [
        len(p) + max(len(c), len(r)) for p, c, r in zip(used["prompt_ids"], used["chosen_ids"], used["rejected_ids"])
    ]
    counts = {
        **trainer.pair_counts,
        "used": len(used),
        "truncated": sum(n > max_length for n in lengths) if max_length else 0,
    }
    if counts["dropped_prompt_too_long"] or counts["truncated"]:
        print(
            f"dpo: of {counts['given']} training pairs, {counts['dropped_prompt_too_long']} were dropped (prompt "
            f"alone dpo.max_length={max_length} tokens or more); of the {len(used)} trained on, "
            f"{counts['truncated']} are longer and were cut to it"
        )
    return counts


def train(cfg: Config, prefs: PreferenceSet, seed: int, reward_model_path: Path | None = None) -> TrlStageResult:
    """One DPO run from pi_ref on the shared preference set, into runs/<profile>/<method_name(cfg)>/<run-id>/. With
    `reward_model_path` (PPO's r_phi), the evaluator also reports the proxy reward of DPO's samples under it."""

    def build(stage: TrlStage) -> WeightLoggingDPOTrainer:
        run, device = stage.run, stage.policy.device
        with run.stage("ref_logps", device) as timing:
            trainer = build_trainer(
                cfg,
                stage.policy,
                stage.ref,
                stage.tokenizer,
                budget_pairs(cfg, prefs),
                seed,
                stage.output_dir,
                stage.callbacks,
                stage.eval_ctx.reference_cache.parent,
            )
            # a pass read from the cache is charged what computing it took: every seed's DPO costs the same (`get`:
            # a process other than the main one records no timings)
            cached = trainer.ref_logps_cached_seconds
            timing["seconds"], timing["cached_seconds"] = (
                timing.get("seconds", 0.0) + cached,
                timing.get("cached_seconds", 0.0) + cached,
            )
            # pi_ref's pass reads both rows of every pair, prompt included, cut to max_length as TRL cuts them
            cut, used = trainer.args.max_length or None, trainer.train_dataset
            timing["tokens"] = sum(
                len((p + c)[:cut]) + len((p + r)[:cut])
                for p, c, r in zip(used["prompt_ids"], used["chosen_ids"], used["rejected_ids"])
            )
            timing["flops"] = forward_flops(pass_parameters(stage.ref), timing["tokens"])
        run.manifest["pairs"] = count_long_pairs(trainer, cfg.dpo.max_length)
        run.manifest["budget"] = budget_record(len(trainer.train_dataset), cfg.budget.passes(cfg.dpo.epochs))
        return trainer

    return run_trl_stage(
        cfg,
        prefs,
        seed,
        run_identity(cfg, reward_model_path),
        "DPO",
        cfg.dpo.eval_every,
        build,
        reward_model_path=reward_model_path,
        implicit_beta=cfg.beta,
    )
