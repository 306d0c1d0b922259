"""Shared fixtures: everything runs offline on the `tiny` profile (a random 2-layer Llama)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network

from rlhf.config import load_config  # noqa: E402
from rlhf.models import freeze, load_causal_lm, load_tokenizer, resolve_model_path  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def trl_as_the_cli_has_it():
    """Every test trains with TRL as `python -m pipelines` sets it up (rlhf/trl_compat.py), so that a stage called
    here computes what the CLI computes."""
    from rlhf import trl_compat

    trl_compat.install()


@pytest.fixture
def tiny_cfg(tmp_path):
    """The tiny profile, writing into a temporary runs directory."""
    return load_config("tiny", [f"runs_dir={tmp_path / 'runs'}"])


@pytest.fixture(scope="session")
def tiny_path():
    return resolve_model_path(load_config("tiny").model)


@pytest.fixture(scope="session")
def tokenizer(tiny_path):
    return load_tokenizer(tiny_path)


@pytest.fixture
def tiny_model(tiny_path):
    torch.manual_seed(0)
    return freeze(load_causal_lm(tiny_path))


@pytest.fixture
def power_cut(monkeypatch):
    """`power_cut(module, name, n)`: module.name raises RuntimeError("power cut") on its n-th call (a crash mid-run);
    returns the real function."""

    def cut(module, name: str, n: int):
        real, calls = getattr(module, name), []

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise RuntimeError("power cut")
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, failing)
        return real

    return cut
