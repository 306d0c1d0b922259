import json

import pytest
import torch

from pipelines.config import ModelConfig
from pipelines.errors import UserError
from pipelines.models import (EMBEDDED, cache_dir, load_causal_lm, load_scalar_model, resolve_model_path,
                              sha256_file)


def test_embedded_model_is_float32_unquantized_and_checksummed():
    path = resolve_model_path(ModelConfig())
    record = json.loads((cache_dir() / "models" / "smollm2-135m-instruct" / "conversion.json").read_text())
    assert record["wheel_sha256"] == EMBEDDED["smollm2-135m-instruct"].wheel_sha256
    assert record["safetensors_sha256"] == sha256_file(cache_dir() / "models" / "smollm2-135m-instruct" /
                                                       "model.safetensors")
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
    monkeypatch.setattr("pipelines.models.hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(UserError, match="'gpt2-large' must come from the Hugging Face hub, which is unreachable"):
        resolve_model_path(ModelConfig(name_or_path="gpt2-large"), hub_access=True)
