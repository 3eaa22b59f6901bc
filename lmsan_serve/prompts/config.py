"""Configuration of a soft prompt + classification head on a frozen backbone."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..kinds import Position, PromptLayout, PromptMethod

DEFAULT_TEMPLATE = "{text} It was {mask} ."


class PromptConfig(BaseModel):
    """method: `prefix` = deep prompt (P-tuning v2 style: trainable vectors at every layer),
    `prompt` = shallow prompt tuning (trainable vectors at the input only).
    position: the head reads the first token (`cls`), the pooler over it (`pooler`, as BERT's own
    sequence classifier does) or the [MASK] of a cloze `template` (`mask`, PET style).
    layout: `after_cls` keeps [CLS] first with the slots after it; `over_cls` (peft's layout, for
    imported prompts) puts the slots first and [CLS] after them, so the prompt tensor holds
    `length + 1` states per layer, [CLS]'s own included, and the first token the head reads is
    the first slot. The default keeps every prompt saved before the field existed loading as it was."""

    model_config = ConfigDict(extra="forbid")

    method: PromptMethod = PromptMethod.PREFIX
    length: int = Field(default=16, ge=1, le=128)
    position: Literal[Position.CLS, Position.POOLER, Position.MASK] = Position.CLS
    layout: PromptLayout = PromptLayout.AFTER_CLS
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
        if self.position != Position.MASK and self.template is not None:
            raise ValueError("a template is only used with position 'mask'")
        # A deep prompt would overwrite [CLS] at every layer's input, so its output would no longer
        # be the encoder's own reading of the text, which is what the monitor compares with the PVs.
        if self.layout == PromptLayout.OVER_CLS and self.method != PromptMethod.PROMPT:
            raise ValueError("layout 'over_cls' needs method 'prompt' (a shallow prompt)")
        return self

    @property
    def slots(self) -> int:
        """States per layer in the prompt tensor: the slots, plus [CLS] under `over_cls`."""
        return self.length + (1 if self.layout == PromptLayout.OVER_CLS else 0)

    @property
    def cls_index(self) -> int:
        """Token index of [CLS] in a prompted pass: 0, or after the slots under `over_cls`."""
        return self.length if self.layout == PromptLayout.OVER_CLS else 0
