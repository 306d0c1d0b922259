"""Compute in FLOPs, counted alike for every stage (docs/analysis.md): the standard approximation of Kaplan et al.
(2020, "Scaling Laws for Neural Language Models", sec. 2.1),

    forward          = 2 · N · tokens     (a multiply and an add per parameter per token)
    forward+backward = 6 · N · tokens     (the backward pass costs twice the forward)

where N is the parameters a pass runs through and tokens are the real (non-padding) tokens it reads. N is the
backbone without its embedding tables (a lookup, not a matmul) plus the output head: the LM head (vocab × hidden,
counted even when it shares its weights with the input embedding: the matmul runs either way) for a causal LM, the
scalar head (hidden × 1) for a reward or value model.

Left out, as in Kaplan et al.: attention's context-dependent term (2 · layers · context · hidden per token, small
next to N at these lengths), softmax, norms' and activations' elementwise work, and gradient checkpointing's
recomputed forward. The head is counted at every token, though `response_logprobs` projects only the response
positions and a reward head reads one: the same convention for every method, an overestimate of the head's share.
"""

from __future__ import annotations

from peft import PeftModel
from torch import nn

HEADS = ("lm", "scalar")


def pass_parameters(model: nn.Module, head: str = "lm") -> int:
    """N of one pass through `model` (a transformers causal LM or sequence classifier, LoRA-wrapped or not): its
    backbone's non-embedding parameters plus the `head` it computes, "lm" (vocab × hidden) or "scalar" (hidden)."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, not {head!r}")
    model = model.get_base_model() if isinstance(model, PeftModel) else model  # LoRA's adapters stay in the count
    backbone = getattr(model, model.base_model_prefix)  # e.g. LlamaModel: embeddings, blocks, final norm
    lookups = {id(p) for m in backbone.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    body = sum(p.numel() for p in backbone.parameters() if id(p) not in lookups)
    vocab, hidden = backbone.get_input_embeddings().weight.shape
    return body + hidden * (vocab if head == "lm" else 1)


def forward_flops(n_params: int, tokens: int) -> int:
    """FLOPs of a forward pass of `tokens` real tokens through `n_params` parameters: 2 · N · tokens."""
    return 2 * n_params * tokens


def train_flops(n_params: int, tokens: int) -> int:
    """FLOPs of a forward and backward pass (one training presentation) of `tokens` real tokens: 6 · N · tokens."""
    return 6 * n_params * tokens
