"""Experiment trackers (`report_to`): every metrics row a run writes to its metrics.jsonl also goes, as it is
written, to each tracker named, through accelerate's tracking integrations (TensorBoard, Weights & Biases, trackio,
MLflow, ...). One path for every stage, so both methods' rows arrive under one set of names: the evaluator's
`eval/gold`, `eval/kl`, `heldout/...` are the same tags for PPO, DPO and the baselines.

Why not TRL's own `report_to` for the TRL stages: it sends only what TRL logs, under names that differ by trainer
(and transformers' TensorBoard callback renames them `train/...`), and misses our eval points, FLOPs and
wall-clock. PPO is our own loop and has no TRL logging at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker, get_available_trackers

from rlhf.errors import UserError

TRACKERS = tuple(LOGGER_TYPE_TO_CLASS)  # the names `report_to` accepts
TRACKER_DIR = "tracker"  # trackers that write files (TensorBoard, Aim) write them into <run>/tracker/


def named(value: str) -> list[str]:
    """`report_to` given as a string, read as Hugging Face's TrainingArguments reads it: 'none' is no tracker, 'all'
    every one installed here, anything else the one tracker it names."""
    if value == "none":
        return []
    if value == "all":
        return [t.value for t in get_available_trackers()]
    return [value]


def check(names: list[str]) -> None:
    """`report_to` names known trackers whose packages are installed (checked when the config loads, before any
    run directory exists)."""
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"config key 'report_to': {name!r} is not one of {list(TRACKERS)}")
        if name not in {t.value for t in get_available_trackers()}:  # LoggerType members, not str
            raise UserError(f"config key 'report_to': {name} is not installed here (pip install {name}), or drop it")


def tag(kind: str, key: str) -> str:
    """A row's key as a tracker's tag: the evaluator's and PPO's names already carry a group (`eval/gold`,
    `objective/kl`); bare ones get the row's kind (`train/loss`, `eval/wall_seconds`)."""
    return key if "/" in key else f"{kind}/{key}"


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row, tagged; `kind` and `step` are the row's place, not values."""
    return {
        tag(row["kind"], k): float(v)
        for k, v in row.items()
        if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"ppo": {"learning_rate": 3e-5}}` -> `{"ppo.learning_rate": 3e-5}`; lists as text (trackers' hparams take
    scalars only)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flat_config(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = str(value) if isinstance(value, list) else value
    return flat


def _make(name: str, run_path: Path, project: str, label: str, rewritten_from: int | None) -> GeneralTracker:
    cls = LOGGER_TYPE_TO_CLASS[name]
    if name == "tensorboard":  # a resumed run writes the steps after its checkpoint again: hide the old ones
        return cls(TRACKER_DIR, run_path, **({"purge_step": rewritten_from} if rewritten_from is not None else {}))
    if cls.requires_logging_directory:
        return cls(TRACKER_DIR, run_path)
    if name in ("wandb", "trackio"):  # one project per profile, one tracker run per run directory
        return cls(project, name=label, group=label.split("/")[0])
    if name == "mlflow":
        return cls(experiment_name=project, run_name=label)
    return cls(project)


def open_trackers(
    names: list[str], run_path: Path, profile: str, config: dict[str, Any], rewritten_from: int | None = None
) -> list[GeneralTracker]:
    """Start the trackers `names` for the run at `run_path` (called on the main process only), its config stored
    as the tracker run's hyper-parameters where the tracker keeps them apart from the run directory (whose
    config.yaml sits beside a file-based tracker's files already). A resumed run passes `rewritten_from`, the first
    step it writes again."""
    trackers = []
    label = f"{run_path.parent.name}/{run_path.name}"  # method/run id
    for name in names:
        tracker = _make(name, run_path, f"ppo-vs-dpo-{profile}", label, rewritten_from)
        tracker.start()
        if not tracker.requires_logging_directory:
            tracker.store_init_configuration(flat_config(config))
        trackers.append(tracker)
    return trackers
