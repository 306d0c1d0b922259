"""What this project relies on in TRL, checked against the installed TRL: the private names rlhf/trl_compat.py reaches
for, the public hooks the stages override, and the experimental trainer online DPO runs on. A TRL upgrade that moves,
renames or re-signs one of them fails here with one line naming the symbol and what relies on it, before a run
computes other numbers with it; pyproject.toml's TRL range holds the releases this passed on."""

from __future__ import annotations

import importlib
import inspect
import types
import warnings

import pytest
import torch
import trl
import trl.kernels.chunked_logprob
import trl.trainer.utils
from packaging.requirements import Requirement
from packaging.version import Version

from pipelines.bundle import project_requirements

# (symbol, its parameters, what relies on it); None: only that it exists
SIGNATURES = [
    ("trl.kernels.chunked_logprob._use_triton", ["device"], "rlhf.trl_compat.install (the fused head on a CPU)"),
    (
        "trl.DPOTrainer._precompute_ref_logps",
        ["self", "dataset", "name", "batch_size"],
        "rlhf.trl_compat.ReferencePassDPOTrainer (DPO's own pi_ref pass)",
    ),
    (
        "trl.DPOTrainer.compute_loss",
        ["self", "model", "inputs", "return_outputs", "num_items_in_batch"],
        "dpo.trainer.WeightLoggingDPOTrainer (the gradient weight, the stop at a non-finite loss)",
    ),
    (
        "trl.DPOTrainer.log",
        ["self", "logs", "start_time"],
        "dpo.trainer.WeightLoggingDPOTrainer (the gradient weight's log)",
    ),
    (
        "trl.trainer.utils.FusedCausalLMOutput.log_probs",
        None,
        "dpo.trainer.WeightLoggingDPOTrainer (the policy's per-token log-probs)",
    ),
    ("trl.experimental.online_dpo.OnlineDPOTrainer", None, "online_dpo.trainer"),
    ("trl.experimental.online_dpo.OnlineDPOConfig", None, "online_dpo.trainer"),
]
# (function or class, a name its code must still use, why that matters)
USES = [
    (
        "trl.trainer.utils.add_fused_lm_head",
        "_use_triton",
        "rlhf.trl_compat.install rebinds that global of trl.trainer.utils to decide the fused head's path",
    ),
    (
        "trl.DPOTrainer.__init__",
        "_precompute_ref_logps",
        "rlhf.trl_compat.ReferencePassDPOTrainer expects pi_ref's pass to be made there",
    ),
    (
        "trl.DPOTrainer.__init__",
        "loss_types",
        "dpo.trainer.WeightLoggingDPOTrainer reads it to log eq. (6)'s gradient weight for the sigmoid loss only",
    ),
    (
        "trl.trainer.dpo_trainer.DataCollatorForPreference.torch_call",
        "ref_chosen_logps",
        "dpo.trainer.WeightLoggingDPOTrainer reads pi_ref's log-probs from every batch under that name",
    ),
    (
        "trl.experimental.online_dpo.OnlineDPOTrainer",
        "trainer_state",
        "rlhf.online.reward_function counts online DPO's sampled tokens into the trainer_state it is handed",
    ),
    (
        "trl.RLOOTrainer",
        "num_input_tokens_seen",
        "rloo.trainer leaves the counting of RLOO's sampled tokens (every row's `tokens`) to RLOOTrainer",
    ),
]


def resolve(symbol: str) -> object:
    """The object a dotted name names, importing the longest module prefix; AttributeError or ImportError if gone."""
    parts = symbol.split(".")
    for n in range(len(parts), 0, -1):
        try:
            with warnings.catch_warnings():  # `trl.experimental` warns that it may change: what this file checks
                warnings.simplefilter("ignore")
                obj = importlib.import_module(".".join(parts[:n]))
            break
        except ImportError:
            if n == 1:
                raise
    for name in parts[n:]:
        obj = getattr(obj, name)
    return obj


def names_used(obj: object) -> set[str]:
    """Every global, attribute and keyword name and every string constant in the code of a function (nested functions
    included) or of a class's own methods."""
    if isinstance(obj, type):
        return set().union(*(names_used(f) for f in vars(obj).values() if inspect.isfunction(f)))
    names, todo = set(), [obj.__code__]
    while todo:
        code = todo.pop()
        names |= set(code.co_names)
        consts = list(code.co_consts)
        while consts:
            const = consts.pop()
            if isinstance(const, types.CodeType):
                todo.append(const)
            elif isinstance(const, tuple):  # a call's keyword names
                consts += const
            elif isinstance(const, str):
                names.add(const)
    return names


def signature_problem(symbol: str, parameters: list[str] | None, relier: str) -> str | None:
    try:
        obj = resolve(symbol)
    except (ImportError, AttributeError):
        return f"{symbol} is gone in TRL {trl.__version__}: {relier} relies on it"
    if parameters is not None:
        found = list(inspect.signature(obj).parameters)
        if found != parameters:
            return (
                f"{symbol} takes ({', '.join(found)}) in TRL {trl.__version__}, not ({', '.join(parameters)}): "
                f"{relier} relies on it"
            )
    return None


def use_problem(symbol: str, name: str, why: str) -> str | None:
    try:
        obj = resolve(symbol)
    except (ImportError, AttributeError):
        return f"{symbol} is gone in TRL {trl.__version__}: {why}"
    if name not in names_used(obj):
        return f"{symbol} no longer uses `{name}` in TRL {trl.__version__}: {why}"
    return None


def contract_problems() -> list[str]:
    return [p for p in [*(signature_problem(*s) for s in SIGNATURES), *(use_problem(*u) for u in USES)] if p]


@pytest.mark.parametrize("symbol, parameters, relier", SIGNATURES, ids=[s[0] for s in SIGNATURES])
def test_what_the_project_calls_or_overrides_is_there_with_its_parameters(symbol, parameters, relier):
    problem = signature_problem(symbol, parameters, relier)
    if problem:
        pytest.fail(problem, pytrace=False)


@pytest.mark.parametrize("symbol, name, why", USES, ids=[f"{u[0]}:{u[1]}" for u in USES])
def test_what_the_project_relies_on_trl_doing_it_still_does(symbol, name, why):
    problem = use_problem(symbol, name, why)
    if problem:
        pytest.fail(problem, pytrace=False)


def test_trls_own_answer_on_a_cpu_is_a_bool_and_no():
    """`install` leaves TRL's answer to every device but a CPU: a bool, and on a CPU no (else installing changes
    nothing, and the CPU already takes the labelled positions only)."""
    assert trl.kernels.chunked_logprob._use_triton(torch.device("cpu")) is False


def test_the_installed_trl_is_in_the_supported_range():
    (supported,) = [r.specifier for r in map(Requirement, project_requirements()) if r.name == "trl"]
    assert Version(trl.__version__) in supported, (
        f"TRL {trl.__version__} is outside pyproject.toml's trl{supported}: run this file on it, then widen the range"
    )


def _takes_two(device, dtype):
    return False


def _reads_nothing(model):
    return None


@pytest.mark.parametrize(
    "where, name, broken, says",
    [
        (trl.DPOTrainer, "_precompute_ref_logps", None, "trl.DPOTrainer._precompute_ref_logps is gone in TRL"),
        (
            trl.kernels.chunked_logprob,
            "_use_triton",
            _takes_two,
            "trl.kernels.chunked_logprob._use_triton takes (device, dtype) in TRL",
        ),
        (
            trl.trainer.utils,
            "add_fused_lm_head",
            _reads_nothing,
            "trl.trainer.utils.add_fused_lm_head no longer uses `_use_triton` in TRL",
        ),
    ],
    ids=["removed", "re-signed", "no longer read"],
)
def test_a_trl_that_moved_something_is_named(where, name, broken, says, monkeypatch):
    """The contract on a TRL broken by hand: each kind of move gives exactly one problem, naming the symbol."""
    if broken is None:
        monkeypatch.delattr(where, name)
    else:
        monkeypatch.setattr(where, name, broken)
    (problem,) = contract_problems()
    assert problem.startswith(says), problem
