"""What the online methods trained with a TRL trainer share (RLOO, online DPO; docs/online.md): both sample from the
current policy during training, score the samples with PPO's reward model r_phi (never the gold reward), and run
through the driver of the TRL stages (rlhf/trl_stage.py), like DPO.

    run_online(cfg, prefs, seed, reward_model_path, method, ...) -> TrlStageResult

`reward_function` wraps a reward of `SequenceBatch`es (r_phi's `reward_scores`, or a test's known reward) in the
signature TRL's trainers call, so the samples are scored on the very tokens the policy produced, EOS read where the
reward model was trained to read it, and with its shift (TRL's own reward-model path would re-tokenise the decoded
text and read the last token, not the EOS). FLOPs are counted per token of prompt + response through every pass a
sample takes (sampling, scoring, training): the method's `flops_per_token`.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Callable

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainerState

from rlhf.config import Config
from rlhf.data import PreferenceSet
from rlhf.distributed import num_processes, sum_over_processes
from rlhf.models import autocast
from rlhf.rundir import manifest_of_model
from rlhf.sequences import SequenceBatch, pad_sequences, reward_scores
from rlhf.tasks import load_task
from rlhf.trl_stage import TrlStage, TrlStageResult, run_trl_stage

# TRL's signature of a reward function: (prompts, completions, completion_ids, trainer_state, **columns) -> one float
# per completion
RewardFunction = Callable[..., list[float]]
# (config, policy, tokenizer, prompts, reward function, seed, output dir, callbacks) -> the method's TRL trainer
BuildTrainer = Callable[
    [Config, PreTrainedModel, PreTrainedTokenizerBase, Dataset, RewardFunction, int, Path, list[TrainerCallback]],
    Trainer,
]


def until_eos(ids: list[int], eos_token_id: int) -> list[int]:
    """A completion's tokens up to and including its first EOS (TRL's online DPO pads its rows after it; RLOO's end
    there). One without EOS was cut by the length cap and is kept whole."""
    return ids[: ids.index(eos_token_id) + 1] if eos_token_id in ids else ids


def reward_function(
    reward: Callable[[SequenceBatch], torch.Tensor],
    tokenizer: PreTrainedTokenizerBase,
    add_special_tokens: bool,
    counts_tokens: bool = False,
) -> RewardFunction:
    """`reward` (r(x, y) of a batch, [B]) as a TRL reward function. TRL hands over the prompts as text and the
    completions as token ids; the prompts are tokenised as the trainer tokenised them for sampling
    (`add_special_tokens`: RLOOTrainer adds the tokenizer's special tokens, OnlineDPOTrainer does not).

    `counts_tokens`, for a trainer that does not count what it samples (OnlineDPOTrainer; RLOOTrainer does): every
    call adds the prompt + response tokens it scored, every process's, to the `trainer_state` TRL hands a reward
    function, as Trainer's `num_input_tokens_seen`: the `tokens` of every row, and what FLOPs are counted from.
    Scored here means sampled: the trainer scores each sample once."""

    def reward_model(
        prompts: list[str], completion_ids: list[list[int]], trainer_state: TrainerState | None = None, **_
    ) -> list[float]:
        prompt_rows = tokenizer(prompts, add_special_tokens=add_special_tokens).input_ids
        responses = [until_eos(list(ids), tokenizer.eos_token_id) for ids in completion_ids]
        if counts_tokens:
            trainer_state.num_input_tokens_seen += sum_over_processes(sum(map(len, prompt_rows + responses)))
        with torch.inference_mode():
            return reward(pad_sequences(prompt_rows, responses, tokenizer.pad_token_id)).tolist()

    return reward_model  # TRL logs its mean as `rewards/reward_model/mean`


def run_identity(method: str, reward_model_path: Path) -> tuple[str, dict]:
    """The method and the extra inputs an online run's directory is keyed by (rlhf.rundir.run_key): the same for the
    run and for the pipeline asking whether it is done already."""
    return method, {"reward_model_path": str(reward_model_path), "num_processes": num_processes()}


def run_online(
    cfg: Config,
    prefs: PreferenceSet,
    seed: int,
    reward_model_path: Path,
    method: str,
    name: str,
    eval_every: int,
    build_trainer: BuildTrainer,
    flops_per_token: Callable[[int, int], int],
    add_special_tokens: bool,
    counts_tokens: bool = False,
    implicit_beta: float | None = None,
) -> TrlStageResult:
    """One run of an online method from pi_ref on the task's training prompts, against the reward model at
    `reward_model_path` (PPO's for this seed), into runs/<profile>/<method>/<run-id>/, through the driver of every
    TRL stage (rlhf/trl_stage.py: evaluation, resume, the final save). The shared evaluator runs at step 0, every
    `eval_every` steps and at the end (with `implicit_beta`, also DPO's implicit reward on the held-out pairs, at the
    last point); `flops_per_token(N of the policy, N of the reward model)` is the method's compute per sampled token;
    `add_special_tokens` and `counts_tokens` say how its trainer samples (`reward_function`)."""

    def build(stage: TrlStage) -> Trainer:
        run, device, tokenizer = stage.run, stage.policy.device, stage.tokenizer
        # The data budget is the reward model's: the pairs and passes it trained on (as PPO's)
        run.manifest["budget"] = manifest_of_model(reward_model_path).get("budget")
        run.manifest["kl_control"] = {"adaptive": False, "rollout_temperature": 1.0}  # beta means DPO's (sampling at 1)

        def r_phi(batch: SequenceBatch) -> torch.Tensor:
            with autocast(cfg.model.precision, device):
                return reward_scores(stage.reward_model, batch.to(device), tokenizer)

        prompts = Dataset.from_dict({"prompt": load_task(cfg.task, tokenizer, cfg.hub_access).train_prompts})
        reward = reward_function(r_phi, tokenizer, add_special_tokens, counts_tokens)
        return build_trainer(cfg, stage.policy, tokenizer, prompts, reward, seed, stage.output_dir, stage.callbacks)

    return run_trl_stage(
        cfg,
        prefs,
        seed,
        run_identity(method, reward_model_path),
        name,
        eval_every,
        build,
        reward_model_path=reward_model_path,
        implicit_beta=implicit_beta,
        flops_per_token=flops_per_token,
    )
