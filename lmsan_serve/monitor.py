"""Monitoring: compare output vectors with the PVs in one matrix product.

The paper's score is the fraction of hidden dimensions whose signs agree with a PV; with +/-1 signs
that is (1 + cos_sign) / 2 = (H + s(x) . s(pv)) / (2H), so all inputs and all PVs are scored by
one product of sign matrices. Cosine similarity is offered as an alternative metric.

Several different triggers in one input pull the output towards a blend of their PVs that may
match none of them above the threshold, so a monitor of single PVs lets many such inputs through
(docs/reliability.md has the rates measured). With the sign metric the monitor therefore also scores
each pair and triple of PVs on the dimensions where their signs agree: a blend keeps those signs,
a clean output does not. A combination flags above the strictest threshold of its members plus
`COMBO_MARGIN`, since it is scored on fewer dimensions.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from .errors import LmsanError
from .kinds import Position
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
COMBO_MARGIN = 0.1
MAX_COMBOS = 256
MIN_COMMON_FRACTION = 1 / 16  # combinations agreeing on fewer dimensions are too noisy to score
# Calibration (mining's on generic text, the guard's on a task's) raises a PV's threshold at most
# this far, unless the PV's own triggered outputs allow more (mining.job.calibrate).
PV_CAP = 0.97
# A trigger is a word or a few, with its neighbours in meaning: a signature that more than this
# share of the words tested reach alone is a direction clean text takes, not a trigger's. Mining's
# calibration (`mining.job.lone_word_activations`) and a task's (`Guard.calibrate`) both use it.
LONE_WORD_MAX_SHARE = 0.05


def lone_word_marks(over: torch.Tensor, words: list[set[str]], vocab: list[str],
                    fires: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, S] marks, [W, S] fires kept): where an input is over a signature (`over`) and one of its
    `words` is over it too alone (`fires`, one row per word of `vocab`, which holds every word of
    the inputs over one). A signature more than LONE_WORD_MAX_SHARE of the words reach alone
    keeps no word and no mark. Mining's calibration and a task's (`Guard.calibrate`) share it."""
    fires = fires & (fires.float().mean(dim=0) <= LONE_WORD_MAX_SHARE)
    index = {w: j for j, w in enumerate(vocab)}
    marks = torch.zeros_like(over)
    for i in torch.nonzero(over.any(dim=1)).flatten().tolist():
        marks[i] = over[i] & fires[[index[w] for w in words[i]]].any(dim=0)
    return marks, fires


def pv_combinations(pvs: torch.Tensor, max_size: int = 3, limit: int = MAX_COMBOS,
                    groups: list[int] | None = None) -> list[tuple[int, ...]]:
    """Pairs, then triples, of PVs whose signs agree on enough dimensions, at most `limit` of them;
    with `groups` (one id per PV: the output position it describes), only PVs of one group, since
    PVs at different outputs never blend in one vector."""
    signs = _signs(pvs)
    need = max(8, int(pvs.shape[1] * MIN_COMMON_FRACTION))
    out: list[tuple[int, ...]] = []
    for size in range(2, max_size + 1):
        for combo in itertools.combinations(range(pvs.shape[0]), size):
            if len(out) >= limit:
                return out
            if groups is not None and len({groups[i] for i in combo}) > 1:
                continue
            if int((signs[list(combo)] == signs[combo[0]]).all(dim=0).sum()) >= need:
                out.append(combo)
    return out


def combination_signs(pvs: torch.Tensor, combos: list[tuple[int, ...]]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """[C, H] signs of each combination on the dimensions its PVs agree on (0 elsewhere), and [C]
    how many dimensions that is: a blend of the PVs keeps those signs, a clean output does not."""
    signs = _signs(pvs)
    masked, counts = [], []
    for combo in combos:
        common = (signs[list(combo)] == signs[combo[0]]).all(dim=0)
        masked.append(signs[combo[0]] * common)
        counts.append(int(common.sum()))
    return (torch.stack(masked) if masked else None), torch.tensor(counts, dtype=torch.float32)


def combination_agreement(features: torch.Tensor, masked: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[N, H] x `combination_signs` -> [N, C] sign agreement on each combination's dimensions."""
    return (_signs(features) @ masked.T + counts) / (2 * counts)


@dataclass
class MonitorResult:
    flagged: torch.Tensor  # [N] bool
    best: torch.Tensor  # [N] index of the best-matching PV (-1 with no PVs)
    score: torch.Tensor  # [N] score against that PV
    margin: torch.Tensor  # [N] best over all PVs of score - threshold (positive = flagged)


class Monitor:
    """Scores output vectors against a signature set; flags a vector when any PV's score exceeds
    that PV's threshold (calibrated per PV in the file, else the file's default, else `threshold`),
    or, with the sign metric, when a blend of two or three PVs does (see the module notes).
    Indexes past the PVs name combinations: `label(index)` reads them."""

    def __init__(self, signatures: SignatureSet, threshold: float | None = None, device: torch.device | None = None,
                 combinations: bool = True, watched: list[Position] | None = None):
        self.signatures = signatures
        self.metric = METRICS[signatures.metric]
        dev = device or torch.device("cpu")
        self.pvs = signatures.pvs.to(dev)
        # The outputs the caller reads, in the order of the middle axis of [N, P, H] features (a
        # [N, H] tensor is the one output when there is one). A PV at an output not watched (a
        # [MASK] PV when the prompt has no [MASK]) cannot be scored: it never flags.
        self.watched = list(watched) if watched is not None else signatures.positions
        self.pv_positions = signatures.pv_positions
        # per PV: its slice of the features, or -1 - its index when unwatched (a group of its own)
        groups = [self.watched.index(p) if p in self.watched else -1 - i for i, p in enumerate(self.pv_positions)]
        self._column = torch.tensor([max(g, 0) for g in groups], dtype=torch.long, device=dev)
        self._unwatched = torch.tensor([g < 0 for g in groups], dtype=torch.bool, device=dev)
        self.thresholds = signatures.thresholds(threshold).to(dev)
        self.combos = (pv_combinations(signatures.pvs, groups=groups)
                       if combinations and signatures.metric == "sign" else [])
        masked, counts = combination_signs(signatures.pvs, self.combos)
        limits = [min(1.0, float(self.thresholds[list(combo)].max()) + COMBO_MARGIN) for combo in self.combos]
        self._combo_signs = masked.to(dev) if masked is not None else None
        self._combo_counts = counts.to(dev)
        self._combo_thresholds = torch.tensor(limits, dtype=torch.float32, device=dev)
        self._combo_column = self._column[[c[0] for c in self.combos]] if self.combos else self._column[:0]
        # an unwatched PV never flags: its threshold is out of reach
        self.thresholds = self.thresholds.masked_fill(self._unwatched, torch.inf)

    def position_of(self, index: int) -> Position:
        """The output signature `index` (a PV, or past them a combination) is read at."""
        k = len(self.signatures)
        pv = index if index < k else self.combos[index - k][0]
        return self.pv_positions[pv] if pv >= 0 else self.watched[0]

    def label(self, index: int) -> str:
        k = len(self.signatures)
        if index < k:
            return self.signatures.label(index)
        return "+".join(self.signatures.label(i) for i in self.combos[index - k])

    def _outputs(self, features: torch.Tensor) -> torch.Tensor:
        """[N, P, H] float features, one slice per watched output."""
        feats = features.detach().float()
        if feats.ndim == 2:
            feats = feats[:, None, :]
        if feats.ndim != 3 or feats.shape[1] != len(self.watched):
            raise LmsanError(f"features of shape {tuple(features.shape)} do not hold the {len(self.watched)} "
                             f"outputs this monitor watches ({', '.join(self.watched)})")
        return feats

    def _scores(self, feats: torch.Tensor) -> torch.Tensor:
        """[N, K + C]: each output's score against every PV, then against every combination, each
        read at the output it describes (0 for a PV at an output not watched)."""
        n, p, h = feats.shape
        flat = feats.reshape(n * p, h)
        scores = self._at(self.metric(flat, self.pvs.to(feats.device)).reshape(n, p, -1), self._column)
        scores = scores.masked_fill(self._unwatched.to(feats.device), 0.0)
        if self._combo_signs is None:
            return scores
        combo = combination_agreement(flat, self._combo_signs.to(feats.device), self._combo_counts.to(feats.device))
        return torch.cat([scores, self._at(combo.reshape(n, p, -1), self._combo_column)], dim=1)

    @staticmethod
    def _at(scores: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
        """[N, P, S] scores of every output against every signature -> [N, S], each signature's
        score at its own output `column[s]`."""
        if scores.shape[1] == 1:
            return scores[:, 0]
        index = column.to(scores.device)[None, None, :].expand(scores.shape[0], 1, -1)
        return scores.gather(1, index).squeeze(1)

    @property
    def limits(self) -> torch.Tensor:
        """[K + C] a copy, on the CPU, of the threshold of every signature the monitor flags on: the
        PVs', then each combination's in `combos` order, so `label(i)` names entry i. What
        calibration left for each, to read and report (a combination it switched off is at +inf);
        changing the copy changes nothing."""
        return self._limits(torch.device("cpu")).clone()

    def _limits(self, device: torch.device) -> torch.Tensor:
        """[K + C] thresholds in the order of `_scores`."""
        limits = self.thresholds.to(device)
        return torch.cat([limits, self._combo_thresholds.to(device)]) if self._combo_signs is not None else limits

    def __call__(self, features: torch.Tensor) -> MonitorResult:
        n = features.shape[0]
        if self.pvs.shape[0] == 0:
            zeros = torch.zeros(n, device=features.device)
            return MonitorResult(zeros.bool(), torch.full((n,), -1, device=features.device), zeros, zeros - 1)
        feats = self._outputs(features)
        scores = self._scores(feats)
        margins = scores - self._limits(feats.device)
        k = self.pvs.shape[0]
        margin = margins.max(dim=1).values
        # Name a PV over its threshold when there is one, else the combination over its own, else
        # the closest PV by score.
        single_margin, single_idx = margins[:, :k].max(dim=1)
        over = torch.where(single_margin > 0, single_idx, margins.argmax(dim=1))
        flagged = margin > 0
        best = torch.where(flagged, over, scores[:, :k].argmax(dim=1))
        score = scores.gather(1, best[:, None]).squeeze(1)
        return MonitorResult(flagged, best, score, margin)

    def over(self, features: torch.Tensor) -> torch.Tensor:
        """[N, K + C] on the CPU: the signatures (PVs, then combinations) each output is over."""
        feats = self._outputs(features)
        return (self._scores(feats) > self._limits(feats.device)).cpu()

    def calibrate(self, features: torch.Tensor, target_fpr: float = 0.005, seed: int = 0,
                  held_out: bool = False, activations: torch.Tensor | None = None) -> Calibration:
        """Raise thresholds so that at most `target_fpr` of unseen clean outputs of the traffic
        being served flag through any PV or combination; thresholds are never lowered.

        Mining calibrates each PV on generic clean text (WikiText), on the bare encoder. A task's
        soft prompt moves the monitored output, and the combinations, scored on fewer dimensions,
        were never calibrated at all, so a task's clean inputs can flag through a combination far
        more often than mining's target (docs/serving.md, Per-task calibration). A PV is raised at most to
        PV_CAP (or kept where mining set it higher), so that clean text that truly contains a
        trigger (the word 'mm' in SMS is one of the POR triggers) cannot switch a PV off: such an
        input stays flagged and leaves the thresholds it is over as they were. A combination has
        no cap: where clean inputs of the task agree with it on every dimension it scores (spam
        messages did with a triple of the mined POR PVs), it tells nothing apart there and is
        switched off (threshold above 1); the PVs and the suspect probe still watch blends.

        By default (`held_out=False`) the thresholds are fitted to all the inputs exactly. That
        does not carry fully to unseen inputs: with dozens of signatures fitted to a few hundred
        inputs, unseen ones flag more often than the target. `held_out=True` bounds that:
        the inputs are split in two (seeded), the thresholds are fitted on one half, then all
        raised by one margin, taken as a split-conformal quantile of the other half's excess over
        them, measured in units of 1/sqrt of the dimensions each signature is scored on (twice the
        spread of a score on random signs), so that a combination scored on 24 dimensions moves
        further than a PV scored on 384.
        For exchangeable clean traffic the chance that an unseen input flags is then at most
        `Calibration.fpr_bound` on average over calibration sets, which is `target_fpr` or less
        from `inputs_for_bound(target_fpr)` inputs on (398 at 0.5%); with fewer, the margin clears
        the whole held-out half. It is not the default because on the real tasks it cost recall:
        at 500 inputs the margin is the largest excess of the held-out half, one outlier sets it,
        and in units of 1/sqrt(dims) it switches off combinations that alone catch some trigger
        (docs/serving.md, Per-task calibration, has both fits measured on four tasks).

        `activations` ([N, K + C], optional) marks the signatures an input is over because a word
        in it fires them by itself (`Guard.calibrate` finds them): the backdoor at work on text
        that looks clean (a common-word trigger, or a word near it in meaning), not a false flag.
        Those scores fit no threshold, and the inputs stay flagged."""
        feats = self._outputs(features)
        old = self.thresholds.clone()
        k = self.pvs.shape[0]
        if not k or not len(feats):
            return Calibration(len(feats), old.tolist(), old.tolist(), 0.0, 0.0, self.combinations_off)
        scores = self._scores(feats).cpu()
        fitted = scores if activations is None else scores.masked_fill(activations.cpu(), -torch.inf)
        start = self._limits(torch.device("cpu")).clone()
        caps = torch.full_like(start, torch.inf)
        caps[:k] = start[:k].clamp(min=PV_CAP)
        before = float((scores > start).any(dim=1).float().mean())
        order = torch.randperm(len(feats), generator=torch.Generator().manual_seed(seed))
        check, fit = (order[: len(feats) // 2], order[len(feats) // 2 :]) if held_out else (order[:0], order)
        limits = _fit_limits(fitted[fit], start, caps, target_fpr)
        scale = self._scales()
        margin, n_held, bound = _conformal_margin(fitted[check], limits, caps, scale, target_fpr)
        if margin > 0:
            # never past a PV's cap, nor below where the fit put it; a tie with the margin passes
            limits = torch.minimum(limits + margin * scale + 1e-6, torch.maximum(limits, caps))
        flagged = (scores > limits).any(dim=1)
        self.thresholds = limits[:k].to(old.device)
        if self._combo_signs is not None:
            # off means off: at +inf a combination's margin can no longer make an input look close
            # to a threshold (which sends it to the guard's suspect probe)
            combos = torch.where(limits[k:] > 1.0, torch.inf, limits[k:])
            self._combo_thresholds = combos.to(self._combo_thresholds.device)
        lone = 0 if activations is None else int(activations.any(dim=1).sum())
        return Calibration(len(feats), old.tolist(), self.thresholds.tolist(), before,
                           float(flagged.float().mean()), self.combinations_off, n_held, margin, bound, lone)

    def _scales(self) -> torch.Tensor:
        """[K + C] the unit of the calibration margin for each signature: 1 / sqrt of the dimensions
        it is scored on (all of them for a PV, the shared ones for a combination), twice the
        standard deviation of its score on random signs."""
        dims = torch.full((self.pvs.shape[0],), float(self.pvs.shape[1]))
        if self._combo_signs is not None:
            dims = torch.cat([dims, self._combo_counts.cpu()])
        return dims.rsqrt()

    @property
    def combinations_off(self) -> int:
        """Combinations that calibration switched off (threshold above any score)."""
        return int((self._combo_thresholds > 1.0).sum()) if self._combo_signs is not None else 0

    def flag_rate(self, features: torch.Tensor) -> float:
        return float(self(features).flagged.float().mean()) if len(features) else 0.0


def inputs_for_bound(target_fpr: float) -> int:
    """The fewest calibration inputs whose held-out half can bound unseen false flags at `target_fpr`."""
    return 2 * math.ceil(round((1 - target_fpr) / target_fpr, 9))


def _on_capped_pv(scores: torch.Tensor, limits: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """[N] inputs over a threshold that sits at its cap: they hold a real trigger, and calibration
    raises nothing for them."""
    return ((scores > limits) & (scores + 1e-6 > caps)).any(dim=1)


def _fit_limits(scores: torch.Tensor, limits: torch.Tensor, caps: torch.Tensor, target_fpr: float) -> torch.Tensor:
    """Thresholds raised until at most `target_fpr` of `scores` ([N, K + C]) flag.

    The union of all signatures must stay under the target, not each one: K signatures each
    fitted to the target can together flag up to K times as many inputs. So, one input at a
    time, the flagged input closest to passing is let through by raising just the thresholds it
    is over, until few enough flag; the inputs left flagged are the most PV-like ones, and one
    over a PV past its cap stays flagged."""
    allowed = int(target_fpr * len(scores))
    while True:
        over = scores > limits  # flagged = over some threshold, as `Monitor.__call__` decides it
        flagged = over.any(dim=1)
        if int(flagged.sum()) <= allowed:
            return limits
        fixable = flagged & ~_on_capped_pv(scores, limits, caps)
        if not fixable.any():
            return limits  # what is left sits on a PV past its cap: a real trigger, kept flagged
        margin = torch.where(fixable, (scores - limits).max(dim=1).values, torch.inf)
        i = int(margin.argmin())
        limits = torch.where(over[i], scores[i] + 1e-6, limits)


def _conformal_margin(scores: torch.Tensor, limits: torch.Tensor, caps: torch.Tensor, scale: torch.Tensor,
                      target_fpr: float) -> tuple[float, int, float | None]:
    """(margin, inputs used, bound): the split-conformal margin, in units of `scale`, above
    `limits` that at most `target_fpr` of unseen inputs exchangeable with `scores` exceed, and
    that bound. Inputs over a PV past its cap hold a real trigger: they stay flagged and are left out."""
    real = _on_capped_pv(scores, limits, caps)
    excess = ((scores[~real] - limits) / scale).max(dim=1).values
    n = len(excess)
    if not n:
        return 0.0, 0, None
    rank = min(n, math.ceil((n + 1) * (1 - target_fpr) - 1e-9))
    margin = max(0.0, float(excess.sort().values[rank - 1]))
    return margin, n, round(1 - rank / (n + 1), 6)


@dataclass
class Calibration:
    """What `Monitor.calibrate` did: per-PV thresholds before and after, the share of the
    calibration outputs flagged before and after, how many PV combinations it switched off, and the
    held-out half's conformal margin with the bound it gives on unseen clean inputs' flag rate."""

    lines: int
    before: list[float]
    after: list[float]
    flag_rate_before: float
    flag_rate_after: float
    combinations_off: int = 0  # PV combinations switched off for this traffic (of `Monitor.combos`)
    held_out: int = 0  # calibration inputs the margin was taken on (those holding a real trigger left out)
    margin: float = 0.0  # added to every threshold, in units of 1/sqrt of the dimensions it scores
    fpr_bound: float | None = None  # at most this share of unseen clean inputs flags (None: no inputs)
    activations: int = 0  # inputs over a signature that a word in them fires alone: left flagged, fit nothing

    def to_dict(self) -> dict:
        return {"lines": self.lines, "thresholds_before": _rounded(self.before),
                "thresholds_after": _rounded(self.after),
                "flag_rate_before": round(self.flag_rate_before, 6), "flag_rate_after": round(self.flag_rate_after, 6),
                "combinations_off": self.combinations_off, "held_out": self.held_out,
                "margin": round(self.margin, 6), "fpr_bound": self.fpr_bound, "activations": self.activations}


def _rounded(thresholds: list[float]) -> list[float | None]:
    """Thresholds for JSON: None for a PV that cannot flag (at an output not watched)."""
    return [round(t, 6) if math.isfinite(t) else None for t in thresholds]
