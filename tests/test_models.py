import contextlib
import json

import pytest
import torch

from rlhf.config import ModelConfig
from rlhf.errors import UserError
from rlhf.models import EMBEDDED, cache_dir, load_causal_lm, load_scalar_model, resolve_model_path, sha256_file


def test_embedded_model_is_float32_unquantized_and_checksummed():
    path = resolve_model_path(ModelConfig())
    record = json.loads((cache_dir() / "models" / "smollm2-135m-instruct" / "conversion.json").read_text())
    assert record["wheel_sha256"] == EMBEDDED["smollm2-135m-instruct"].wheel_sha256
    assert record["safetensors_sha256"] == sha256_file(
        cache_dir() / "models" / "smollm2-135m-instruct" / "model.safetensors"
    )
    config = json.loads((cache_dir() / "models" / "smollm2-135m-instruct" / "config.json").read_text())
    assert "quantization_config" not in config
    model = load_causal_lm(path)
    assert not getattr(model, "is_quantized", False) and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) > 100_000_000


def test_tiny_model_and_scalar_head_share_one_loader(tiny_path, tokenizer):
    lm = load_causal_lm(tiny_path)
    rm = load_scalar_model(tiny_path, tokenizer.pad_token_id)
    assert lm.config.num_hidden_layers == 2 and rm.config.num_labels == 1
    assert torch.equal(lm.model.embed_tokens.weight, rm.model.embed_tokens.weight)  # same backbone
    assert resolve_model_path(ModelConfig(name_or_path="tiny")) == tiny_path  # built once, reused


def test_missing_model_is_a_clear_error():
    with pytest.raises(UserError, match="'no/such/model' is not a local folder, and this profile is offline"):
        resolve_model_path(ModelConfig(name_or_path="no/such/model"))
    with pytest.raises(UserError, match="unknown embedded model 'gpt5'"):
        resolve_model_path(ModelConfig(name_or_path="embedded:gpt5"))


def test_hub_profile_fails_fast_when_offline(monkeypatch):
    monkeypatch.setattr("rlhf.models.hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(UserError, match="'gpt2-large' must come from the Hugging Face hub, which is unreachable"):
        resolve_model_path(ModelConfig(name_or_path="gpt2-large"), hub_access=True)


def _dropout_models():
    """Two small randomly initialised models with heavy dropout of both kinds: GPT-2 (`nn.Dropout` modules, LoRA's
    kind too) and Llama (attention dropout applied functionally from an attribute)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=64,
            n_positions=32,
            n_embd=32,
            n_layer=2,
            n_head=2,
            resid_pdrop=0.5,
            embd_pdrop=0.5,
            attn_pdrop=0.5,
        )
    )
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            attention_dropout=0.5,
            attn_implementation="eager",
        )
    )
    return {"gpt2": gpt2, "llama": llama}


def test_training_models_have_no_dropout(tiny_cfg):
    """PPO's ratio pi/pi_old is exactly 1 before any update only if train-mode forward passes are deterministic and
    equal to eval mode's (the old log-probs are computed in eval mode)."""
    from rlhf.models import for_training

    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    for name, model in _dropout_models().items():
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits), name  # dropout is really on before
        model = for_training(model, tiny_cfg, "CAUSAL_LM")
        model.train()
        first = model(ids).logits
        assert torch.equal(first, model(ids).logits), name
        model.eval()
        assert torch.allclose(first, model(ids).logits, atol=1e-6), name


def test_sampling_ignores_a_checkpoints_generation_settings(tiny_path, tmp_path):
    """A checkpoint's generation_config (a repetition penalty, banned n-grams) would make `generate` sample from
    another distribution than the one the log-prob passes score: the loader keeps only its special tokens."""
    model = load_causal_lm(tiny_path)
    model.generation_config.repetition_penalty, model.generation_config.no_repeat_ngram_size = 1.3, 2
    model.save_pretrained(tmp_path / "shipped")
    loaded = load_causal_lm(str(tmp_path / "shipped"))
    shipped = load_causal_lm(tiny_path).generation_config
    assert loaded.generation_config.repetition_penalty in (None, 1.0)
    assert loaded.generation_config.no_repeat_ngram_size in (None, 0)
    assert (loaded.generation_config.eos_token_id, loaded.generation_config.pad_token_id) == (
        shipped.eos_token_id,
        shipped.pad_token_id,
    )


def test_every_model_loads_with_the_profiles_attention_kernel(tiny_path, tokenizer):
    """`model.attention` is honoured by both loaders (eager computes what SDPA does, up to rounding), and every call
    of them in the stages passes the profile's kernel: a saved model does not carry it, so a call that left it out
    would quietly load SDPA under `attention: eager`, whose run keys say eager."""
    import ast

    from rlhf.config import PROJECT_ROOT

    ids = torch.tensor([[5, 6, 7, 8, 9]])
    lms = {a: load_causal_lm(tiny_path, a) for a in ("sdpa", "eager")}
    assert {a: m.config._attn_implementation for a, m in lms.items()} == {"sdpa": "sdpa", "eager": "eager"}
    assert load_scalar_model(tiny_path, tokenizer.pad_token_id, "eager").config._attn_implementation == "eager"
    with torch.no_grad():
        assert torch.allclose(lms["sdpa"](ids).logits, lms["eager"](ids).logits, atol=1e-5)
    split = load_causal_lm(tiny_path, "split")
    assert split.config._attn_implementation == "eager"  # its passes; `sample` decodes with SDPA (test below)
    assert load_scalar_model(tiny_path, tokenizer.pad_token_id, "split").config._attn_implementation == "eager"
    needs = {"load_causal_lm": 2, "load_scalar_model": 3}  # path (, pad id), attention
    short = []
    for package in ("rlhf", "ppo", "dpo", "reward_model", "sft", "online_dpo", "rloo", "baselines", "pipelines"):
        for path in (PROJECT_ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Name)
                    and node.func.id in needs
                    and len(node.args) + len(node.keywords) < needs[node.func.id]
                ):
                    short.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno}")
    assert short == []


def test_split_attention_samples_as_sdpa_and_scores_as_eager(tiny_path, tokenizer, monkeypatch):
    """`model.attention: split` decodes with SDPA (the same tokens as an SDPA model from the same seed) and is back
    on eager for every pass after (the same log-probs as an eager model): a kernel left switched after `generate`
    would score PPO's rollouts and the evaluator's samples with the kernel that sampled them, not the profile's."""
    from rlhf.sequences import response_logprobs, sample

    seen = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: seen.append(1) or real(*a, **k)
    )
    prompts = ["The movie was", "I think that this film", "Worst"]
    models = {a: load_causal_lm(tiny_path, a).eval() for a in ("sdpa", "eager", "split")}
    batches = {}
    for a, m in models.items():
        torch.manual_seed(0)
        seen.clear()
        batches[a] = sample(m, tokenizer, prompts, 8, 1.0, contextlib.nullcontext())
        assert bool(seen) == (a != "eager"), a  # split decodes through SDPA
    assert torch.equal(batches["split"].response_ids, batches["sdpa"].response_ids)
    seen.clear()
    with torch.no_grad():
        logps = {a: response_logprobs(m, batches["sdpa"])[0] for a, m in models.items()}
    assert models["split"].config._attn_implementation == "eager"
    assert torch.equal(logps["split"], logps["eager"])
