"""The optional SFT stage (`make sft`): supervised fine-tuning of the base model `model.name_or_path` into pi_ref,
with TRL's SFTTrainer, before anything else runs (the DPO paper's IMDb setup fine-tunes GPT-2 on reviews first).

    train_sft(cfg) -> SFTResult

Two sources of text (`sft_stage.source`):

* `corpus`: a text corpus (`sft_stage.path`, field `sft_stage.text_field`); the loss covers every token.
* `chosen`: the chosen responses of the task's own preference pairs (hh, preferences), with the prompt as context
  only. Tasks that sample their pairs from pi_ref have none yet: the config rejects `chosen` for them.

The model lands in runs/<profile>/sft/<run-id>/checkpoints/final, with the base model's tokenizer. Its manifest
records `sft_key` (base model settings, sft_stage settings, sha256 of the training texts): rlhf/reference.py
finds a completed run by that key and makes its model pi_ref for every stage.

`sft_trainer` is also the trainer of the Preferred-FT baseline (baselines/preferred_ft.py): the same SFTTrainer on
prompt / completion rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trl
from accelerate.utils import set_seed
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from rlhf.config import Config, ModelConfig, PreferredFTConfig, SFTStageConfig
from rlhf.distributed import per_process
from rlhf.flops import pass_parameters
from rlhf.keys import sft_key
from rlhf.models import default_device, for_training, load_causal_lm, load_tokenizer, resolve_model_path
from rlhf.reference import SFT_METHOD, sft_rows
from rlhf.rundir import RunDir
from rlhf.trl_callbacks import EvalAndLogCallback, quiet_progress_bar, run_dir_args, save_policy


@dataclass
class SFTResult:
    path: Path  # the fine-tuned model's folder: pi_ref of every later stage
    run_dir: Path
    steps: int  # optimiser steps taken


def sft_trainer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Dataset,
    settings: SFTStageConfig | PreferredFTConfig,
    epochs: int,
    max_steps: int | None,
    model_cfg: ModelConfig,
    weight_decay: float,
    seed: int,
    output_dir: Path,
    callbacks: list[TrainerCallback],
) -> trl.SFTTrainer:
    """TRL's SFTTrainer on `rows`: `text` rows train on every token; `prompt` / `completion` rows on the completion
    only (the prompt is context). EOS is appended to each text or completion, as TRL does. Constant learning rate;
    precision and gradient checkpointing as `model_cfg` says."""
    args = trl.SFTConfig(
        output_dir=str(output_dir),
        completion_only_loss="prompt" in rows.column_names,
        packing=False,  # one text (or prompt + completion) a row
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant",
        per_device_train_batch_size=per_process(
            settings.batch_size,
            "sft_stage.batch_size" if isinstance(settings, SFTStageConfig) else "preferred_ft.batch_size",
        ),
        num_train_epochs=epochs,
        max_steps=max_steps or -1,
        max_length=settings.max_length,
        **run_dir_args(model_cfg, weight_decay, seed, model.device),
    )
    stage = "SFT stage" if isinstance(settings, SFTStageConfig) else "Preferred-FT"
    return quiet_progress_bar(
        trl.SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer, callbacks=callbacks),
        f"{stage} seed {seed}",
    )


def train_sft(cfg: Config) -> SFTResult:
    """Fine-tune the base model on the configured texts into runs/<profile>/sft/<run-id>/checkpoints/final."""
    s = cfg.sft_stage
    set_seed(s.seed)  # first: a new scalar head or LoRA adapters drawn below must not depend on the process
    base = resolve_model_path(cfg.model, cfg.hub_access)
    tokenizer = load_tokenizer(base)
    rows = sft_rows(cfg, tokenizer)
    key = sft_key(cfg, rows)
    device = default_device()
    # no resume points: a killed run starts again from the start, in its own directory
    run, _ = RunDir.open(
        cfg,
        SFT_METHOD,
        s.seed,
        device,
        key["texts_sha256"],
        extra={"sft_key": key, "base_model_path": base, "texts": len(rows)},
        key="sft_key",
    )
    with run.running():
        model = for_training(
            load_causal_lm(base, cfg.model.attention).to(device), cfg, "CAUSAL_LM", trainer_checkpointing=True
        )
        # train rows only: pi_ref's own evaluation is `make reference`, once this model is pi_ref
        callback = EvalAndLogCallback(run, None, None, device, pass_parameters(model), name="SFT step")
        trainer = sft_trainer(
            model,
            tokenizer,
            rows,
            s,
            s.epochs,
            s.max_steps,
            cfg.model,
            cfg.weight_decay,
            s.seed,
            run.path / "checkpoints",
            [callback],
        )
        trainer.train()
        final = save_policy(model, tokenizer, run, device)
        run.manifest["sft_model_path"] = str(final)
    return SFTResult(final, run.path, trainer.state.global_step)
