"""Red-team attacks that plant task-agnostic backdoors: POR, NeuBA, BToP."""

from .config import DEFAULT_TRIGGERS, AttackConfig
from .model import AttackResult, block_pvs, evaluate_backdoor, plant_backdoor, save_attacked

__all__ = [
    "DEFAULT_TRIGGERS",
    "AttackConfig",
    "AttackResult",
    "block_pvs",
    "evaluate_backdoor",
    "plant_backdoor",
    "save_attacked",
]
