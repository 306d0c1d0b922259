"""What the stages trained with a TRL trainer (the reward model, DPO, Preferred-FT, the SFT stage, RLOO, online DPO)
share: the Trainer arguments that keep TRL's own files off disk, a progress bar, and the callback that writes the run
directory, runs the shared evaluator and commits resume points. Also what the console shows of the libraries
(`set_verbose`).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path
from collections.abc import Callable
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback
from transformers.utils import logging as hf_logging

from rlhf.atomic import read_jsonl
from rlhf.checkpoints import commit_checkpoint, prune_checkpoints
from rlhf.config import ModelConfig
from rlhf.distributed import is_main, stop_together, wait_for_everyone
from rlhf.errors import check_finite
from rlhf.evaluate import brief
from rlhf.flops import train_flops
from rlhf.models import save_model, trainer_precision_args
from rlhf.rundir import RunDir

# Left out of train rows: two copies of our `tokens` (the same count of non-padding tokens through the policy), and
# Trainer's speed figures, whose clock includes evaluation.
_UNLOGGED_KEYS = ("num_tokens", "num_input_tokens_seen", "train_runtime", "train_tokens_per_second")


def run_dir_args(
    model: ModelConfig, weight_decay: float, seed: int, device: torch.device, checkpoint_every: int | None = None
) -> dict[str, Any]:
    """TrainingArguments common to every TRL trainer here: `EvalAndLogCallback` writes the metrics into the run
    directory, and Trainer's checkpoints (every `checkpoint_every` steps, if set) are only our resume points;
    precision and gradient checkpointing as `model.*` says; AdamW's weight decay every stage's (`weight_decay`)."""
    return dict(
        logging_steps=1,
        report_to="none",
        eval_strategy="no",
        weight_decay=weight_decay,
        disable_tqdm=False,  # Trainer's own default turns the bar off (and prints log dicts) below warnings
        **trainer_precision_args(model.precision, device),
        # transformers' new name for gradient checkpointing (the old one warns that it is deprecated)
        activation_checkpointing=model.gradient_checkpointing,
        save_strategy="steps" if checkpoint_every else "no",
        save_steps=checkpoint_every or 500,
        logging_nan_inf_filter=False,  # a NaN loss must reach the log (and stop the run), not be smoothed over
        include_num_input_tokens_seen="non_padding",  # state.num_input_tokens_seen = our `tokens`
        dataloader_pin_memory=device.type == "cuda",
        # Trainer re-creates accelerate's process state: without use_cpu, processes on a machine without
        # CUDA would each train alone instead of forming one DDP group
        use_cpu=device.type == "cpu",
        seed=seed,
        data_seed=seed,
    )


_verbose = False  # `python -m pipelines --verbose`: the libraries' own output too (set_verbose)


def set_verbose(verbose: bool) -> None:
    """What the console shows of the libraries. By default not their chatter, which drowns the stage bars: a
    "Loading weights" bar for every model load and one for every dataset map, transformers' warnings, TRL's log
    dict at every step (the bar's postfix shows the key numbers instead), and the deprecation warning TRL's online
    trainers trigger in transformers at every run (`is_gradient_checkpointing`: TRL's to fix, not ours). `verbose`
    brings all of it back."""
    global _verbose
    _verbose = verbose
    warnings.filterwarnings(
        "default" if verbose else "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )
    hf_logging.set_verbosity(hf_logging.WARNING if verbose else hf_logging.ERROR)
    (hf_logging.enable_progress_bar if verbose else hf_logging.disable_progress_bar)()
    (datasets.enable_progress_bars if verbose else datasets.disable_progress_bars)()


class _ProgressBar(ProgressCallback):
    """Trainer's progress bar (with ETA), named after its stage, showing the loss (and the margin and accuracy:
    DPO's implicit reward's, or the reward model's; an online method's reward-model score) instead of printing every
    step's log dict."""

    SHOWN = {
        "loss": "loss",
        "rewards/margins": "margin",
        "margin": "margin",
        "rewards/accuracies": "acc",
        "accuracy": "acc",
        "reward": "score",
        "objective/scores": "score",
    }  # the last two: RLOO's, online DPO's

    def __init__(self, desc: str):
        super().__init__()
        self.desc = desc

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description(self.desc)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if _verbose:
            super().on_log(args, state, control, logs=logs, **kwargs)
        if self.training_bar is not None and "loss" in logs:
            self.training_bar.set_postfix({name: f"{logs[k]:.3f}" for k, name in self.SHOWN.items() if k in logs})


def quiet_progress_bar(trainer: Trainer, desc: str) -> Trainer:
    """The trainer with Trainer's progress bar swapped for `_ProgressBar` named `desc` (e.g. "DPO seed 0")."""
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_ProgressBar(desc))
    return trainer


class EvalAndLogCallback(TrainerCallback):
    """Writes every training step as a `train` row and runs the shared evaluator (an `eval` row and samples) at
    step 0, every `eval_every` steps and at the end; with `evaluate_policy` None, train rows only (the SFT stage,
    the reward model). `evaluate_policy(model, step, final)` is told whether the point is the run's last, so that a
    measurement the report reads only there (DPO's implicit reward on the held-out pairs) is made only there.

    The training clock (`wall_seconds`) runs only between evaluations, so eval time never counts as training;
    each stretch is also recorded as stage `stage` (`train`) in timings.json, each evaluation as stage `eval`. A
    resumed run starts the clock at `train_seconds` (`resumed_clock`), where its checkpoint left it. Every row carries
    `flops`, the training FLOPs so far: 6 · N · the non-padding tokens Trainer has fed the model (rlhf/flops.py),
    N = `n_params`, the trained model's `pass_parameters`; stage `stage` records them too, and stage `eval` the
    evaluator's own. An online method's tokens also go through sampling and scoring passes: `flops_per_token` then
    replaces 6 · N.

    Also: stops the run at a non-finite logged value, and commits each checkpoint Trainer saves (a sha256 record
    written last, so a half-written one is never resumed from) and deletes the older ones.
    """

    def __init__(
        self,
        run: RunDir,
        evaluate_policy: Callable[[PreTrainedModel, int, bool], tuple[dict, list]] | None,
        eval_every: int | None,
        device: torch.device,
        n_params: int,
        train_seconds: float = 0.0,
        name: str = "step",
        stage: str = "train",
        flops_per_token: int | None = None,
    ):
        self.run, self.evaluate_policy, self.eval_every, self.device = run, evaluate_policy, eval_every, device
        # n_params counted before Trainer wraps the model (sharded parameters would count short)
        self.flops_per_token = flops_per_token or train_flops(n_params, 1)
        self.name = name  # how a step is named in a divergence message, e.g. "DPO step"
        self.stage = stage  # the timings.json entry of the training stretches
        self.train_seconds = train_seconds  # closed stretches only; see `clock`
        self.last_eval: tuple[int, dict[str, float]] | None = None  # (step, metrics)
        self._stretch: contextlib.ExitStack | None = None
        self._stretch_start = 0.0
        self._timing: dict[str, float] = {}  # the training stage's timings.json entry

    def clock(self) -> float:
        """Training wall-clock seconds so far, evaluation excluded."""
        running = time.perf_counter() - self._stretch_start if self._stretch is not None else 0.0
        return self.train_seconds + running

    def _start_clock(self) -> None:
        self._stretch = contextlib.ExitStack()
        self._timing = self._stretch.enter_context(self.run.stage(self.stage, self.device))
        self._stretch_start = time.perf_counter()

    def _stop_clock(self) -> None:
        self.train_seconds = self.clock()
        self._stretch.close()
        self._stretch = None

    def _evaluate(self, model: PreTrainedModel, step: int, tokens: int, final: bool = False) -> None:
        metrics: dict[str, float] = {}
        with stop_together():  # once, on the main process: the others wait for it here, and stop with it
            if self.evaluate_policy is not None and is_main():
                with self.run.stage("eval", self.device) as timing:
                    metrics, samples = self.evaluate_policy(model, step, final)
                    timing["flops"] = timing.get("flops", 0) + metrics["eval/flops"]
                self.run.log(
                    {
                        "kind": "eval",
                        "step": step,
                        "wall_seconds": self.train_seconds,
                        "tokens": tokens,
                        "flops": self.flops_per_token * tokens,
                        **metrics,
                    }
                )
                self.run.write_samples(step, samples)
                tqdm.write(f"  step {step}: {brief(metrics)}")
        self.last_eval = (step, metrics)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:  # a resumed run has its earlier eval points already
            self._evaluate(model, state.global_step, state.num_input_tokens_seen)
        self._start_clock()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        final = state.global_step >= state.max_steps
        if final:
            control.should_save = False  # the last step: the run is about to complete, no resume point needed
        if self.eval_every and state.global_step % self.eval_every == 0:
            self._stop_clock()
            self._evaluate(model, state.global_step, state.num_input_tokens_seen, final)
            self._start_clock()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" not in logs:  # Trainer's end-of-training summary (its runtime includes evaluation): not a step
            return
        trl_logs = {k: v for k, v in logs.items() if k not in _UNLOGGED_KEYS}
        check_finite(f"{self.name} {state.global_step}", **{k: v for k, v in trl_logs.items() if isinstance(v, float)})
        flops = self.flops_per_token * state.num_input_tokens_seen
        self._timing["flops"] = flops
        self.run.log(
            {
                "kind": "train",
                "step": state.global_step,
                "wall_seconds": self.clock(),
                "tokens": state.num_input_tokens_seen,
                "flops": flops,
                **trl_logs,
            }
        )

    def on_save(self, args, state, control, **kwargs):
        wait_for_everyone()  # under DDP each process writes its own RNG state into the folder first
        if is_main():
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            commit_checkpoint(folder, state.global_step)
            prune_checkpoints(folder.parent, keep=folder)
        wait_for_everyone()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._stop_clock()
        if self.last_eval is None or self.last_eval[0] != state.global_step:
            self._evaluate(model, state.global_step, state.num_input_tokens_seen, final=True)


def resumed_clock(run: RunDir, resume_from: Path | None) -> float:
    """Where the training clock of a run opened with `RunDir.open` starts: 0 for a new run; for a resumed one, its last
    metrics row's `wall_seconds` (the rows after its checkpoint were dropped), so its clock reads as an uninterrupted
    run's. Trainer restores everything else from the checkpoint."""
    rows = read_jsonl(run.path / "metrics.jsonl")[0] if resume_from else []
    return rows[-1]["wall_seconds"] if rows else 0.0


def save_policy(policy: PreTrainedModel, tokenizer, run: RunDir, device: torch.device) -> Path:
    """Save the trained policy (and tokenizer) to the run's checkpoints/final/, once (the main process), as a plain
    Hugging Face folder (LoRA adapters merged); every process returns its path once it is on disk."""
    final = run.path / "checkpoints" / "final"
    if is_main():
        with run.stage("save", device):
            save_model(policy, tokenizer, final)
    wait_for_everyone()
    return final
