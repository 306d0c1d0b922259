"""One driver for the stages that fine-tune pi_ref into a policy with a TRL trainer: DPO (and its loss variants),
RLOO and online DPO (through rlhf/online.py), Preferred-FT. Each runs the same sequence around its own trainer:

    seed -> pi_theta and pi_ref (and r_phi) -> run directory, or an interrupted one rewound -> the evaluator's
    callback -> the stage's trainer -> train, from the last resume point -> replicas compared -> pi_theta saved

    run_trl_stage(cfg, prefs, seed, identity, name, eval_every, build_trainer, ...) -> TrlStageResult

A stage gives only what is its own: its run identity, its trainer (`build_trainer`, which also records in the
manifest what the trainer trains on) and what its evaluation and FLOPs read. The reward model and the SFT stage train
with TRL too but keep their own sequence: neither trains a policy from pi_ref nor runs the policy evaluator, the SFT
stage makes pi_ref from the base model, and the reward model is centred and measured once trained
(reward_model/train.py, sft/train.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from accelerate.utils import set_seed
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback

from rlhf.config import Config
from rlhf.data import PreferenceSet
from rlhf.distributed import check_replicas
from rlhf.evaluate import EvalContext, evaluate, make_eval_context
from rlhf.flops import pass_parameters
from rlhf.models import for_training, freeze, load_policy_and_reference, load_scalar_model
from rlhf.reference import reference_model
from rlhf.rundir import RunDir
from rlhf.trl_callbacks import EvalAndLogCallback, resumed_clock, save_policy


@dataclass
class TrlStage:
    """What a stage builds its trainer from, once the driver has loaded the models and opened the run."""

    run: RunDir
    policy: PreTrainedModel  # pi_theta: pi_ref's weights, trainable (LoRA adapters where configured)
    ref: PreTrainedModel  # pi_ref, frozen: the evaluator's, and the trainer's where it takes one
    tokenizer: PreTrainedTokenizerBase
    reward_model: PreTrainedModel | None  # r_phi, frozen, where the stage named one
    eval_ctx: EvalContext
    callbacks: list[TrainerCallback]  # the run directory's and the evaluator's: the trainer must call them

    @property
    def output_dir(self) -> Path:
        """Where Trainer writes its resume points (checkpoint-<step>/); the final policy goes beside them."""
        return self.run.path / "checkpoints"


@dataclass
class TrlStageResult:
    run_dir: Path
    steps: int  # optimiser steps taken
    train_seconds: float  # training wall-clock, evaluation excluded
    final_metrics: dict[str, float]  # the shared evaluator's metrics at the last step
    timings: dict[str, dict[str, float]]  # timings.json: seconds and peak memory per stage


def run_trl_stage(
    cfg: Config,
    prefs: PreferenceSet,
    seed: int,
    identity: tuple[str, dict],
    name: str,
    eval_every: int,
    build_trainer: Callable[[TrlStage], Trainer],
    reward_model_path: Path | None = None,
    implicit_beta: float | None = None,
    flops_per_token: Callable[[int, int], int] | None = None,
) -> TrlStageResult:
    """One run of a stage from pi_ref, into runs/<profile>/<method>/<run-id>/, `identity` being its run_identity:
    (method, the extra inputs its run is keyed by). With `cfg.resume`, an interrupted run with the same key goes on
    from its last resume point through Trainer's own `resume_from_checkpoint` (a stage that saves none starts again).

    The shared evaluator runs at step 0, every `eval_every` steps and at the end, scoring with r_phi where
    `reward_model_path` names one, and with `implicit_beta`, also DPO's implicit reward on the held-out pairs at the
    last point. `name` names the stage's steps in messages ("DPO step 3"). `flops_per_token(N of the policy, N of
    r_phi)`, for a method that samples, is its compute per token (else 6 N, a training pass's)."""
    set_seed(seed)  # first: LoRA adapters drawn below must not depend on the process
    policy, ref, tokenizer = load_policy_and_reference(reference_model(cfg), cfg.hub_access)
    policy = for_training(policy, cfg, "CAUSAL_LM", trainer_checkpointing=True)  # with LoRA, ref stays a full copy
    device = policy.device
    reward_model = (
        None
        if reward_model_path is None
        else freeze(load_scalar_model(str(reward_model_path), tokenizer.pad_token_id, cfg.model.attention)).to(device)
    )
    method, extra = identity
    run, resume_from = RunDir.open(cfg, method, seed, device, prefs.sha256, extra=extra)
    run.manifest["reference_model"] = ref.name_or_path
    with run.running():
        ctx = make_eval_context(cfg, prefs, ref, tokenizer, device)
        callback = EvalAndLogCallback(
            run,
            # the implicit reward's held-out pass (~20k tokens) only at the last point: the report reads it only there
            lambda model, step, final: evaluate(
                model,
                ctx,
                reward_model=reward_model,
                implicit_beta=implicit_beta if final else None,
                desc=f"eval step {step}",
            ),
            eval_every,
            device,
            pass_parameters(policy),
            resumed_clock(run, resume_from),
            name=f"{name} step",
            flops_per_token=None
            if flops_per_token is None
            else flops_per_token(pass_parameters(ref), pass_parameters(reward_model, "scalar")),
        )
        trainer = build_trainer(TrlStage(run, policy, ref, tokenizer, reward_model, ctx, [callback]))
        run.write_manifest()  # with what the trainer trains on, before a training that may be killed
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        check_replicas(policy, run.manifest)
        save_policy(policy, tokenizer, run, device)
    step, metrics = callback.last_eval
    return TrlStageResult(run.path, step, callback.train_seconds, metrics, run.timings)
