"""Where this project goes past TRL's public API: every such place is here, and nowhere else.

The stages use what TRL documents: its trainers and their configs, Trainer's `compute_loss` and `log`, the
reward-function signature. Two things need more, because no public route gives the same numbers at the same cost:

* `install()`: TRL's fused LM head projects only the labelled positions on a CPU too (TRL's private
  `trl.trainer.utils._use_triton`). Process-wide, so the CLI calls it once, before any stage builds a trainer.
* `ReferencePassDPOTrainer`: DPOTrainer with its pi_ref pass (`precompute_ref_log_probs=True`) replaceable, for DPO's
  own pass and its cache (TRL's private `DPOTrainer._precompute_ref_logps`, the only place that pass is made).

Only modules and public classes are imported here: a private name is looked up where it is used, so that a TRL
without it still imports this module, and tests/test_trl_contract.py can name what moved. That test checks every
private name above against the installed TRL, and the public hooks the stages override (DPO's `compute_loss` and
`log`, the reward function's arguments, online DPO's experimental trainer, which TRL may change or drop in any
release); pyproject.toml bounds TRL to the releases it passed on.
"""

from __future__ import annotations

import torch
import trl
import trl.kernels.chunked_logprob as trl_kernels
import trl.trainer.utils as trl_utils
from datasets import Dataset


def _compact_on_cpu(device: torch.device) -> bool:
    return device.type == "cpu" or trl_kernels._use_triton(device)  # elsewhere TRL's own answer: a Triton device?


def install() -> None:
    """Have TRL's fused LM head (DPO's, RLOO's and Preferred-FT's log-probs) project only the positions that have a
    label on a CPU too, as it does on a device with Triton. Elsewhere it projects every position (a fixed tile shape,
    for compilers such as Neuron's); on a CPU that is pure waste: the prompt's and the padding's positions go through
    the 49k-word head, forward and backward, and their log-probs are then masked to 0. Taking TRL's own GPU path
    (`compact`) gives the same sums in other tile shapes, so equal up to rounding; a DPO step on the default profile
    ~1.35x faster (docs/performance.md). `_use_triton` decides only `compact` in trl.trainer.utils; TRL's kernels
    keep their own. Calling it again changes nothing."""
    trl_utils._use_triton = _compact_on_cpu


class ReferencePassDPOTrainer(trl.DPOTrainer):
    """TRL's DPOTrainer whose pi_ref pass a subclass replaces by overriding `reference_logps`. TRL makes that pass in
    its constructor, through a private method, when `precompute_ref_log_probs=True`; it has no public hook."""

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        return self.reference_logps(dataset, name, batch_size)

    def reference_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """`dataset` (TRL's tokenised pairs: prompt_ids, chosen_ids, rejected_ids) with pi_ref's sequence log-probs
        added as the columns ref_chosen_logps and ref_rejected_logps, which TRL's collator hands to every batch.
        Here TRL's own pass; `name` is the split's, for a progress bar."""
        return super()._precompute_ref_logps(dataset, name, batch_size)
