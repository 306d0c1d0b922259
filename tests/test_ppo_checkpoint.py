"""PPO's resume points (ppo/checkpoint.py) on a learner small enough to train in a test: what accelerate's save_state
writes is all the loop needs to go on with the numbers of a run that never stopped."""

from __future__ import annotations

import random
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from torch import nn

from ppo import checkpoint
from ppo.train import Learner, make_optimizer, optimizer_step
from rlhf.config import load_config
from rlhf.errors import UserError
from rlhf.models import load_causal_lm

ITERATIONS = 6  # the schedule anneals the learning rate to 0 over these


class Run:
    """A policy with a tied LM head (the tiny model's, as SmolLM2's), a value model, fused AdamW with the annealed
    schedule, and a loss scaler whose scale changes every step, as train_ppo prepares and registers them. Under
    `accelerate launch` as well (tests/test_distributed.py)."""

    def __init__(self, tiny_path, seed: int):
        self.accelerator = Accelerator(cpu=True)
        seed += 1000 * self.accelerator.process_index  # under DDP, a process restoring another's RNG would show
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        policy, value_model = load_causal_lm(tiny_path), nn.Linear(4, 1)
        pc = load_config("tiny", [f"ppo.iterations={ITERATIONS}", "ppo.learning_rate=1e-3"]).ppo
        optimizer, self.scheduler = make_optimizer(policy, value_model, pc, weight_decay=0.01)
        policy, value_model, optimizer = self.accelerator.prepare(policy, value_model, optimizer)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)  # doubles at each clean step
        checkpoint.track(self.accelerator, self.scheduler, scaler)
        self.learner = Learner(
            policy, value_model, None, None, None, self.accelerator, optimizer, scaler, amp=nullcontext
        )

    def iteration(self) -> list[float]:
        """One step drawing from every generator the loop draws from: torch (sampling, minibatch order), python
        and numpy."""
        ids = torch.randint(3, 100, (2, 6))
        weight = 1 + random.random() + float(np.random.rand())
        loss = (
            self.learner.policy(input_ids=ids).logits.float().pow(2).mean() * weight
            + self.learner.value_model(torch.randn(3, 4)).pow(2).mean()
        )
        optimizer_step(self.learner, loss, max_grad_norm=1.0, where="test")
        self.scheduler.step()
        return [loss.item(), self.scheduler.get_last_lr()[0], self.learner.scaler.get_scale()]

    def weights(self) -> dict[str, torch.Tensor]:
        return {**self.learner.policy.state_dict(), **self.learner.value_model.state_dict()}


@pytest.fixture
def interrupted(tiny_path, tmp_path):
    """A run checkpointed after 2 iterations, and the numbers and weights it ends with after 2 more."""
    whole = Run(tiny_path, seed=0)
    for _ in range(2):
        whole.iteration()
    folder = checkpoint.save(tmp_path, 2, whole.accelerator, {"tokens": 7})
    numbers = [whole.iteration() for _ in range(2)]
    return folder, numbers, whole.weights()


def test_a_run_restored_from_its_resume_point_goes_on_with_the_uninterrupted_numbers(interrupted, tiny_path):
    folder, numbers, weights = interrupted
    assert sorted(p.name for p in folder.iterdir()) == [
        "checkpoint.json",
        "custom_checkpoint_0.pkl",
        "custom_checkpoint_1.pkl",
        "optimizer.bin",
        "progress.json",
        "pytorch_model.bin",
        "pytorch_model_1.bin",
        "random_states_0.pkl",
    ]

    resumed = Run(tiny_path, seed=1)  # other weights and generators: only the checkpoint can make it match
    assert checkpoint.restore(folder, resumed.accelerator) == {"iteration": 2, "tokens": 7}
    policy = resumed.learner.policy
    assert policy.lm_head.weight is policy.model.embed_tokens.weight  # loaded into, not replaced: still tied
    assert [resumed.iteration() for _ in range(2)] == numbers
    assert all(torch.equal(weights[k], v) for k, v in resumed.weights().items())


def test_a_random_state_accelerate_failed_to_restore_is_an_error(interrupted, tiny_path, monkeypatch):
    """load_state swallows that failure; the resumed run would quietly draw other numbers."""
    folder, _, _ = interrupted
    resumed = Run(tiny_path, seed=1)
    monkeypatch.setattr(torch, "set_rng_state", lambda state: None)
    with pytest.raises(
        UserError,
        match=rf"^checkpoint {folder}: accelerate could not restore the random state saved "
        r"in random_states_0\.pkl",
    ):
        checkpoint.restore(folder, resumed.accelerator)


def test_a_resume_point_in_the_format_before_accelerate_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    for name in ("state.pt", "rng_0.pt", "progress.json"):
        (folder / name).write_bytes(b"")
    with pytest.raises(
        UserError,
        match=rf"^checkpoint {folder} is in the format PPO wrote before its resume points "
        "went through accelerate's save_state, which this version does not read; "
        "delete that folder to run this run again from its start",
    ):
        checkpoint.restore(folder, Accelerator(cpu=True))
