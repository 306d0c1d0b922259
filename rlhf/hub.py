"""Profiles with `hub_access: true` fetch models and datasets from the Hugging Face hub. Offline, such a profile must
fail at once, naming what it needed, rather than after a long step: `require_hub` runs before any command
does work."""

from __future__ import annotations

from pathlib import Path

from rlhf.config import Config
from rlhf.errors import UserError
from rlhf.models import EMBEDDED_PREFIX, hub_endpoint, hub_reachable
from rlhf.tasks import project_path


def hub_names(cfg: Config) -> dict[str, str]:
    """Config key -> value, for every key whose model or dataset is not on this machine (so must come from the hub)."""
    names = {}
    model = cfg.model.name_or_path
    if not (model.startswith(EMBEDDED_PREFIX) or model == "tiny" or Path(model).expanduser().exists()):
        names["model.name_or_path"] = model
    if cfg.task.gold_model and not Path(cfg.task.gold_model).expanduser().exists():
        names["task.gold_model"] = cfg.task.gold_model
    if cfg.task.path and not project_path(cfg.task.path).exists():
        names["task.path"] = cfg.task.path
    if cfg.sft_stage.enabled and cfg.sft_stage.source == "corpus" and not project_path(cfg.sft_stage.path).exists():
        names["sft_stage.path"] = cfg.sft_stage.path
    return names


def require_hub(cfg: Config) -> None:
    """With hub_access, one probe of the hub before anything starts: unreachable -> one error naming what needs it.
    (Offline profiles never reach the hub: each loader then rejects a name that is not a local path.)"""
    if not cfg.hub_access:
        return
    names = hub_names(cfg)
    if names and not hub_reachable():
        needed = ", ".join(f"{key} '{value}'" for key, value in names.items())
        raise UserError(
            f"the Hugging Face hub ({hub_endpoint()}) is unreachable from this machine, and profile "
            f"'{cfg.profile}' needs it for {needed}: this profile needs network access to the hub "
            "(or point those keys at local copies)"
        )
