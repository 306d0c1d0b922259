"""Stage 1 of RLHF: the reward model r_phi, trained on the shared preference set with the Bradley-Terry loss

    max_phi  E_(x, y_w, y_l) [ log sigma( r_phi(x, y_w) - r_phi(x, y_l) ) ]          (1)

with TRL's RewardTrainer. Backbone = the policy's model with a one-output head. After training, r_phi is
shifted so that pi_ref's own samples on train prompts score 0 on average (InstructGPT's normalisation): PPO's
reward then starts centred, and the per-token KL penalty and the score live on comparable scales. The shift is
stored in the saved model's config (`reward_shift`) and applied by `rlhf.sequences.reward_scores`.

Every `reward_model.checkpoint_every` steps Trainer saves a resume point, as DPO's does (rlhf/trl_callbacks.py); a
killed or failed run with the same key (`reward_model_key`, which decides its reuse too) goes on from the last one
(`RunDir.open`, Trainer's own `resume_from_checkpoint`) and ends with the weights an uninterrupted run would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed
from transformers import TrainerCallback
from trl import RewardConfig, RewardTrainer

from rlhf.config import Config
from rlhf.data import PreferenceSet, budget_pairs, budget_record
from rlhf.distributed import check_replicas, from_main, is_main, per_process, stop_together
from rlhf.errors import UserError, check_finite
from rlhf.evaluate import EvalContext, arithmetic, heldout_pair_metrics, store_rm_pair_metrics
from rlhf.flops import forward_flops, pass_parameters, train_flops
from rlhf.keys import reward_model_key
from rlhf.models import (
    autocast,
    default_device,
    for_training,
    freeze,
    load_causal_lm,
    load_scalar_model,
    load_tokenizer,
    merged,
    resolve_model_path,
    save_model,
)
from rlhf.reference import reference_model
from rlhf.rundir import RunDir
from rlhf.sequences import chunks, reward_scores, sample
from rlhf.tasks import load_task
from rlhf.trl_callbacks import EvalAndLogCallback, quiet_progress_bar, resumed_clock, run_dir_args


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Eq. (1) as a loss: -mean log sigma(r(x, y_w) - r(x, y_l)). (RewardTrainer computes exactly this.)"""
    return -torch.nn.functional.logsigmoid(chosen_rewards - rejected_rewards).mean()


@dataclass
class RewardModelResult:
    path: Path  # folder with the trained, shifted reward model (load with load_scalar_model)
    run_dir: Path
    shift: float  # subtracted from raw scores so pi_ref's samples average 0
    heldout: dict[str, float]


@torch.inference_mode()
def _reward_shift(rm, tokenizer, prompts: list[str], cfg: Config, device: torch.device) -> tuple[float, int]:
    """Mean raw score of pi_ref's samples on `prompts` (subtracting it centres r_phi on pi_ref), and the FLOPs of
    sampling them and scoring them (forward passes over prompt and response)."""
    policy = freeze(
        load_causal_lm(resolve_model_path(reference_model(cfg), cfg.hub_access), cfg.model.attention).to(device)
    )
    n_params = pass_parameters(policy) + pass_parameters(rm, "scalar")
    scores, flops = [], 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.data.seed)
        for s in chunks(len(prompts), cfg.eval.batch_size):
            batch = sample(
                policy,
                tokenizer,
                prompts[s],
                cfg.data.max_new_tokens,
                cfg.data.temperature,
                autocast(cfg.model.precision, device),
            )
            with autocast(cfg.model.precision, device):
                scores += reward_scores(rm, batch, tokenizer).tolist()  # no shift set yet: raw scores
            flops += forward_flops(n_params, int(batch.attention_mask.sum()))
    return sum(scores) / len(scores), flops


def _trainer(
    cfg: Config, rm, tokenizer, train_set, seed: int, run: RunDir, callback: TrainerCallback, device: torch.device
) -> RewardTrainer:
    """TRL's RewardTrainer for eq. (1) on `train_set`, writing into `run` through `callback`, with its resume points
    (checkpoint-<step>/) in the run's checkpoints/ folder."""
    rc = cfg.reward_model
    args = RewardConfig(
        output_dir=str(run.path / "checkpoints"),
        learning_rate=rc.learning_rate,
        num_train_epochs=cfg.budget.passes(rc.epochs),
        per_device_train_batch_size=per_process(rc.batch_size, "reward_model.batch_size"),
        warmup_steps=rc.warmup_ratio,
        lr_scheduler_type="linear",
        max_length=rc.max_length,
        **run_dir_args(cfg.model, cfg.weight_decay, seed, device, rc.checkpoint_every),
    )
    return quiet_progress_bar(
        RewardTrainer(model=rm, args=args, train_dataset=train_set, processing_class=tokenizer, callbacks=[callback]),
        f"reward model seed {seed}",
    )


def _count_long_pairs(trainer: RewardTrainer, train_set, run: RunDir, cfg: Config) -> None:
    """RewardTrainer drops pairs longer than `reward_model.max_length`: counted in the manifest, said, and an error if
    none is left."""
    max_length, given = cfg.reward_model.max_length, len(train_set)
    dropped = given - len(trainer.train_dataset)
    run.manifest["pairs"] = {"given": given, "dropped_too_long": dropped}
    run.manifest["budget"] = budget_record(given - dropped, cfg.budget.passes(cfg.reward_model.epochs))
    run.write_manifest()
    if dropped == given:
        raise UserError(
            f"reward_model.max_length={max_length}: every training pair is longer, so RewardTrainer drops "
            "them all; raise reward_model.max_length"
        )
    if dropped:
        print(
            f"reward model: {dropped} of {given} training pairs are longer than reward_model.max_length="
            f"{max_length} tokens and were dropped"
        )


def train_reward_model(cfg: Config, prefs: PreferenceSet, seed: int) -> RewardModelResult:
    """Train r_phi on `prefs.train` (eq. 1), centre it on pi_ref, report held-out accuracy and margin. An interrupted
    run with the same key is resumed from its last checkpoint."""
    set_seed(seed)  # first: a new scalar head or LoRA adapters drawn below must not depend on the process
    device = default_device()
    model_path = resolve_model_path(reference_model(cfg), cfg.hub_access)  # the backbone: pi_ref's
    tokenizer = load_tokenizer(model_path)
    run, resume_from = RunDir.open(
        cfg,
        "reward_model",
        seed,
        device,
        prefs.sha256,
        extra={"reward_model_key": reward_model_key(cfg, prefs.sha256, seed), "reference_model": model_path},
        key="reward_model_key",
    )
    with run.running():
        rm = load_scalar_model(model_path, tokenizer.pad_token_id, cfg.model.attention)
        n_params = pass_parameters(rm, "scalar")  # counted before Trainer wraps it
        rm = for_training(rm, cfg, "SEQ_CLS", trainer_checkpointing=True)
        # train rows, their clock and FLOPs, checkpoints committed; the stage keeps the name PPO's cost reads
        callback = EvalAndLogCallback(
            run,
            None,
            None,
            device,
            n_params,
            resumed_clock(run, resume_from),
            name="reward model step",
            stage="reward_model",
        )
        train_set = budget_pairs(cfg, prefs).select_columns(["prompt", "chosen", "rejected"])
        trainer = _trainer(cfg, rm, tokenizer, train_set, seed, run, callback, device)
        _count_long_pairs(trainer, train_set, run, cfg)
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        tokens = trainer.state.num_input_tokens_seen
        trained = {
            "step": trainer.state.global_step,
            "wall_seconds": callback.train_seconds,
            "tokens": tokens,
            "flops": train_flops(n_params, tokens),
        }  # where the eval row stands
        rm = freeze(merged(trainer.model))  # a plain model from here on: LoRA adapters folded in
        check_replicas(rm, run.manifest)
        final = run.path / "checkpoints" / "final"
        # Centring, held-out metrics and the save happen once, on the main process; the others wait, then share
        # its numbers (or stop with its error).
        with stop_together():
            shift, heldout = (
                _centre_evaluate_save(rm, tokenizer, cfg, prefs, run, trained, final, device)
                if is_main()
                else (None, None)
            )
        shift, heldout = from_main(shift, heldout)
    return RewardModelResult(path=final, run_dir=run.path, shift=shift, heldout=heldout)


def _centre_evaluate_save(
    rm, tokenizer, cfg: Config, prefs: PreferenceSet, run: RunDir, trained: dict, final: Path, device: torch.device
) -> tuple[float, dict[str, float]]:
    """Centre the trained r_phi on pi_ref's samples, measure it on the held-out pairs, save it to `final`, and log the
    eval row at `trained` (step, clock, tokens, FLOPs). Both are forward passes, their FLOPs counted apart from
    training (stages `reward_shift` and `eval`)."""
    task = load_task(cfg.task, tokenizer, cfg.hub_access)
    with run.stage("reward_shift", device) as timing:
        shift, timing["flops"] = _reward_shift(
            rm, tokenizer, task.train_prompts[: cfg.reward_model.center_prompts], cfg, device
        )
    rm.config.reward_shift = shift
    ctx = EvalContext(
        prompts=[],
        ref_model=None,
        tokenizer=tokenizer,
        cfg=cfg.eval,
        autocast=lambda: autocast(cfg.model.precision, device),
        arithmetic=arithmetic(cfg, device),
        heldout_pairs=prefs.scored_pairs(cfg.eval.split).to_list()[: cfg.eval.n_heldout_pairs or None],
    )
    cost = {"scoring_seconds": 0.0, "scored_tokens": 0, "flops": 0}
    with run.stage("eval", device) as timing:
        heldout = heldout_pair_metrics(None, ctx, reward_model=rm, implicit_beta=None, cost=cost)
        timing["flops"] = cost["flops"]
    check_finite("reward model on held-out pairs", **heldout)
    save_model(rm, tokenizer, final)
    store_rm_pair_metrics(final, ctx, heldout)  # what every run evaluated against this model reads, not recomputes
    run.log({"kind": "eval", **trained, "reward_shift": shift, "eval/flops": cost["flops"], **heldout})
    run.manifest["reward_model_path"] = str(final)
    print(
        f"reward model: held-out accuracy {heldout['heldout/rm_accuracy']:.3f} (gold labels "
        f"{heldout.get('heldout/gold_accuracy', float('nan')):.3f}), margin {heldout['heldout/rm_margin']:.3f}, "
        f"shift {shift:.3f}"
    )
    return shift, heldout
