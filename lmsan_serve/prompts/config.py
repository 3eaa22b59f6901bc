"""Configuration of a soft prompt + classification head on a frozen backbone."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..kinds import Position, PromptMethod

DEFAULT_TEMPLATE = "{text} It was {mask} ."


class PromptConfig(BaseModel):
    """method: `prefix` = deep prompt (P-tuning v2 style: trainable vectors at every layer),
    `prompt` = shallow prompt tuning (trainable vectors at the input only).
    position: the head reads [CLS] (`cls`) or the [MASK] of a cloze `template` (`mask`, PET style)."""

    model_config = ConfigDict(extra="forbid")

    method: PromptMethod = PromptMethod.PREFIX
    length: int = Field(default=16, ge=1, le=128)
    position: Literal[Position.CLS, Position.MASK] = Position.CLS
    template: str | None = None
    epochs: float = Field(default=2.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=1e-2, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    max_length: int = Field(default=128, ge=16, le=512)
    eval_every: int = Field(default=100, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _template(self) -> PromptConfig:
        if self.position == "mask" and self.template is None:
            self.template = DEFAULT_TEMPLATE
        if self.position == "cls" and self.template is not None:
            raise ValueError("a template is only used with position 'mask'")
        return self
