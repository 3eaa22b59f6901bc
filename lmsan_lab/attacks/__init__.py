"""Red-team attacks that plant task-agnostic backdoors: POR, NeuBA, BToP.

Each name loads its module on first use: the CLI offers `PVDesign`'s values as choices while it
builds its parser, and that must not import pydantic (the settings) or torch (the training).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import DEFAULT_TRIGGERS, AttackConfig
    from .designs import PVDesign
    from .model import AttackResult, block_pvs, evaluate_backdoor, make_pvs, plant_backdoor, save_attacked

_HOME = {
    "DEFAULT_TRIGGERS": "config",
    "AttackConfig": "config",
    "PVDesign": "designs",
    **dict.fromkeys(
        ("AttackResult", "block_pvs", "evaluate_backdoor", "make_pvs", "plant_backdoor", "save_attacked"), "model"
    ),
}

__all__ = [
    "DEFAULT_TRIGGERS",
    "AttackConfig",
    "AttackResult",
    "PVDesign",
    "block_pvs",
    "evaluate_backdoor",
    "make_pvs",
    "plant_backdoor",
    "save_attacked",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_HOME[name]}", __name__), name)
