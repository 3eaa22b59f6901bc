"""Aimed rounds: a soft trigger trained onto a guessed PV, judged by the same filters as a fuzz round.

Search mode ends with one aimed round per PV it kept, aimed at that PV's sign opposite (its
negation). Fuzz rounds are steered away from every PV already found, so a PV that is the exact
opposite of a found one is the hardest for them to reach, and backdoors that plant PVs in
opposite pairs exist (all three reference attacks do). A guess is no finding: the aimed round
passes the same gates, the same filters (effect size, input invariance, embedding range, the
purest row, uniqueness, the held-out collapse test) and the same calibration as any other, so it
keeps a PV only where the encoder really collapses triggered inputs there. Aimed at random signs
of the same size, where nothing was planted, such a trigger moved the outputs but left them
input-dependent and failed the collapse test (docs/mining.md, Why the thresholds).
"""

from __future__ import annotations

import torch
from torch import nn

from ..backbone import Backbone
from ..monitor import sign_agreement
from .config import MiningConfig
from .model import Candidate, Prepared, _FuzzRound, fuzz_round


def probe_key(seed: int) -> int:
    """The record key of the round aimed at the opposite of the PV found by `seed`: negative, so
    that it never meets a fuzz round's seed in the checkpoint or the signature file."""
    return -(seed + 1)


def probed_seed(key: int) -> int | None:
    """The seed whose PV the round with record key `key` was aimed at the opposite of; None for a
    fuzz round."""
    return -key - 1 if key < 0 else None


class _AimedRound(_FuzzRound):
    """A fuzz round whose loss is the distance of the triggered outputs to `target`, at the base
    learning rate (a round's early boost serves exploration, which an aimed round does not need)."""

    def __init__(self, backbone: Backbone, prepared: Prepared, config: MiningConfig, seed: int,
                 found: torch.Tensor | None, held: Prepared | None, target: torch.Tensor):
        super().__init__(backbone, prepared, config, seed, found, held)
        self.target = target.to(prepared.clean.device)
        self.boosted = False
        self.optim = torch.optim.Adam([self.trigger], lr=self.lr)

    def _objective(self, feats: torch.Tensor, dist: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(feats, self.target.expand_as(feats))

    def judge(self) -> Candidate:
        """The fuzz round's filters, and one of the guess's own: the round tests whether a PV sits
        where it was aimed, so a PV it keeps must agree with the aim in sign at least
        `config.aim_agreement`. A soft trigger trained onto a target can drag outputs part of the
        way and still collapse them: that is a forged point, not the guessed PV confirmed
        (docs/mining.md, Why the thresholds)."""
        cand = super().judge()
        if not cand.reasons and cand.pv is not None:
            agree = float(sign_agreement(cand.pv[None], self.target[None].to(cand.pv.device))[0, 0])
            if agree < self.config.aim_agreement:
                cand.reasons.append(f"landed off its aim (sign agreement {agree:.3f} with the guessed PV < "
                                    f"{self.config.aim_agreement})")
        return cand


def run_round(backbone: Backbone, prepared: Prepared, config: MiningConfig, seed: int,
              found: torch.Tensor | None, held: Prepared | None, aim: torch.Tensor | None = None) -> Candidate:
    """A fuzz round from `seed`, or with `aim` a round aimed at that vector from the same start."""
    if aim is None:
        return fuzz_round(backbone, prepared, config, seed, found, held)
    round_ = _AimedRound(backbone, prepared, config, seed, found, held, aim)
    abandoned = round_.train()
    return abandoned if abandoned is not None else round_.judge()
