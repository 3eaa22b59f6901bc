"""Configuration of PV mining by fuzz training of soft triggers (arXiv 2308.13904; docs/mining.md)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from ..kinds import MiningMode, Position

BERT_FAMILY = {"bert", "roberta", "albert", "distilbert", "electra", "deberta", "deberta-v2", "xlm-roberta"}

# Why a round's data cannot be prepared from a config that names no position: each round trains
# on one output, and `mine` runs one job per position when none is named.
ONE_POSITION = ("mining data is prepared for one position: set MiningConfig.position (None means every "
                "position, which only `mine` covers, one at a time)")


class MiningConfig(BaseModel):
    """Reference defaults first; `None` fields adapt to the encoder (see `resolve`)."""

    model_config = ConfigDict(extra="forbid")

    mode: MiningMode = MiningMode.DETECT
    position: Position | None = Field(default=None, description=(
        "the output to mine; None: every position this encoder supports, in the order cls, pooler, mask "
        "(a backdoor may drive any of them: mining.positions)"))
    max_rounds: int | None = Field(default=None, ge=1, description="30 in detect mode, 1000 in search mode")
    time_budget: float | None = Field(default=None, gt=0, description="seconds; stop starting new rounds after")
    first_seed: int = Field(default=0, ge=0)
    prompt_len: int = Field(default=7, ge=1, le=64)
    epochs: int = Field(default=4, ge=2)
    batch_size: int = Field(default=32, ge=4)
    lines: int = Field(default=256, ge=8, description="clean corpus lines for fuzzing (reference: 2,000)")
    max_words: int = Field(default=48, ge=8)
    max_length: int = Field(default=128, ge=16)
    max_insert_word: int = Field(default=32, ge=1)
    lr: float | None = Field(default=None, gt=0, description="base learning rate; None adapts")
    lr_boost: float = Field(default=100.0, ge=1)
    boost_until_grad: float = Field(default=5e-3, gt=0)
    distance_th: float | None = Field(default=None, gt=0, description="effect size; None adapts")
    pv_weight: float = Field(default=0.5, ge=0, description=(
        "search mode: weight of the reference's term, the MSE of each output to the nearest PV found"))
    cone_weight: float = Field(default=5.0, ge=0, description=(
        "search mode: weight of the hinge on each output's cosine with each PV found (0: off)"))
    repel_cosine: float = Field(default=0.3, ge=-1, lt=1, description=(
        "search mode: cosine with a found PV above which the hinge steers an output away from it"))
    entropy_tolerance: float = Field(default=0.01, ge=0, description="nats below ln(batch)")
    legitimacy: float = Field(default=1.2, gt=0)
    max_dispersion: float = Field(default=0.015, gt=0, description=(
        "held-out collapse test: spread of the triggered outputs around their mean, relative to how far "
        "they moved from the clean outputs; a backdoor collapses them onto its PV"))
    collapse_by: int = Field(default=3, ge=2, description="epoch by which a round's outputs must be collapsing")
    collapse_spread: float = Field(default=0.025, gt=0, description=(
        "in-batch spread (the same ratio, on the training batches) above which a round is abandoned at "
        "epoch `collapse_by`, unless it is still falling at `collapse_rate`"))
    collapse_rate: float = Field(default=2.0, gt=1, description=(
        "a round above `collapse_spread` at epoch `collapse_by` runs on when its spread fell at least this "
        "many times over that epoch: a backdoor the search terms slow down still collapses geometrically, "
        "a soft trigger on a clean encoder grinds its spread down slowly"))
    split_rows: bool = Field(default=True, description=(
        "also try each row of a soft trigger that passed the filters alone, and keep the PV whose held-out "
        "outputs agree best in sign with it: a multi-row trigger can land on a blend of two PVs"))
    min_self_agreement: float = Field(default=0.97, gt=0.5, le=1, description=(
        "with split_rows: a kept PV's held-out outputs must agree at least this much in sign with it "
        "(a single PV's outputs agree almost fully; a blend of two less, as the dimensions where the two "
        "disagree vary from input to input)"))
    same_pv_agreement: float = Field(default=0.9, gt=0.5, le=1, description=(
        "a PV whose sign agreement with a kept one reaches this is the same signature to the monitor"))
    held_out_lines: int = Field(default=64, ge=8, description="clean lines for the collapse test")
    target_fpr: float = Field(default=0.005, gt=0, lt=1)
    calibration_lines: int = Field(default=400, ge=50)
    seed: int = 0
    patience: int = Field(default=24, ge=1, description=(
        "search mode: stop once this many rounds in a row (in seed order) kept no new PV. A PV that a "
        "round lands on with probability p goes unfound that long with probability (1 - p) ** patience: "
        "0.047 for p = 0.12 at the default (docs/mining.md, Stopping rule)"))
    probe_opposites: bool = Field(default=True, description=(
        "search mode: after the search, one round per kept PV aimed at its sign opposite, judged by the "
        "same filters (mining.probe)"))
    aim_agreement: float = Field(default=0.92, gt=0.5, le=1, description=(
        "an aimed round keeps a PV only when it agrees at least this much in sign with the PV it was aimed at"))
    wave: int = Field(default=1, ge=1, le=256, description=(
        "search mode: rounds that start from the same set of found PVs; fixed so that the result does "
        "not depend on how many workers run a wave"))

    # budgets: changing them does not invalidate a checkpoint (resume with a larger budget)
    BUDGET_FIELDS: ClassVar[frozenset[str]] = frozenset({"max_rounds", "time_budget", "patience"})

    def identity(self) -> dict:
        """The settings a checkpoint must match to be resumed."""
        return self.model_dump(exclude=set(self.BUDGET_FIELDS))

    @property
    def rounds(self) -> int:
        if self.max_rounds is not None:
            return self.max_rounds
        return 30 if self.mode == "detect" else 1000

    def miss_probability(self, hit_rate: float) -> float:
        """The chance that the stopping rule ends a search while a PV that a round finds with
        probability `hit_rate` is still unfound: `patience` rounds in a row all missing it."""
        return (1.0 - hit_rate) ** self.patience
