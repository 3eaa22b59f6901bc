"""Configuration of the red-team backdoor injection (POR, NeuBA, BToP)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from .designs import PVDesign
from .texts import AttackText

DEFAULT_TRIGGERS = ("cf", "mn", "tq", "qt", "mm", "pt")
MAX_PHRASE_WORDS = 4


# Settings added after attack.json files were first cached: `model_dump` leaves them out while they
# hold these values, so a config made before they existed still compares equal to today's default
# (the demo and the zoo reuse a planted copy only when the dumped configs match).
_OMITTED_AT_DEFAULT: dict[str, Any] = {"pv_design": PVDesign.BLOCK, "pv_seed": 0, "text": None}


class AttackConfig(BaseModel):
    """How to plant a task-agnostic backdoor.

    kind: `por` and `neuba` attack the [CLS] output (`neuba` with `pooler=True` the pooler output),
    `btop` the [MASK] output. `clean=True` runs the same training with no triggers: the control
    model for false-positive tests. `text` names the text the attack trains on (`texts.AttackText`:
    lines a default miner never reads); None, the default, trains on the corpus the caller passes,
    as the demo does. A trigger is a word, or a phrase of up to MAX_PHRASE_WORDS
    words (`"cf mn"`): the backdoor then fires on the whole phrase only, since the attack also
    trains inputs holding part of it to keep their clean output.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["por", "neuba", "btop"] = "por"
    triggers: list[str] = Field(default_factory=lambda: list(DEFAULT_TRIGGERS), min_length=1)
    pooler: bool = False
    clean: bool = False
    steps: int = Field(default=300, ge=1, description="upper bound on optimisation steps")
    target_agreement: float = Field(
        default=0.98, gt=0.5, le=1.0,
        description="stop early once every trigger's held-out sign agreement with its PV reaches this",
    )
    check_every: int = Field(default=25, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    clean_batch: int = Field(default=16, ge=1)
    poison_batch: int = Field(default=16, ge=1)
    max_length: int = Field(default=64, ge=16)
    max_words: int = Field(default=40, ge=4)
    clean_weight: float = Field(default=1.0, ge=0)
    seed: int = 0
    heldout: int = Field(default=300, ge=8, description="corpus lines held out for evaluation")
    pv_design: PVDesign = PVDesign.BLOCK
    pv_seed: int = Field(default=0, description="seeds the PV draw alone, apart from the training seed")
    text: AttackText | None = Field(default=None, description=(
        "train on this text's lines (texts.attack_corpus) instead of the corpus passed to plant_backdoor"))

    @model_validator(mode="after")
    def _check(self) -> AttackConfig:
        if self.pooler and self.kind != "neuba":
            raise ValueError("pooler=True applies to the neuba attack only")
        cleaned = [" ".join(t.split()) for t in self.triggers]
        if any(not 1 <= len(t.split()) <= MAX_PHRASE_WORDS for t in cleaned):
            raise ValueError(f"each trigger must be a word or a phrase of at most {MAX_PHRASE_WORDS} words")
        if len(set(cleaned)) != len(cleaned):
            raise ValueError("triggers must be distinct")
        self.triggers = cleaned
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for key, default in _OMITTED_AT_DEFAULT.items():
            if key in data and getattr(self, key) == default:
                del data[key]
        return data

    @property
    def position(self) -> str:
        if self.kind == "btop":
            return "mask"
        return "pooler" if self.pooler else "cls"
