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

import time

import torch
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


def linear_shapes(model: nn.Module) -> dict[tuple[int, int], int]:
    """(in_features, out_features) of every matmul weight one forward pass of `model` multiplies by, with how many
    layers have it: the attention projections, the MLP's and the head (an LM head tied to the embedding included)."""
    model = model.get_base_model() if isinstance(model, PeftModel) else model
    shapes: dict[tuple[int, int], int] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            shape = (module.in_features, module.out_features)
            shapes[shape] = shapes.get(shape, 0) + 1
    return shapes


def matmul_limit(
    model: nn.Module, dtype: torch.dtype, device: torch.device, rows: int = 2048, repeats: int = 3
) -> float:
    """This machine's dense matmul FLOP/s at `model`'s own shapes: `rows` tokens through each of its weight shapes
    (`linear_shapes`) in `dtype`, on every core torch uses, the fastest of `repeats` calls after a warm-up, weighted
    as one forward pass weights them. No stage can run faster than this: it is what every stage's achieved FLOP/s is
    a fraction of (`make bench`), and what the clock scales by (pipelines/clock.py). 2048 rows is a training batch
    of the default profile (16 sequences of about 70 tokens, both sides of 8 pairs) and more than enough to fill
    the cores."""
    flops = seconds = 0.0
    for (n_in, n_out), count in linear_shapes(model).items():
        x = torch.randn(rows, n_in, dtype=dtype, device=device)
        w = torch.randn(n_out, n_in, dtype=dtype, device=device)
        best = float("inf")
        for i in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            torch.nn.functional.linear(x, w)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:  # the first call warms the kernel's caches
                best = min(best, time.perf_counter() - start)
        flops += count * 2 * rows * n_in * n_out
        seconds += count * best
    return flops / seconds
