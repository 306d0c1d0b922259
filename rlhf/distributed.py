"""Several processes on one run (`accelerate launch --num_processes N`, DDP; docs/profiles.md).

Every process holds a full replica of each trained model and trains on its own share of the data; DDP
averages the gradients, so the replicas take the same optimizer steps and stay equal. What must happen once
happens on the main process: building the preference set, writing the run directory, evaluation, saving
models. The other processes wait for it at the next collective. In a single process every function here is
a no-op or an identity.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object, reduce

from rlhf.errors import Diverged, UserError, check_finite


def state() -> PartialState:
    """accelerate's view of this process (a singleton, created on first use). On a machine without CUDA it forms
    a process group (gloo) only when asked for the CPU explicitly; otherwise every process would think it alone."""
    return PartialState(cpu=not torch.cuda.is_available())


def is_main() -> bool:
    return state().is_main_process


def num_processes() -> int:
    return state().num_processes


def per_process(total: int, key: str) -> int:
    """This process's share of a batch of `total` (config key `key`): a config's batch sizes are per optimiser
    step over all processes, so a run means the same algorithm on 1 process or 8."""
    n = num_processes()
    if total % n:
        raise UserError(f"{key}={total} does not split evenly over {n} processes; make it a multiple of {n}")
    return total // n


def from_main(*values: Any) -> tuple[Any, ...]:
    """The main process's `values` (picklable objects), on every process."""
    if num_processes() == 1:
        return values
    return tuple(broadcast_object_list(list(values)))


def sum_over_processes(count: int) -> int:
    """The sum of every process's `count` (a collective: every process must call it at the same point)."""
    if num_processes() == 1:
        return count
    return int(reduce(torch.tensor([count], device=state().device), "sum").item())


def wait_for_everyone() -> None:
    state().wait_for_everyone()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Run the block on the main process, then on the others (e.g. build a cached artefact once, then load it)."""
    with state().main_process_first():
        yield


@contextlib.contextmanager
def stop_together() -> Iterator[None]:
    """Around a block that some processes may leave with a UserError or Diverged (the main process's evaluation, a
    check of each process's own numbers): at its end, a collective where every process learns whether any of them
    raised, and all raise the first one's error, same kind, same message. Otherwise the others would wait at their
    next collective for a process that has stopped, until the launcher kills them with another message. Every
    process must enter the block."""
    error: UserError | Diverged | None = None
    try:
        yield
    except (UserError, Diverged) as e:
        error = e
    if num_processes() > 1:
        # one number across processes on the way (cheap), the messages only when some process has one
        flag = torch.tensor([float(error is not None)], device=state().device)
        if reduce(flag, "sum").item() > 0:
            errors = gather_object([None if error is None else (isinstance(error, Diverged), str(error))])
            diverged, message = next(e for e in errors if e is not None)
            if error is None or str(error) != message:
                raise (Diverged if diverged else UserError)(message) from error
    if error is not None:
        raise error


def check_finite_everywhere(where: str, **values: object) -> None:
    """`check_finite` of each process's own values (its rollouts' rewards, its batch's loss), a collective: a NaN on
    any process stops every process with that process's message. Every process must call it at the same point."""
    with stop_together():
        check_finite(where, **values)


def parameter_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's parameters and buffers, bit for bit."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def replica_digests(model: torch.nn.Module) -> list[str]:
    """Every process's `parameter_digest(model)`, in process order, on every process (all equal when DDP kept
    the replicas in step). A collective: every process must call it."""
    return gather_object([parameter_digest(model)])


def check_replicas(model: torch.nn.Module, manifest: dict) -> None:
    """Record in `manifest` how many processes trained `model` and each replica's digest; raise if they differ
    (a desynchronised DDP run: its numbers cannot be trusted)."""
    digests = replica_digests(model)
    manifest["replicas"] = {"num_processes": len(digests), "param_sha256": digests}
    if len(set(digests)) > 1:
        raise RuntimeError(
            f"the {len(digests)} processes ended with different parameters (sha256 "
            f"{', '.join(d[:12] for d in digests)}): the DDP replicas went out of step"
        )
