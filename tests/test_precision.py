"""Precision and memory options (docs/precision-and-memory.md): fp16 with loss scaling, the `auto` and TF32 decisions,
gradient checkpointing and LoRA, on the tiny profile on a CPU."""

import dataclasses
import math

import pytest
import torch
from transformers import LlamaConfig

from ppo.train import TokenValueModel, train_ppo
from reward_model.train import train_reward_model
from rlhf.atomic import read_jsonl
from rlhf.config import Config, load_config
from rlhf.data import budget_pairs, build_preferences
from rlhf.errors import UserError
from rlhf.keys import preference_set_key, reward_model_key
from rlhf.models import (
    choose_precision,
    cuda_native_bf16,
    for_training,
    freeze,
    grad_scaler,
    load_causal_lm,
    load_scalar_model,
    resolve_precision,
    save_model,
    set_tf32,
    trainer_precision_args,
)
from rlhf.sequences import encode_completions, response_logprobs

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_prefs(tmp_path_factory):
    """One tiny preference set for the module's training runs."""
    cfg = load_config("tiny", [f"runs_dir={tmp_path_factory.mktemp('runs')}"])
    return cfg, build_preferences(cfg)


def with_overrides(cfg: Config, **sections: dict) -> Config:
    return dataclasses.replace(
        cfg, **{name: dataclasses.replace(getattr(cfg, name), **values) for name, values in sections.items()}
    )


# ---- decisions: `auto`, TF32, what the trainers are told ----------------------------------------------------------


def test_auto_precision_picks_bf16_where_native_else_fp16_on_gpu_and_fp32_on_cpu():
    assert [cuda_native_bf16(c) for c in [(7, 0), (7, 5), (8, 0), (8, 9), (9, 0)]] == [False, False, True, True, True]
    assert choose_precision("auto", "cuda", native_bf16=True) == "bf16"  # A100, H100
    assert choose_precision("auto", "cuda", native_bf16=False) == "fp16"  # V100, T4
    assert choose_precision("auto", "cpu", native_bf16=True) == "bf16"  # avx512_bf16 / AMX
    assert choose_precision("auto", "cpu", native_bf16=False) == "fp32"
    for explicit in ("fp32", "bf16", "fp16"):
        assert choose_precision(explicit, "cuda", native_bf16=False) == explicit


def test_trainers_and_scaler_follow_the_resolved_precision(monkeypatch):
    monkeypatch.setattr("rlhf.models.cpu_supports_fast_bf16", lambda: False)
    assert resolve_precision("auto", CPU) == "fp32"
    assert trainer_precision_args("auto", CPU) == {"bf16": False, "fp16": False}
    assert trainer_precision_args("fp16", CPU) == {"bf16": False, "fp16": True}
    assert trainer_precision_args("bf16", CPU) == {"bf16": True, "fp16": False}
    assert grad_scaler("fp16", CPU).is_enabled() and not grad_scaler("bf16", CPU).is_enabled()
    assert not grad_scaler("auto", CPU).is_enabled()


def test_tf32_switches_the_cuda_matmul_and_cudnn_flags():
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        set_tf32(True)
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("tf32",) * 2
        set_tf32(False)
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("ieee",) * 2
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.precision=fp8", "model.precision"),
        ("lora.r=0", "lora.r"),
        ("lora.alpha=0", "lora.alpha"),
        ("lora.dropout=0.1", "lora.dropout"),
        ("lora.rank=8", "lora.rank"),
        ("model.tf32=fast", "model.tf32"),
    ],
)
def test_bad_precision_and_lora_values_are_config_errors(override, key):
    with pytest.raises(UserError, match=f"config key '{key}'"):
        load_config("tiny", [override])


def test_the_old_dpo_checkpointing_key_points_to_the_new_one():
    with pytest.raises(UserError, match="'dpo.gradient_checkpointing'.*it is now 'model.gradient_checkpointing'"):
        load_config("tiny", ["dpo.gradient_checkpointing=true"])


def test_unknown_lora_target_module_names_the_key(tiny_path):
    cfg = load_config("tiny", ["lora.enabled=true", "lora.target_modules=[qkv_proj]"])
    with pytest.raises(UserError, match="'lora.target_modules'.*qkv_proj"):
        for_training(load_causal_lm(tiny_path), cfg, "CAUSAL_LM")


def test_training_only_keys_keep_the_preference_set_and_eval_cache():
    a, b = load_config("tiny"), load_config("tiny", ["model.gradient_checkpointing=true"])
    assert preference_set_key(a) == preference_set_key(b)
    c = load_config("tiny", ["model.tf32=true"])  # TF32 changes the numbers on a GPU
    assert preference_set_key(a) != preference_set_key(c)


# ---- LoRA -----------------------------------------------------------------------------------------------------------


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_lora_trainable_parameters_are_what_r_and_the_targets_imply(tiny_path, tokenizer):
    """Tiny Llama: hidden 64, MLP 128, 2 layers, as many KV heads as heads. An adapter on a d_in x d_out layer has
    r (d_in + d_out) parameters."""
    c = LlamaConfig.from_pretrained(tiny_path)
    h, m, layers, r = c.hidden_size, c.intermediate_size, c.num_hidden_layers, 4
    assert (h, m, layers, c.num_key_value_heads) == (64, 128, 2, c.num_attention_heads)
    cfg = load_config("tiny", ["lora.enabled=true", f"lora.r={r}", "lora.target_modules=[q_proj, v_proj]"])
    assert _trainable(for_training(load_causal_lm(tiny_path), cfg, "CAUSAL_LM")) == layers * 2 * r * (h + h) == 2048
    # the value / reward model: the same adapters plus the full scalar head (h weights, no bias)
    scalar = for_training(load_scalar_model(tiny_path, tokenizer.pad_token_id), cfg, "SEQ_CLS")
    assert _trainable(scalar) == 2048 + h
    # [] = peft's default for Llama (q_proj, v_proj); all-linear: q, k, v, o (h x h), gate, up (h x m), down (m x h)
    cfg = with_overrides(cfg, lora={"target_modules": []})
    assert _trainable(for_training(load_causal_lm(tiny_path), cfg, "CAUSAL_LM")) == 2048
    cfg = with_overrides(cfg, lora={"target_modules": ["all-linear"]})
    assert (
        _trainable(for_training(load_causal_lm(tiny_path), cfg, "CAUSAL_LM"))
        == layers * r * (4 * (h + h) + 3 * (h + m))
        == 8704
    )


def _split(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """A peft model's state dict -> (base weights under the plain model's names, adapter and head copies)."""
    base, adapter = {}, {}
    for key, value in state.items():
        if "lora_" in key or "modules_to_save" in key:
            adapter[key] = value
        else:
            base[key.replace("base_model.model.", "").replace(".base_layer", "").replace(".original_module", "")] = (
                value
            )
    return base, adapter


def _assert_only_adapters_moved(before: dict, after: dict, plain: dict) -> None:
    base_before, adapter_before = _split(before)
    base_after, adapter_after = _split(after)
    assert base_before.keys() == plain.keys() and adapter_before  # every plain weight is there, once
    assert all(torch.equal(base_after[k], plain[k]) for k in plain), "LoRA training changed a base weight"
    moved = [k for k in adapter_before if not torch.equal(adapter_before[k], adapter_after[k])]
    assert any("lora_A" in k for k in moved) and any("lora_B" in k for k in moved)


def test_ppo_with_lora_and_checkpointing_trains_only_adapters_and_saves_a_plain_merged_policy(
    tiny_prefs, tiny_path, tokenizer, monkeypatch
):
    cfg, prefs = tiny_prefs
    cfg = with_overrides(
        cfg,
        lora={"enabled": True, "r": 4},
        model={"gradient_checkpointing": True},
        ppo={"reward": "gold", "iterations": 2, "eval_every": 2, "learning_rate": 1e-3},
    )
    trained, saved = [], {}

    def spy_for_training(model, *args):
        out = for_training(model, *args)
        trained.append((out, {k: v.clone() for k, v in out.state_dict().items()}))
        return out

    def spy_save(model, tok, folder):  # the policy as trained, before save_model merges the adapters into it
        saved.update({k: v.clone() for k, v in model.state_dict().items()})
        save_model(model, tok, folder)

    monkeypatch.setattr("ppo.train.for_training", spy_for_training)
    monkeypatch.setattr("ppo.train.save_model", spy_save)
    result = train_ppo(cfg, prefs, None, seed=0)
    (policy, policy_before), (value, value_before) = trained
    assert policy.is_activation_checkpointing and value.is_activation_checkpointing
    _assert_only_adapters_moved(policy_before, saved, load_causal_lm(tiny_path).state_dict())
    plain_value = load_scalar_model(tiny_path, tokenizer.pad_token_id).state_dict()
    plain_value["score.weight"] = torch.zeros_like(plain_value["score.weight"])  # PPO-GT zeroes the fresh head
    _assert_only_adapters_moved(value_before, value.state_dict(), plain_value)
    assert any("score.modules_to_save" in k for k in _split(value_before)[1])  # the value head trains in full
    # the saved policy is a plain model: pi_ref + (alpha/r) B A on q and v, every other weight pi_ref's own
    final, ref = load_causal_lm(str(result.policy_path)).state_dict(), load_causal_lm(tiny_path).state_dict()
    assert final.keys() == ref.keys()
    q, mlp = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"
    scale = cfg.lora.alpha / cfg.lora.r
    lora_q = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.default.weight"
    torch.testing.assert_close(final[q], ref[q] + scale * saved[lora_q.format("B")] @ saved[lora_q.format("A")])
    assert not torch.equal(final[q], ref[q]) and torch.equal(final[mlp], ref[mlp])


def test_dpo_step_with_lora_trains_only_adapters_against_a_full_frozen_reference(
    tiny_prefs, tiny_path, tokenizer, tmp_path
):
    from dpo.trainer import build_trainer

    cfg, prefs = tiny_prefs
    cfg = with_overrides(cfg, lora={"enabled": True, "r": 4}, budget={"pairs": 8}, dpo={"batch_size": 4})
    policy = for_training(load_causal_lm(tiny_path), cfg, "CAUSAL_LM", trainer_checkpointing=True)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    ref = freeze(load_causal_lm(tiny_path))
    trainer = build_trainer(
        cfg, policy, ref, tokenizer, budget_pairs(cfg, prefs), seed=0, output_dir=tmp_path, callbacks=[]
    )
    assert trainer.ref_model is ref  # pi_ref: the full frozen copy, not the adapter-disabled policy
    trainer.train()
    assert trainer.state.global_step == 2  # lora_B starts at 0, so lora_A first moves in the second step
    _assert_only_adapters_moved(before, policy.state_dict(), ref.state_dict())


def test_reward_model_with_lora_is_saved_plain_under_its_own_key(tiny_prefs, tiny_path, tokenizer):
    cfg, prefs = tiny_prefs
    full = reward_model_key(cfg, prefs.sha256, 0)
    assert full["lora"]["enabled"] is False  # version 3 of the key reads the LoRA section whether on or off
    cfg = with_overrides(
        cfg,
        lora={"enabled": True, "r": 4},
        model={"gradient_checkpointing": True},
        reward_model={"learning_rate": 1e-3},
    )
    assert reward_model_key(cfg, prefs.sha256, 0)["lora"]["r"] == 4
    result = train_reward_model(cfg, prefs, seed=0)
    saved, fresh = (load_scalar_model(str(p), tokenizer.pad_token_id).state_dict() for p in (result.path, tiny_path))
    assert saved.keys() == fresh.keys()  # a plain sequence classifier, adapters merged
    q, mlp = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(saved[q], fresh[q]) and torch.equal(saved[mlp], fresh[mlp])


# ---- gradient checkpointing ---------------------------------------------------------------------------------------


def _calls(module: torch.nn.Module) -> list[int]:
    """Counts the module's calls, a replay in the backward pass included (a pre-hook: the replay stops as soon as
    it has recomputed what the backward needs, before the module's output hooks would run)."""
    calls = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def _loss_and_grads(model: torch.nn.Module, loss_fn, layer: torch.nn.Module) -> tuple[float, dict, int]:
    calls = _calls(layer)
    model.train()
    loss = loss_fn(model)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, len(calls)


@pytest.mark.parametrize("kind", ["policy", "value"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_path, tokenizer, kind):
    batch = encode_completions(tokenizer, ["a review:", "the film was"], [" quite good, really", " long"])
    plain, checkpointed = load_config("tiny"), load_config("tiny", ["model.gradient_checkpointing=true"])
    results = []
    for cfg in (plain, checkpointed):
        torch.manual_seed(0)  # a fresh value head is random: the same one for both
        if kind == "policy":
            model = for_training(load_causal_lm(tiny_path), cfg, "CAUSAL_LM")
            layer = model.model.layers[0].mlp  # inside the checkpointed forward
            loss_fn = lambda m: -(response_logprobs(m, batch)[0] * batch.response_mask).sum()  # noqa: E731
        else:
            model = TokenValueModel(for_training(load_scalar_model(tiny_path, tokenizer.pad_token_id), cfg, "SEQ_CLS"))
            layer = model.scalar_model.model.layers[0].mlp
            loss_fn = lambda m: (m(batch) - 1.0).pow(2).sum()  # noqa: E731
        results.append(_loss_and_grads(model, loss_fn, layer))
    (loss, grads, calls), (loss_ck, grads_ck, calls_ck) = results
    assert (calls, calls_ck) == (1, 2)  # checkpointing is on: the layer ran again in the backward pass
    assert math.isclose(loss, loss_ck, rel_tol=1e-6)
    assert grads.keys() == grads_ck.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads_ck[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


# ---- fp16 ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init_scale", [None, 2.0**40])
def test_ppo_in_fp16_scales_the_loss_and_skips_overflowing_steps(tiny_prefs, monkeypatch, init_scale):
    """With GradScaler's initial scale (65536) the tiny model never overflows; started at 2^40 every scaled fp16
    gradient is inf: those steps must be skipped (no divergence error, no gradient norm logged, the scale halved
    each time) until the scale fits."""
    assert torch.autocast("cpu", dtype=torch.float16).fast_dtype == torch.float16  # CPU fp16 autocast (torch >= 2.3)
    if init_scale:
        monkeypatch.setattr("ppo.train.grad_scaler", lambda *_: torch.amp.GradScaler("cpu", init_scale=init_scale))
    cfg, prefs = tiny_prefs
    cfg = with_overrides(cfg, model={"precision": "fp16"}, ppo={"reward": "gold", "iterations": 2, "eval_every": 2})
    result = train_ppo(cfg, prefs, None, seed=0)
    rows, bad = read_jsonl(result.run_dir / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    assert not bad and len(train) == 2 and math.isfinite(result.final_metrics["eval/kl"])
    for row in train:
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float))
    scales, skips = [r["amp/loss_scale"] for r in train], [r["amp/skip_rate"] for r in train]
    minibatches = cfg.ppo.rollout_batch_size // cfg.ppo.mini_batch_size
    if init_scale is None:
        assert scales == [2.0**16] * 2 and skips == [0.0, 0.0] and all("grad_norm" in r for r in train)
    else:  # every step of iteration 1 overflowed: the scale halved once per minibatch, no norm to log
        assert skips[0] == 1.0 and "grad_norm" not in train[0]
        assert scales[0] == init_scale / 2**minibatches and scales[1] <= scales[0]


def test_fp16_lora_ppo_resumes_with_its_loss_scale_and_adapters(tiny_prefs, tmp_path, monkeypatch, power_cut):
    """A run cut at iteration 3 resumes from its checkpoint at 2 and ends as an uninterrupted one: the scaler's
    state (here a scale that overflow has halved) and the adapters are part of the resume point."""
    import ppo.train

    init_scale = 2.0**20  # the tiny model's first step overflows at this scale, the second does not
    monkeypatch.setattr(ppo.train, "grad_scaler", lambda *_: torch.amp.GradScaler("cpu", init_scale=init_scale))
    cfg, prefs = tiny_prefs
    cfg = with_overrides(
        cfg,
        model={"precision": "fp16"},
        lora={"enabled": True, "r": 4},
        ppo={"reward": "gold", "iterations": 3, "eval_every": 3, "checkpoint_every": 2, "learning_rate": 1e-3},
    )

    def train_rows(runs_dir):
        result = train_ppo(dataclasses.replace(cfg, runs_dir=str(runs_dir)), prefs, None, seed=0)
        return [
            {k: v for k, v in r.items() if k != "wall_seconds" and not k.startswith("time/")}
            for r in read_jsonl(result.run_dir / "metrics.jsonl")[0]
            if r["kind"] == "train"
        ]

    uninterrupted = train_rows(tmp_path / "a")
    real_sample = power_cut(ppo.train, "sample", 3)  # the rollout of iteration 3
    with pytest.raises(RuntimeError, match="power cut"):
        train_rows(tmp_path / "b")
    monkeypatch.setattr(ppo.train, "sample", real_sample)
    resumed = train_rows(tmp_path / "b")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    # before the cut the scale had moved and the adapters had trained (pi_theta's rollout has moved off pi_ref)
    assert uninterrupted[1]["amp/loss_scale"] < init_scale and uninterrupted[2]["objective/kl"] != 0
    assert resumed == uninterrupted
