"""Orchestration only, the top floor: the command line, the stage runners and the bench. Nothing imports it."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def named(function: str) -> Callable:
    """The function "module:function" names (an entry, a FLOPs estimate or a sweep knob of rlhf/methods.py, a tool of
    the command line), its module imported now: the table at the foundation names what it cannot import, and a
    command imports only what it runs."""
    module, name = function.split(":")
    return getattr(importlib.import_module(module), name)
