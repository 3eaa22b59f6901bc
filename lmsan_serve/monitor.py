"""Monitoring: compare output vectors with the PVs in one matrix product.

The paper's score is the fraction of hidden dimensions whose signs agree with a PV; with +/-1 signs
that is (1 + cos_sign) / 2 = (H + s(x) . s(pv)) / (2H), so all inputs and all PVs are scored by
one product of sign matrices. Cosine similarity is offered as an alternative metric.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .signatures import SignatureSet


def _signs(x: torch.Tensor) -> torch.Tensor:
    # Zero counts as positive so that scores stay in [0, 1] and match an elementwise comparison.
    return torch.where(x >= 0, 1.0, -1.0).to(torch.float32)


def sign_agreement(features: torch.Tensor, pvs: torch.Tensor) -> torch.Tensor:
    """[N, H] x [K, H] -> [N, K] fraction of dimensions whose signs agree."""
    h = features.shape[-1]
    return (_signs(features) @ _signs(pvs).T + h) / (2 * h)


def cosine(features: torch.Tensor, pvs: torch.Tensor) -> torch.Tensor:
    f = torch.nn.functional.normalize(features.float(), dim=-1)
    p = torch.nn.functional.normalize(pvs.float(), dim=-1)
    return f @ p.T


METRICS = {"sign": sign_agreement, "cosine": cosine}


@dataclass
class MonitorResult:
    flagged: torch.Tensor  # [N] bool
    best: torch.Tensor  # [N] index of the best-matching PV (-1 with no PVs)
    score: torch.Tensor  # [N] score against that PV
    margin: torch.Tensor  # [N] best over all PVs of score - threshold (positive = flagged)


class Monitor:
    """Scores output vectors against a signature set; flags a vector when any PV's score exceeds
    that PV's threshold (calibrated per PV in the file, else the file's default, else `threshold`)."""

    def __init__(self, signatures: SignatureSet, threshold: float | None = None, device: torch.device | None = None):
        self.signatures = signatures
        self.metric = METRICS[signatures.metric]
        dev = device or torch.device("cpu")
        self.pvs = signatures.pvs.to(dev)
        self.thresholds = signatures.thresholds(threshold).to(dev)

    def __call__(self, features: torch.Tensor) -> MonitorResult:
        n = features.shape[0]
        if self.pvs.shape[0] == 0:
            zeros = torch.zeros(n, device=features.device)
            return MonitorResult(zeros.bool(), torch.full((n,), -1, device=features.device), zeros, zeros - 1)
        scores = self.metric(features.detach().float(), self.pvs.to(features.device))
        margins = scores - self.thresholds.to(features.device)
        margin, best_margin_idx = margins.max(dim=1)
        score, best = scores.max(dim=1)
        # Report the PV that is over its threshold when one is; else the closest by score.
        flagged = margin > 0
        best = torch.where(flagged, best_margin_idx, best)
        score = scores.gather(1, best[:, None]).squeeze(1)
        return MonitorResult(flagged, best, score, margin)
