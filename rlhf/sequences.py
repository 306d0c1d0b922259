"""Prompt-response batches, sampling, and response log-probabilities: written once, used by every method.

Layout of a `SequenceBatch` (the layout of the N+ implementation details of RLHF with PPO):

    prompt_ids   [B, P]  left-padded, so every prompt ends at column P-1
    response_ids [B, R]  right-padded; response_mask is 1 up to and including the first EOS

so `cat(prompt_ids, response_ids)` puts response token j at column P + j for every row, and the logits at
column P + j - 1 predict it. Position ids are computed from the attention mask, so a left-padded row gets
the same positions (and the same log-probs) as the row alone.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.errors import Diverged


@dataclass
class SequenceBatch:
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    # [B] bool: the response produced an EOS within the length cap. Set once, by `sample`, where truncation finds
    # it (recomputing it from the ids would count a cut response as ended wherever the pad token is EOS)
    ended: torch.Tensor | None = None

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(dim=1)

    def to(self, device: torch.device) -> SequenceBatch:
        return SequenceBatch(*(None if t is None else t.to(device) for t in self._fields()))

    def select(self, idx: torch.Tensor) -> SequenceBatch:
        """The rows `idx` (a minibatch)."""
        return SequenceBatch(*(None if t is None else t[idx] for t in self._fields()))

    def _fields(self) -> tuple[torch.Tensor | None, ...]:
        return self.prompt_ids, self.prompt_mask, self.response_ids, self.response_mask, self.ended


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: the first real token of every row is position 0."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def truncate_after_eos(
    response_ids: torch.Tensor, eos_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep each response up to and including its first EOS; pad the rest.

    Returns (ids, mask, ended): `ended` marks rows that produced an EOS within the length cap.
    """
    is_eos = response_ids == eos_token_id
    # index of the first EOS, or R where there is none
    first_eos = torch.where(
        is_eos.any(dim=1), is_eos.float().argmax(dim=1), torch.full_like(response_ids[:, 0], response_ids.shape[1])
    )
    columns = torch.arange(response_ids.shape[1], device=response_ids.device)
    mask = (columns[None, :] <= first_eos[:, None]).long()
    ids = response_ids.masked_fill(mask == 0, pad_token_id)
    return ids, mask, is_eos.any(dim=1)


def tokenize_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids. Prompts are rendered text (tasks.format_prompt); like TRL's trainers, the tokenizer
    adds the special tokens it adds to any text (a BOS for Llama 3, nothing for GPT-2 and SmolLM2)."""
    old_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    tokenizer.padding_side = old_side
    return enc.input_ids, enc.attention_mask


@contextlib.contextmanager
def linear_weights_cast(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Inside an autocast region, every `nn.Linear` of a frozen `model` holds its weight already in autocast's
    dtype, and gets its own weight back on exit. Autocast casts a weight that needs no gradient again at every call,
    and `generate` calls the model once a token: for the default's 32 tokens that is 33 casts of every weight, a
    third of a 16-sequence rollout. Autocast's cast is a plain `.to(dtype)` of the weight, so casting once computes
    the same numbers. Only the linear layers: an embedding or a norm is not autocast, and a cast copy there would
    change what it computes (a tied LM head gets its own cast copy; the embedding keeps the fp32 weight)."""
    if not torch.is_autocast_enabled(device.type):
        yield
        return
    dtype = torch.get_autocast_dtype(device.type)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.dtype != dtype]
    own = [m.weight for m in linears]
    try:
        for m in linears:
            m.weight = nn.Parameter(m.weight.detach().to(dtype), requires_grad=False)
        yield
    finally:
        for m, weight in zip(linears, own, strict=True):
            m.weight = weight


@contextlib.contextmanager
def generation_kernel(model: PreTrainedModel) -> Iterator[None]:
    """The model's generation attention kernel for the length of the block, its passes' kernel after
    (`rlhf.models.KERNELS`; a model loaded elsewhere keeps the one it has)."""
    passes, generation = getattr(model, "attention_kernels", (None, None))
    if passes == generation:
        yield
        return
    model.set_attn_implementation(generation)
    try:
        yield
    finally:
        model.set_attn_implementation(passes)


@torch.inference_mode()
def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    autocast_ctx,
) -> SequenceBatch:
    """Sample one response per prompt with the KV cache (pure ancestral sampling: no top-k, no top-p)."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, prompts)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    with autocast_ctx, linear_weights_cast(model, device), generation_kernel(model):
        try:
            out = model.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                min_p=None,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        except RuntimeError as e:  # torch.multinomial's complaint about the next-token distribution
            if "inf" in str(e) and "nan" in str(e):
                raise Diverged(f"sampling: the model's next-token probabilities are not finite ({e})") from e
            raise
    response_ids, response_mask, ended = truncate_after_eos(
        out[:, prompt_ids.shape[1] :], tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    return SequenceBatch(prompt_ids, prompt_mask, response_ids, response_mask, ended)


def _split(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completions: list[str]
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of each completion of one prompt, tokenised the way TRL's trainers do it: EOS
    appended to the completion, prompt + completion tokenised as one string, and every completion starting where
    the first of them diverges from the tokenised prompt alone (a completion's first token can merge with the
    prompt's last, e.g. a prompt cut mid-word)."""
    eos = tokenizer.eos_token
    alone = tokenizer(prompt).input_ids
    fulls = [tokenizer(prompt + c + ("" if c.endswith(eos) else eos)).input_ids for c in completions]
    cut = min(
        next((i for i, (a, b) in enumerate(zip(alone, full)) if a != b), min(len(alone), len(full))) for full in fulls
    )
    return [(full[:cut], full[cut:]) for full in fulls]


def encode_completions(tokenizer: PreTrainedTokenizerBase, prompts: list[str], completions: list[str]) -> SequenceBatch:
    """Text (prompt, completion) pairs -> a SequenceBatch, split as TRL's trainers split them (`_split`), so the
    log-probs and rewards computed here are those the DPO, reward and SFT trainers optimise."""
    rows = [_split(tokenizer, p, [c])[0] for p, c in zip(prompts, completions, strict=True)]
    return pad_sequences([p for p, _ in rows], [c for _, c in rows], tokenizer.pad_token_id)


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], chosen: list[str], rejected: list[str]
) -> tuple[SequenceBatch, SequenceBatch]:
    """Preference pairs -> (chosen, rejected) SequenceBatches, both sides of a pair cut at one place, as TRL's
    DPOTrainer cuts them."""
    rows = [_split(tokenizer, p, [c, r]) for p, c, r in zip(prompts, chosen, rejected, strict=True)]
    return tuple(
        pad_sequences([pair[side][0] for pair in rows], [pair[side][1] for pair in rows], tokenizer.pad_token_id)
        for side in (0, 1)
    )


def pad_sequences(prompt_rows: list[list[int]], response_rows: list[list[int]], pad: int) -> SequenceBatch:
    """Token-id rows -> a SequenceBatch: prompts left-padded, responses right-padded (the layout above)."""
    p_len, r_len = max(map(len, prompt_rows)), max(1, max(map(len, response_rows)))
    prompt_ids = torch.tensor([[pad] * (p_len - len(r)) + r for r in prompt_rows])
    prompt_mask = torch.tensor([[0] * (p_len - len(r)) + [1] * len(r) for r in prompt_rows])
    response_ids = torch.tensor([r + [pad] * (r_len - len(r)) for r in response_rows])
    response_mask = torch.tensor([[1] * len(r) + [0] * (r_len - len(r)) for r in response_rows])
    return SequenceBatch(prompt_ids, prompt_mask, response_ids, response_mask)


def response_logprobs(
    model: PreTrainedModel, batch: SequenceBatch, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log pi(y_t | x, y_<t) of the response tokens, [B, R], zero where response_mask is 0.

    The logits are divided by the sampling temperature first, so the log-probs are those of the distribution
    the tokens were actually sampled from. With `with_entropy`, also the per-token entropy of that
    distribution, without autograd (it is only logged). Gradients flow into the log-probs when called outside
    no_grad (PPO, DPO); callers choose.
    """
    r_len = batch.response_ids.shape[1]
    attention_mask = batch.attention_mask
    # Only the last R+1 columns need vocabulary logits (column P-1+j predicts response token j): skipping the
    # LM head over the prompt saves a large share of a small model's forward pass.
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        logits_to_keep=r_len + 1,
    ).logits
    logits = logits[:, :-1].float()
    if temperature != 1.0:  # x / 1.0 is x: at temperature 1 (the default) no copy of the [B, R, vocab] logits
        logits = logits / temperature
    # gather minus logsumexp: the same as log_softmax + gather without materialising log_softmax twice
    token_logits = torch.gather(logits, 2, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    log_z = torch.logsumexp(logits, dim=-1)
    logprobs = (token_logits - log_z) * batch.response_mask
    entropy = None
    if with_entropy:
        with torch.no_grad():  # no graph through a second full-vocabulary softmax
            probs = F.softmax(logits, dim=-1)
            entropy = (log_z - (probs * logits).sum(-1)) * batch.response_mask
    return logprobs, entropy


def sequence_scores(scalar_model: PreTrainedModel, batch: SequenceBatch) -> torch.Tensor:
    """Raw scalar score of each (prompt, response) from a scalar head, [B], read where transformers' sequence
    classifiers (and TRL's RewardTrainer) read it: the last token that is not padding."""
    attention_mask = batch.attention_mask
    return (
        scalar_model(
            input_ids=batch.input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
        )
        .logits[:, 0]
        .float()
    )


def with_eos(batch: SequenceBatch, eos_token_id: int, pad_token_id: int) -> SequenceBatch:
    """The batch with an EOS appended to every response that has none (cut by the length cap)."""
    has_eos = ((batch.response_ids == eos_token_id) & (batch.response_mask == 1)).any(dim=1)
    if has_eos.all():
        return batch
    lengths = batch.response_lengths
    ids = torch.cat([batch.response_ids, torch.full_like(batch.response_ids[:, :1], pad_token_id)], dim=1)
    mask = torch.cat([batch.response_mask, torch.zeros_like(batch.response_mask[:, :1])], dim=1)
    rows = torch.nonzero(~has_eos).squeeze(1)
    ids[rows, lengths[rows]] = eos_token_id
    mask[rows, lengths[rows]] = 1
    return SequenceBatch(batch.prompt_ids, batch.prompt_mask, ids, mask)


def reward_scores(
    reward_model: PreTrainedModel, batch: SequenceBatch, tokenizer: PreTrainedTokenizerBase
) -> torch.Tensor:
    """r_phi(x, y), [B]: the raw score of the EOS-terminated response minus the shift that centres pi_ref's
    samples at 0 (InstructGPT's normalisation; stored in the reward model's config as `reward_shift`).

    Every training pair ended with EOS (TRL appends it), so a response cut by the length cap is scored with
    an EOS appended: the head then reads the same kind of position it was trained on.
    """
    batch = with_eos(batch, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return sequence_scores(reward_model, batch) - getattr(reward_model.config, "reward_shift", 0.0)


def shortest_first(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], chosen: list[str], rejected: list[str]
) -> list[int]:
    """Indices of preference pairs ordered by length in tokens (prompt + the longer response): batches cut from
    this order are padded to about their own length instead of to the longest pair in the set."""

    def n_tokens(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(list(texts)).input_ids]

    lengths = [p + max(c, r) for p, c, r in zip(n_tokens(prompts), n_tokens(chosen), n_tokens(rejected), strict=True)]
    return sorted(range(len(lengths)), key=lengths.__getitem__)


def chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))
