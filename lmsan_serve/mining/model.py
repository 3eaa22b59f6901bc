"""Fuzz training of continuous soft triggers that inverts predefined vectors (LMSanitator, arXiv
2308.13904, section "PV mining").

One round = one seed: a soft trigger of `prompt_len` embedding rows is spliced into every clean
line at a random word position and trained (the encoder frozen) to push the monitored output away
from the clean output, to make it the same for every input, and away from PVs already found. A
backdoored encoder has such a trigger-independent output (the PV); a clean one does not. Fixed
relative to the reference code: any device, a vectorised splice, dynamic padding, a fresh
optimiser per seed, the absolute gradient in the learning-rate rule, the entropy test normalised
by ln(batch) with ragged batches dropped.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..backbone import Backbone
from ..data import clip_words, insert_trigger
from ..encoding import encode
from ..errors import LmsanError
from ..monitor import combination_agreement, combination_signs, pv_combinations, sign_agreement
from .config import ONE_POSITION, MiningConfig

# Calibration may raise a PV's threshold past 0.97 only while it still flags all but this share of
# the held-out outputs of the soft trigger that found it.
FLOOR_QUANTILE = 0.05


@dataclass
class Candidate:
    seed: int
    pv: torch.Tensor | None  # mean triggered output of the final batch, None when abandoned
    distance: float  # epoch-mean MSE between triggered and clean outputs (last epoch run)
    entropy_ratio: float  # epoch-mean entropy across the batch / ln(batch), last epoch
    legit: bool  # every trigger entry within `legitimacy` x the embedding range
    epochs: int
    seconds: float
    reasons: list[str] = field(default_factory=list)  # filters failed; empty = kept
    trigger: torch.Tensor | None = None  # the trained soft trigger [prompt_len, E] (not checkpointed)
    dispersion: float | None = None  # held-out collapse statistic (see `collapse`)
    row: int | None = None  # the trigger row whose PV was kept alone (see `purest`), None: all rows
    self_agreement: float | None = None  # mean sign agreement of its held-out outputs with the PV
    floor: float | None = None  # the FLOOR_QUANTILE quantile of that agreement (see `calibrate`)
    trace: list[tuple[float, float]] = field(default_factory=list)  # per epoch: distance, batch spread ratio


@dataclass
class Prepared:
    """Clean lines tokenized once, with their clean outputs and insertion points."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None
    monitor_index: torch.Tensor
    word_starts: list[list[int]]  # token index where each word starts, plus the end of the text
    clean: torch.Tensor  # [N, H]
    scale: float  # mean squared clean output entry: the yardstick for distances


def word_starts(units: Sequence[int | None]) -> list[int]:
    """Token index where each word starts, plus the end of the text, from per-token word ids (None, <0: none)."""
    def word(i: int) -> bool:
        return units[i] is not None and units[i] >= 0

    first = [i for i in range(len(units)) if word(i) and (i == 0 or units[i - 1] != units[i])]
    last = max((i for i in range(len(units)) if word(i)), default=0)
    return first + [last + 1]


def prepare(backbone: Backbone, lines: list[str], config: MiningConfig) -> Prepared:
    if why := backbone.supports_position(config.position) if config.position is not None else ONE_POSITION:
        raise LmsanError(why)
    if len(lines) < config.batch_size:
        raise LmsanError(f"corpus has {len(lines)} usable lines, need at least the batch size {config.batch_size}")
    rng = random.Random(config.seed)
    lines = [clip_words(line, config.max_words) for line in lines]
    if config.position == "mask":
        lines = [insert_trigger(line, backbone.tokenizer.mask_token, rng) for line in lines]
    batch = encode(backbone.tokenizer, lines, max_length=config.max_length - config.prompt_len)
    if config.position == "mask":
        is_mask = batch.input_ids == backbone.tokenizer.mask_token_id
        batch.monitor_index = is_mask.int().argmax(dim=1)
    starts = [word_starts(batch.units[row].tolist()) for row in range(len(batch))]
    batch.to(backbone.device)
    with torch.no_grad():
        clean = []
        for s in range(0, len(batch), 64):
            sl = slice(s, s + 64)
            tti = batch.token_type_ids[sl] if batch.token_type_ids is not None else None
            hidden = backbone.encode_hidden(batch.input_ids[sl], batch.attention_mask[sl], tti)
            clean.append(backbone.select(hidden, config.position, batch.monitor_index[sl]))
        clean_t = torch.cat(clean)
    return Prepared(batch.input_ids, batch.attention_mask, batch.token_type_ids, batch.monitor_index, starts,
                    clean_t, float(clean_t.pow(2).mean()))


def resolved_lr(backbone: Backbone, config: MiningConfig) -> float:
    """A fixed rate suits one embedding scale only: Adam steps are about lr per entry, so a rate
    tuned for bert-base barely moves triggers on an encoder with smaller embeddings. So lr is a
    share of the spread of the embedding matrix, large enough that a trigger reaches a PV before
    the epoch-2 gate even with the find-new term pulling it away from kept ones (docs/mining.md,
    Why the thresholds)."""
    if config.lr is not None:
        return config.lr
    emb = backbone.model.get_input_embeddings().weight
    return float(emb.std()) * 3e-2


def resolved_distance(prepared: Prepared, config: MiningConfig) -> float:
    """The reference uses 0.1 (0.2 for BERT-family) in absolute units; outputs of small encoders
    are far smaller, so measure the effect against the mean squared clean output."""
    if config.distance_th is not None:
        return config.distance_th
    return 0.5 * prepared.scale


def splice(embeds: torch.Tensor, trigger: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """Insert `trigger` [n, E] into each row of `embeds` [B, L, E] before token index `at[b]`, in
    one gather for the whole batch (the reference splices one sample at a time)."""
    b, length, e = embeds.shape
    n = trigger.shape[0]
    j = torch.arange(length + n, device=embeds.device)[None, :].expand(b, -1)
    k = at[:, None]
    src = torch.where(j < k, j, torch.where(j < k + n, length + (j - k), j - n))
    pool = torch.cat([embeds, trigger[None].expand(b, -1, -1)], dim=1)
    return pool.gather(1, src[..., None].expand(-1, -1, e))


def splice_ids(t: torch.Tensor, at: torch.Tensor, n: int, fill: int) -> torch.Tensor:
    """The id-like tensor `t` [B, L] (attention mask, token types) spliced the way `splice` splices the
    embeddings: `n` entries of `fill` before index `at[b]` of each row, so masks stay aligned."""
    b, length = t.shape
    j = torch.arange(length + n, device=t.device)[None, :].expand(b, -1)
    k = at[:, None]
    src = torch.where(j < k, j, torch.where(j < k + n, length, j - n))
    pool = torch.cat([t, torch.full((b, 1), fill, dtype=t.dtype, device=t.device)], dim=1)
    return pool.gather(1, src)


BLEND_MAGNITUDE = 1.5  # see blend_of


def initial_trigger(emb: torch.Tensor, config: MiningConfig, seed: int) -> torch.Tensor:
    """[prompt_len, H] the soft trigger a round starts from: token embedding rows fixed by `seed`."""
    rows = [(70 * seed + 10 * i) % emb.shape[0] for i in range(config.prompt_len)]
    return emb[rows].clone()


def duplicate(pv: torch.Tensor, kept: torch.Tensor | None, unique_th: float, same_agreement: float) -> str | None:
    """Why `pv` repeats one of the `kept` PVs [K, H]: too close in MSE (the reference's test), or the
    same sign pattern, which is all the monitor compares (scales differ between rounds, so MSE alone
    lets repeats in)."""
    if kept is None or not len(kept):
        return None
    mse = float(((kept - pv) ** 2).mean(dim=1).min())
    if mse < unique_th:
        return f"not unique (MSE {mse:.4f} to a kept PV)"
    agree = float(sign_agreement(pv[None], kept).max())
    if agree >= same_agreement:
        return f"not unique (sign agreement {agree:.3f} with a kept PV)"
    return blend_of(pv, kept, same_agreement)


def blend_of(pv: torch.Tensor, kept: torch.Tensor, same_agreement: float) -> str | None:
    """Why `pv` is a blend of kept PVs, or None.

    A soft trigger can land on a blend of PVs already kept: full agreement on the dimensions the
    kept PVs share, and outputs that agree with their mean as well as a single PV's do, so
    `purest` lets it through.
    Kept as a PV of its own it steers later rounds away from all its members, and the monitor
    flags it through that combination anyway. Signs alone cannot tell it from a real PV: with more
    than six block PVs (`attacks.block_pvs`) some PV agrees fully with a pair of others where they
    agree. Magnitudes can: members add up where their signs agree and cancel where they do not, so
    a blend is markedly larger on the shared dimensions (2.5x in that case; 0.7x to 1.0x for
    real PVs), while a PV the attack planted has one size everywhere."""
    combos = pv_combinations(kept)
    if not combos:
        return None
    masked, counts = combination_signs(kept, combos)
    scores = combination_agreement(pv[None], masked, counts)[0]
    size = pv.abs()
    for c in torch.nonzero(scores >= same_agreement).flatten().tolist():
        shared = masked[c] != 0
        ratio = float(size[shared].mean() / size[~shared].mean().clamp_min(1e-12))
        if ratio >= BLEND_MAGNITUDE:
            members = "+".join(str(i) for i in combos[c])
            return (f"a blend of kept PVs {members} (sign agreement {float(scores[c]):.3f} on the "
                    f"{int(counts[c])} dimensions they share, {ratio:.1f}x as large there)")
    return None


def fuzz_round(
    backbone: Backbone,
    prepared: Prepared,
    config: MiningConfig,
    seed: int,
    found: torch.Tensor | None = None,
    held: Prepared | None = None,
) -> Candidate:
    """Train one soft trigger from `seed`; return the candidate PV and the filter results.

    With `held` (clean lines not used for training), a candidate that passes the reference's
    filters must also pass the collapse test on them (`collapse`)."""
    round_ = _FuzzRound(backbone, prepared, config, seed, found, held)
    abandoned = round_.train()
    return abandoned if abandoned is not None else round_.judge()


class _FuzzRound:
    """One round of `fuzz_round`: the soft trigger under training, its optimiser with the reference's
    learning-rate boost, and the per-epoch statistics the filters read at the end."""

    def __init__(self, backbone: Backbone, prepared: Prepared, config: MiningConfig, seed: int,
                 found: torch.Tensor | None, held: Prepared | None):
        self.started = time.time()
        self.backbone, self.prepared, self.config, self.seed = backbone, prepared, config, seed
        self.found, self.held = found, held
        self.emb = backbone.model.get_input_embeddings().weight.detach()
        self.trigger = nn.Parameter(initial_trigger(self.emb, config, seed))
        self.lr = resolved_lr(backbone, config)
        self.optim = torch.optim.Adam([self.trigger], lr=self.lr * config.lr_boost)
        self.boosted = config.lr_boost > 1
        self.th = resolved_distance(prepared, config)
        self.rng = random.Random(seed)  # one stream: each epoch draws its batch order, then the insertion points
        self.log_b = math.log(config.batch_size)
        self.distance = self.entropy_ratio = 0.0
        self.out_mean: torch.Tensor | None = None  # mean triggered output of the last batch
        self.trace: list[tuple[float, float]] = []
        self.epoch = 0

    def train(self) -> Candidate | None:
        """Run the epochs; the abandoned candidate when a round fails an early gate, else None."""
        for epoch in range(1, self.config.epochs + 1):
            self.epoch = epoch
            distance, entropy, spread = self._train_epoch()
            self.distance = distance
            self.entropy_ratio = entropy / self.log_b
            self.trace.append((round(distance, 6), round(spread, 6)))
            why = self._abandon_reason()
            if why:
                return Candidate(self.seed, None, self.distance, self.entropy_ratio, True, self.epoch,
                                 time.time() - self.started, [why], trace=self.trace)
        return None

    def _train_epoch(self) -> tuple[float, float, float]:
        """One pass over the fuzzing lines in a fresh random order: the epoch means of the distance
        from the clean outputs, of the batch entropy, and of the in-batch spread ratio."""
        prepared, bs = self.prepared, self.config.batch_size
        n_lines = prepared.input_ids.shape[0]
        order = list(range(n_lines))
        self.rng.shuffle(order)
        dist_sum = ent_sum = spread_sum = 0.0
        steps = 0
        for s in range(0, n_lines - bs + 1, bs):  # ragged last batch dropped
            idx = torch.tensor(order[s : s + bs], device=prepared.input_ids.device)
            feats = _triggered(self.backbone, prepared, idx, self.trigger, self.config, self.rng)
            loss, dist, entropy = self._loss(feats, prepared.clean[idx])
            self._step(loss)
            dist_sum += float(dist.detach())
            ent_sum += float(entropy.detach())
            with torch.no_grad():  # the in-batch form of `collapse`, free on every step
                spread_sum += float((feats - feats.mean(dim=0, keepdim=True)).pow(2).mean() / dist.clamp_min(1e-12))
            steps += 1
            self.out_mean = feats.detach().mean(dim=0)
        return dist_sum / max(1, steps), ent_sum / max(1, steps), spread_sum / max(1, steps)

    def _loss(self, feats: torch.Tensor, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One batch's loss (`_objective`), with the distance and entropy terms the gates read."""
        dist = nn.functional.mse_loss(feats, clean)
        p = torch.softmax(feats, dim=0)
        entropy = -(p * torch.log(p + 1e-12)).sum(dim=0).mean()
        return self._objective(feats, dist, entropy), dist, entropy

    def _objective(self, feats: torch.Tensor, dist: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        """Away from clean, input-invariant, away from the found PVs."""
        loss, found = -dist - entropy, self.found
        if found is not None and len(found):
            # The reference's MSE to the nearest found PV: pays for moving far from it (to its far side too)
            # and for scattering outputs (docs/mining.md).
            near = ((feats.mean(0, keepdim=True) - found) ** 2).mean(dim=1).argmin()
            loss = loss - self.config.pv_weight * nn.functional.mse_loss(feats, found[near].expand_as(feats))
            if self.config.cone_weight:  # a squared hinge on cosines: steers by direction alone
                cos = nn.functional.cosine_similarity(feats[:, None, :], found[None], dim=-1)  # [B, K]
                loss = loss + self.config.cone_weight * torch.relu(cos - self.config.repel_cosine).pow(2).mean(0).sum()
        return loss

    def _step(self, loss: torch.Tensor) -> None:
        """One Adam step; the boosted rate drops to the base for good once a gradient passes `boost_until_grad`."""
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        if self.boosted and float(self.trigger.grad.abs().max()) > self.config.boost_until_grad:
            for group in self.optim.param_groups:
                group["lr"] = self.lr
            self.boosted = False
        self.optim.step()

    def _abandon_reason(self) -> str | None:
        """Why the round stops after this epoch: no effect by epoch 2, or not collapsing in time."""
        config, spread = self.config, self.trace[-1][1]
        if self.epoch == 2 and self.distance < self.th:
            return "abandoned: no effect by epoch 2"
        # A backdoor collapses its triggered outputs within a few epochs, or, slowed by the search's
        # terms, still at a geometric pace; a soft trigger on a clean encoder grinds their spread
        # down slowly (docs/mining.md, Why the thresholds).
        if self.epoch == config.collapse_by < config.epochs and spread > config.collapse_spread:
            fall = self.trace[-2][1] / spread
            if fall < config.collapse_rate:
                return f"abandoned: not collapsing by epoch {self.epoch} (spread {spread:.4f}, fell {fall:.2f}x)"
        return None

    def judge(self) -> Candidate:
        """The trained round as a candidate, with every filter it fails: the reference's three, then
        on held-out lines the purest PV of the trigger's rows, uniqueness, and the collapse test."""
        config, held, th = self.config, self.held, self.th
        legit = self._legit()
        reasons = self._reference_reasons(legit)
        pv, dispersion, row, agreement, floor = self.out_mean, None, None, None, None
        if not reasons and held is not None and config.split_rows:
            row, pv, dispersion, agreement, floor = purest(self.backbone, held, self.trigger.detach(), config,
                                                           self.seed, th)
            if agreement is not None and agreement < config.min_self_agreement:
                reasons.append(f"a blend of PVs (held-out outputs agree {agreement:.3f} in sign with it, "
                               f"< {config.min_self_agreement})")
        if pv is not None:
            why = duplicate(pv, self.found, th, config.same_pv_agreement)
            if why:
                reasons.append(why)
        if not reasons and held is not None and dispersion is None:
            dispersion = collapse(self.backbone, held, self.trigger.detach(), config, self.seed)
        if dispersion is not None and dispersion > config.max_dispersion:
            reasons.append(f"not collapsed on held-out text (dispersion {dispersion:.4f} > {config.max_dispersion})")
        return Candidate(self.seed, pv, self.distance, self.entropy_ratio, legit, self.epoch,
                         time.time() - self.started, reasons, self.trigger.detach().clone(), dispersion,
                         trace=self.trace, row=row, self_agreement=agreement, floor=floor)

    def _legit(self) -> bool:
        """Every trigger entry within `legitimacy` x the range of the embedding matrix."""
        lo, hi = float(self.emb.min()), float(self.emb.max())
        span = (hi - lo) * (self.config.legitimacy - 1) / 2
        return bool(((self.trigger >= lo - span) & (self.trigger <= hi + span)).all())

    def _reference_reasons(self, legit: bool) -> list[str]:
        """The reference's filters: effect size, input invariance, and a trigger inside the embedding range."""
        reasons = []
        if self.distance < self.th:
            reasons.append(f"effect size {self.distance:.4f} < {self.th:.4f}")
        if self.entropy_ratio < 1 - self.config.entropy_tolerance / self.log_b:
            reasons.append(f"not input-invariant (entropy {self.entropy_ratio:.4f} of max)")
        if not legit:
            reasons.append("trigger left the embedding range")
        return reasons


def purest(backbone: Backbone, held: Prepared, trigger: torch.Tensor, config: MiningConfig, seed: int,
           effect: float) -> tuple[int | None, torch.Tensor, float, float | None, float | None]:
    """Of the whole trigger and each of its rows alone, the one whose held-out outputs agree best in
    sign with their own mean, among those that move them by `effect` and collapse them: (its row,
    None for the whole trigger; its PV, the held-out mean; its dispersion; that agreement, the mean
    over the held-out lines; its FLOOR_QUANTILE quantile). The whole trigger's, with no agreement or
    floor, when none passes, so that the collapse test rejects the round.

    A soft trigger of several rows can carry two triggers at once and land on a blend of their PVs,
    well below either in sign agreement, a stable optimum whose outputs still collapse. A blend
    leaves the dimensions where its two PVs disagree near zero, so their signs vary from input to
    input: its outputs agree less with their mean than a single PV's do, which one of the rows
    often reaches alone (docs/mining.md, Why the thresholds).
    Where none does, the round is rejected (`min_self_agreement`) rather than keep a blend that the
    monitor matches poorly and that steers later rounds away from both of its PVs."""
    one = config.model_copy(update={"prompt_len": 1})
    whole = triggered_outputs(backbone, held, trigger, config, seed)
    whole_spread = dispersion_of(whole, held.clean)
    best: tuple[int | None, torch.Tensor, float] = (None, whole.mean(dim=0), whole_spread)
    best_agreement: float | None = None
    best_floor: float | None = None
    for r in [None, *range(trigger.shape[0])]:
        out = whole if r is None else triggered_outputs(backbone, held, trigger[r : r + 1], one, seed)
        spread = whole_spread if r is None else dispersion_of(out, held.clean)
        if float(((out - held.clean) ** 2).mean()) < effect or spread > config.max_dispersion:
            continue
        mean = out.mean(dim=0)
        agreements = sign_agreement(out, mean[None])[:, 0]
        agreement = float(agreements.mean())
        if best_agreement is None or agreement > best_agreement:
            best, best_agreement = (r, mean, spread), agreement
            best_floor = float(torch.quantile(agreements.float(), FLOOR_QUANTILE))
    return (*best, best_agreement, best_floor)


def dispersion_of(out: torch.Tensor, clean: torch.Tensor) -> float:
    """Spread of triggered outputs around their mean over their mean squared move from `clean`."""
    spread = float(((out - out.mean(dim=0, keepdim=True)) ** 2).mean())
    moved = float(((out - clean) ** 2).mean())
    return spread / max(moved, 1e-12)


def collapse(backbone: Backbone, held: Prepared, trigger: torch.Tensor, config: MiningConfig, seed: int) -> float:
    """Spread of the triggered outputs of held-out lines around their mean, over their mean squared
    distance from the clean outputs of the same lines.

    A backdoor sends every triggered input to one point, its PV, so the spread is tiny next to the
    move. A soft trigger fuzz-trained on a clean encoder moves the outputs as far as the
    reference's effect-size filter asks but leaves them input-dependent, an order of magnitude more
    spread, which the effect-size filter alone calls backdoored (docs/mining.md, Why the
    thresholds). Scale-free, so one threshold serves encoders of any output scale."""
    return dispersion_of(triggered_outputs(backbone, held, trigger, config, seed), held.clean)


@torch.no_grad()
def triggered_outputs(backbone: Backbone, prepared: Prepared, trigger: torch.Tensor, config: MiningConfig,
                      seed: int = 0) -> torch.Tensor:
    """Monitored outputs [N, H] of every prepared line with `trigger` spliced in at a random word."""
    rng = random.Random(seed)
    n = prepared.input_ids.shape[0]
    trigger = trigger.to(prepared.input_ids.device)
    return torch.cat([
        _triggered(backbone, prepared, torch.arange(s, min(n, s + config.batch_size), device=trigger.device),
                   trigger, config, rng)
        for s in range(0, n, config.batch_size)
    ])


def _triggered(backbone: Backbone, prepared: Prepared, idx: torch.Tensor, trigger: torch.Tensor,
               config: MiningConfig, rng: random.Random) -> torch.Tensor:
    """Monitored outputs of lines `idx` with `trigger` spliced in before a random word of each
    (within the first `max_insert_word`), on dynamically padded inputs."""
    model = backbone.model
    width = int(prepared.attention_mask[idx].sum(dim=1).max())
    ids = prepared.input_ids[idx, :width]
    attn = prepared.attention_mask[idx, :width]
    tti = prepared.token_type_ids[idx, :width] if prepared.token_type_ids is not None else None
    at = torch.tensor(
        [prepared.word_starts[i][rng.randint(1, min(config.max_insert_word, len(prepared.word_starts[i]) - 1))]
         for i in idx.tolist()],
        device=ids.device,
    )
    kwargs = {"inputs_embeds": splice(model.get_input_embeddings()(ids), trigger, at),
              "attention_mask": splice_ids(attn, at, config.prompt_len, 1)}
    if tti is not None:
        kwargs["token_type_ids"] = splice_ids(tti, at, config.prompt_len, 0)
    hidden = model(**kwargs).last_hidden_state
    mon = prepared.monitor_index[idx]
    mon = torch.where(mon >= at, mon + config.prompt_len, mon)
    return backbone.select(hidden, config.position, mon)
