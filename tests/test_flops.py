"""FLOPs (rlhf/flops.py): N of each pass counted by hand from the tiny model's config, and a PPO and a DPO run on the
tiny profile whose recorded FLOPs are the hand formula applied to their recorded token counts."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from transformers import LlamaConfig, LlamaForCausalLM

import rlhf.flops as F
from rlhf.atomic import read_jsonl
from rlhf.config import load_config
from rlhf.models import load_scalar_model


def hand_n(config, head: str) -> int:
    """N by hand: per layer q and o (hidden²), k and v (hidden × kv heads × head dim), the gated MLP's three
    matrices (hidden × intermediate), two RMSNorms; the final norm; the head. Embeddings left out."""
    h, head_dim = config.hidden_size, config.hidden_size // config.num_attention_heads
    layer = 2 * h * h + 2 * h * config.num_key_value_heads * head_dim + 3 * h * config.intermediate_size + 2 * h
    return config.num_hidden_layers * layer + h + h * (config.vocab_size if head == "lm" else 1)


def test_hand_count_of_the_tiny_model():
    # tiny: 2 layers, hidden 64, 4 heads of 16 (as many kv heads), intermediate 128, SmolLM2's 49152-token vocabulary
    # per layer 4·64² + 3·64·128 + 2·64 = 16384 + 24576 + 128 = 41088; 2 layers + final norm = 82240
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    assert hand_n(config, "scalar") == 82240 + 64
    assert hand_n(config, "lm") == 82240 + 49152 * 64 == 3_227_968


def assert_pass_parameters(pass_parameters, lm, scalar) -> None:
    assert pass_parameters(lm) == hand_n(lm.config, "lm")
    assert pass_parameters(scalar, "scalar") == hand_n(scalar.config, "scalar")


def test_pass_parameters_by_hand(tiny_model, tiny_path, tokenizer):
    assert tiny_model.config.tie_word_embeddings  # the LM head is the embedding matrix, and still counted
    scalar = load_scalar_model(tiny_path, tokenizer.pad_token_id)
    assert_pass_parameters(F.pass_parameters, tiny_model, scalar)
    untied = LlamaForCausalLM(LlamaConfig(**{**tiny_model.config.to_dict(), "tie_word_embeddings": False}))
    assert F.pass_parameters(untied) == F.pass_parameters(tiny_model)  # one head matmul, tied or not

    def head_left_out(model, head="lm"):  # a broken variant: the backbone alone
        backbone = model.model
        return sum(p.numel() for p in backbone.parameters()) - backbone.embed_tokens.weight.numel()

    with pytest.raises(AssertionError):
        assert_pass_parameters(head_left_out, tiny_model, scalar)
    with pytest.raises(ValueError, match="head"):
        F.pass_parameters(tiny_model, "value")


def test_forward_and_train_flops_by_hand():
    assert F.forward_flops(3_227_968, 10) == 64_559_360  # 2 · N · tokens
    assert F.train_flops(3_227_968, 10) == 193_678_080  # 6 · N · tokens: the backward pass is twice the forward
    assert F.train_flops(7, 0) == 0


# --- the stages on the tiny profile --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """`make ppo` then `make dpo` on the tiny profile (one reward model, one PPO and one DPO run), in-process."""
    from pipelines.dpo_pipeline import main as dpo_main
    from pipelines.ppo_pipeline import main as ppo_main

    cfg = load_config("tiny", [f"runs_dir={tmp_path_factory.mktemp('runs')}"])
    assert ppo_main(cfg) == 0 and dpo_main(cfg) == 0
    return cfg, Path(cfg.runs_dir) / "tiny"


def _run(profile: Path, method: str) -> tuple[list[dict], list[dict], dict]:
    (run,) = (profile / method).iterdir()
    rows, bad = read_jsonl(run / "metrics.jsonl")
    assert not bad
    return (
        [r for r in rows if r["kind"] == "train"],
        [r for r in rows if r["kind"] == "eval"],
        json.loads((run / "timings.json").read_text()),
    )


@pytest.fixture(scope="module")
def n(tiny_runs):
    """N of the tiny model's passes, by hand."""
    from rlhf.models import load_causal_lm, resolve_model_path

    config = load_causal_lm(resolve_model_path(tiny_runs[0].model)).config
    return {"lm": hand_n(config, "lm"), "scalar": hand_n(config, "scalar")}


def test_reward_model_flops_are_6_n_scalar_per_token(tiny_runs, n):
    train, (ev,), timings = _run(tiny_runs[1], "reward_model")
    assert train and all(r["flops"] == 6 * n["scalar"] * r["tokens"] for r in train)
    assert timings["reward_model"]["flops"] == train[-1]["flops"] == ev["flops"]
    # its centring and held-out passes are forward passes, counted apart from training
    assert timings["reward_shift"]["flops"] > 0 and timings["eval"]["flops"] == ev["eval/flops"] > 0
    assert ev["eval/flops"] % (2 * n["scalar"]) == 0  # the held-out pairs through r_phi: 2 · N · their tokens


def test_ppo_flops_are_the_hand_formula_of_its_token_counts(tiny_runs, n):
    cfg, profile = tiny_runs
    train, evals, timings = _run(profile, "ppo")
    epochs, previous = cfg.ppo.ppo_epochs, {"tokens": 0, "flops": 0}
    for row in train:
        tokens = row["tokens"] - previous["tokens"]  # this iteration's real tokens, prompt and response
        assert row["tokens/scoring"] == 4 * tokens
        assert row["flops/rollout"] == 2 * n["lm"] * tokens
        assert row["flops/scoring"] == 2 * (2 * n["lm"] + 2 * n["scalar"]) * tokens  # pi_old, pi_ref, V, r_phi
        assert row["flops/update"] == epochs * 6 * (n["lm"] + n["scalar"]) * tokens  # policy and V, every epoch
        assert row["flops"] - previous["flops"] == row["flops/rollout"] + row["flops/scoring"] + row["flops/update"]
        previous = row
    at_step = {r["step"]: r["flops"] for r in train} | {0: 0}
    assert all(e["flops"] == at_step[e["step"]] for e in evals)  # eval rows: training FLOPs so far
    assert timings["train"]["flops"] == train[-1]["flops"]
    assert timings["eval"]["flops"] == sum(e["eval/flops"] for e in evals) > 0  # evaluation, apart


def test_dpo_flops_are_the_hand_formula_of_its_token_counts(tiny_runs, n):
    train, evals, timings = _run(tiny_runs[1], "dpo")
    assert all(r["flops"] == 6 * n["lm"] * r["tokens"] for r in train + evals)
    assert timings["train"]["flops"] == train[-1]["flops"]
    # pi_ref's pass reads every pair's chosen and rejected rows once: one epoch's training tokens, forward only
    assert timings["ref_logps"]["tokens"] == train[-1]["tokens"]
    assert timings["ref_logps"]["flops"] == 2 * n["lm"] * timings["ref_logps"]["tokens"]
    assert timings["eval"]["flops"] == sum(e["eval/flops"] for e in evals) > 0


def test_report_cost_tables_carry_flops_per_stage_and_method(tiny_runs, tmp_path):
    from analysis.report import main as report_main

    cfg, profile = tiny_runs
    cfg = load_config("tiny", [f"runs_dir={cfg.runs_dir}", f"report.out_dir={tmp_path}"])
    assert report_main(cfg) == 0
    cost = pd.read_csv(tmp_path / "tiny" / "cost.csv").set_index(["method", "stage"])
    _, _, rm = _run(profile, "reward_model")
    _, _, dpo = _run(profile, "dpo")
    assert cost.loc[("reward_model", "reward_model"), "flops"] == rm["reward_model"]["flops"]
    assert cost.loc[("dpo", "ref_logps"), "flops"] == dpo["ref_logps"]["flops"]
    per_method = pd.read_csv(tmp_path / "tiny" / "cost_per_method.csv").set_index("method")
    ppo_train = _run(profile, "ppo")[0]
    assert per_method.loc["ppo", "earlier stages FLOPs"] == rm["reward_model"]["flops"]
    assert per_method.loc["ppo", "training FLOPs"] == ppo_train[-1]["flops"] + rm["reward_model"]["flops"]
    assert per_method.loc["dpo", "training FLOPs"] == dpo["train"]["flops"] + dpo["ref_logps"]["flops"]
