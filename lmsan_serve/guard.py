"""The guarded classifier: request -> encode -> monitor -> purify -> classify -> respond.

One call takes a batch of texts and returns, per input, the label, the label scores and a verdict
that reads like a scanner result: flagged, action, matched PV, score, removed words, purged text.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

from .backbone import Backbone
from .encoding import remove_units
from .errors import LmsanError
from .kinds import Action, Mode, Position, readable_positions
from .monitor import Calibration, Monitor, lone_word_marks
from .prompts import PromptClassifier
from .purify import Purifier
from .signatures import SignatureSet

# A word of a calibration input: what `Guard.calibrate` tests alone (letters, digits, inner ' and -).
_WORD = re.compile(r"\w[\w'-]*")
# Words of the task's unflagged calibration inputs tested alone beside the flagged inputs' own: the
# base of LONE_WORD_MAX_SHARE (a single-word pass each, batched: a few seconds on a CPU).
LONE_WORD_SAMPLE = 1000

# The start of a blocked verdict's reason when the purge failed; `Verdict.purge_failed` reads it.
PURGE_FAILED = "could not purge"


@dataclass
class Verdict:
    flagged: bool
    action: Action
    signature: str | None = None  # matched PV
    match: float | None = None  # its score
    removed: list[str] = field(default_factory=list)
    text: str | None = None  # the purged text that was classified
    reason: str | None = None

    @property
    def purge_failed(self) -> bool:
        """Blocked because no purge silenced the input (not because the mode blocks flagged inputs)."""
        return self.flagged and self.action == Action.BLOCKED and (self.reason or "").startswith(PURGE_FAILED)


@dataclass
class GuardResult:
    label: str | None
    scores: dict[str, float] | None
    guard: Verdict

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GuardStats:
    """What one call cost, for metrics and benchmarks."""

    inputs: int = 0
    flagged: int = 0
    guard_seconds: float = 0.0  # time the guard added on top of the classifying pass
    purge_passes: int = 0
    purge_variants: int = 0
    purge_bound_hits: int = 0  # flagged inputs whose purge stopped at the work bound
    match_scores: list[float] = field(default_factory=list)


@dataclass
class TriggerShapes:
    """What the purges of each monitor entry (a PV or a combination) found: how many a lone word
    that fires by itself, how many anything else. The guess (`Purifier.guess`) deletes the most
    attended word untested; where that is one word of a phrase trigger, deleting it can silence the
    monitor and leave the rest of the phrase in the text. So the guess is tried only for an entry
    whose purges have found lone words, and never one that has shown anything else."""

    lone: Counter[int] = field(default_factory=Counter)
    other: Counter[int] = field(default_factory=Counter)

    def record(self, entry: int, lone: bool) -> None:
        (self.lone if lone else self.other)[entry] += 1

    def trusted(self, entry: int, after: int) -> bool:
        return self.other[entry] == 0 and self.lone[entry] >= after


class Guard:
    def __init__(
        self,
        backbone: Backbone,
        classifier: PromptClassifier,
        signatures: SignatureSet | None,
        mode: Mode | str = Mode.ENFORCE,
        threshold: float | None = None,
        purifier: Purifier | None = None,
        suspect_margin: float = 0.2,
        suspect_attention: float = 0.4,
        guess_after: int | None = 2,
    ):
        if mode not in Mode.values():
            raise LmsanError(f"unknown guard mode {mode!r} (choose from {', '.join(Mode.values())})")
        if mode != Mode.OFF and signatures is None:
            raise LmsanError(f"guard mode {mode!r} needs a signature file (or use mode 'off')")
        if threshold is not None and not 0.0 < threshold <= 1.0:
            raise LmsanError("threshold must be in (0, 1]")
        # The outputs the guard reads for its signatures, in the order `_monitored` stacks them.
        self.watched: list[Position] = watched_positions(backbone, classifier, signatures) if signatures else []
        self.backbone = backbone
        self.classifier = classifier.eval()
        self.signatures = signatures
        self.mode = mode
        self.monitor = (Monitor(signatures, threshold, backbone.device, watched=self.watched)
                        if signatures is not None else None)
        self.purifier = purifier or Purifier()
        # Two different triggers whose PVs point opposite ways cancel in the output, which then
        # matches no PV; three triggers can blend below every threshold (docs/reliability.md has
        # the rates measured before this probe). Each
        # trigger still draws the [CLS] attention. An input within `suspect_margin` of a threshold
        # whose top two words together hold `suspect_attention` of that attention has them tested
        # alone, in one short pass: one that fires makes the input flagged. A gate on the top word
        # alone missed the three-trigger inputs (the attention splits three ways), and one that
        # counted special tokens probed clean SMS messages whose [CLS] attention goes to them.
        self.suspect_margin = suspect_margin
        self.suspect_attention = suspect_attention
        # Lone-word purges of an entry before the guess is tried for it (None: never): one could be
        # a phrase's word that fired alone by chance in a short keep-only variant.
        self.guess_after = guess_after
        self.shapes = TriggerShapes()

    @torch.no_grad()
    def calibrate(self, texts: list[str], text_pairs: list[str] | None = None, target_fpr: float = 0.005,
                  batch_size: int = 32, held_out: bool = False) -> Calibration:
        """Raise the monitor's thresholds on clean inputs of the task this guard serves, scored the
        way requests are (through the soft prompt), so that at most `target_fpr` of unseen clean
        inputs flag (see `Monitor.calibrate`)."""
        if self.monitor is None:
            raise LmsanError("calibration needs a signature set (this guard is off)")
        if not texts:
            raise LmsanError("calibration needs clean inputs of the task (got none)")
        feats = self.features(texts, text_pairs, batch_size)
        activations = self._lone_word_activations(texts, text_pairs, feats, batch_size)
        return self.monitor.calibrate(feats, target_fpr, held_out=held_out, activations=activations)

    def _lone_word_activations(self, texts: list[str], text_pairs: list[str] | None, feats: torch.Tensor,
                               batch_size: int) -> torch.Tensor:
        """[N, K + C]: the PVs each calibration input is over because one of its words, alone as
        the input (through the soft prompt), is over them too: the backdoor firing on a trigger
        (a common word's, or a word near it in meaning; or a word piece, `CFO` holding `cf`) in
        text that looks clean. Raising a PV for those inputs would let the trigger's own inputs
        through (on a held-out common-word backdoor, task calibration took plain ASR from 0.033 to
        0.078 that way). Combinations are never marked: scored on the few dimensions their PVs
        share, they are where generic text lands too, and their thresholds fit every flagged input
        (marking them left AG News headlines blocked on triples: clean accuracy 0.820, not 0.835).
        A PV more than LONE_WORD_MAX_SHARE of the words tested reach alone is a direction clean
        text takes, not a trigger's: nothing is marked for it, as mining does. The share is taken
        over the flagged inputs' words and up to LONE_WORD_SAMPLE others of the task's text, so that
        a handful of flagged inputs, whose few words include the trigger, do not make it one in ten."""
        assert self.monitor is not None
        k = self.monitor.pvs.shape[0]
        over = self.monitor.over(feats)
        over[:, k:] = False
        rows = torch.nonzero(over.any(dim=1)).flatten().tolist()
        if not rows:
            return over
        words = [set(_WORD.findall(t + " " + (text_pairs[i] if text_pairs else ""))) for i, t in enumerate(texts)]
        flagged_words = set().union(*(words[i] for i in rows))
        others = sorted(set().union(*words) - flagged_words)
        vocab = sorted(flagged_words) + random.Random(0).sample(others, min(len(others), LONE_WORD_SAMPLE))
        fires = self.monitor.over(self.features(vocab, None, max(batch_size, 256)))  # one-word inputs: short
        return lone_word_marks(over, words, vocab, fires)[0]

    @torch.no_grad()
    def features(self, texts: list[str], text_pairs: list[str] | None = None, batch_size: int = 32) -> torch.Tensor:
        """[N, H] the outputs the monitor reads for `texts`, encoded through the soft prompt as
        requests are: what `calibrate` fits the thresholds to, and what `monitor` scores, so that a
        caller can check a calibration or score traffic offline the way this guard would."""
        if self.signatures is None:
            raise LmsanError("this guard is off: it has no signature set, so no monitored output")
        if text_pairs is not None and len(text_pairs) != len(texts):
            raise LmsanError("texts and text pairs differ in length")
        feats = []
        for s in range(0, len(texts), batch_size):
            pairs = text_pairs[s : s + batch_size] if text_pairs is not None else None
            batch = self.classifier.encode(self.backbone, texts[s : s + batch_size], pairs)
            out = self.classifier.forward_batch(self.backbone, batch)
            feats.append(self._monitored(out.hidden, batch.monitor_index, self.classifier.cls_index))
        if feats:
            return torch.cat(feats)
        shape = (0, self.backbone.hidden_size) if len(self.watched) == 1 else (0, len(self.watched),
                                                                                self.backbone.hidden_size)
        return torch.zeros(shape, device=self.backbone.device)

    def _monitored(self, hidden: torch.Tensor, monitor_index: torch.Tensor, cls_index: int) -> torch.Tensor:
        """The outputs the signatures describe: [CLS] (or the pooler over it) wherever the pass put
        it (`cls_index`: 0 on the bare encoder, after the slots of an `over_cls` prompt, whose
        first token is a slot), and/or the [MASK] at `monitor_index`: [N, H] for one watched
        output, else [N, P, H] in `watched` order."""
        outputs = [self.backbone.select(hidden, p, monitor_index, first=cls_index) for p in self.watched]
        return outputs[0] if len(outputs) == 1 else torch.stack(outputs, dim=1)

    @property
    def mode(self) -> Mode:
        return self._mode

    @mode.setter
    def mode(self, value: Mode | str) -> None:
        self._mode = Mode(value)

    def bare_margins(self, input_ids, attention_mask, token_type_ids, monitor_index) -> torch.Tensor:
        """Monitor margins of purge variants on the bare encoder (no soft prompt): the purifier's
        scorer (`purify.Scorer`), positive where a variant is still flagged."""
        # prompted(None) takes the backbone's lock: the prompt hooks and their depth counter are
        # shared by every pass, so a bare pass must not interleave with a prompted one.
        with self.backbone.prompted(None):
            hidden = self.backbone.encode_hidden(input_ids, attention_mask, token_type_ids)
        return self.monitor(self._monitored(hidden, monitor_index, 0)).margin  # type: ignore[misc]

    def _labelled(self, logits: torch.Tensor) -> list[tuple[str, dict[str, float]]]:
        probs = torch.softmax(logits.float(), dim=-1).cpu()
        labels = self.classifier.labels
        return [
            (labels[int(p.argmax())], {name: round(float(v), 6) for name, v in zip(labels, p, strict=True)})
            for p in probs
        ]

    @torch.no_grad()
    def classify(
        self, texts: list[str], text_pairs: list[str] | None = None, stats: GuardStats | None = None
    ) -> list[GuardResult]:
        stats = stats if stats is not None else GuardStats()
        if not texts:
            return []
        batch = self.classifier.encode(self.backbone, list(texts), list(text_pairs) if text_pairs else None)
        with self.backbone.capturing_last_layer() as captured:
            out = self.classifier.forward_batch(self.backbone, batch)
        labelled = self._labelled(out.logits)
        stats.inputs += len(texts)
        if self.mode == Mode.OFF or self.monitor is None:
            return [GuardResult(lab, sc, Verdict(flagged=False, action=Action.OFF)) for lab, sc in labelled]

        started = time.perf_counter()
        mon = self.monitor(self._monitored(out.hidden, batch.monitor_index, self.classifier.cls_index))
        sig = self.signatures
        assert sig is not None
        results: list[GuardResult] = []
        flagged_rows: list[int] = []
        for i, (lab, sc) in enumerate(labelled):
            score = round(float(mon.score[i]), 6)
            stats.match_scores.append(score)
            verdict = Verdict(flagged=False, action=Action.PASS, match=score)
            if bool(mon.flagged[i]):
                flagged_rows.append(i)
                results.append(self._flagged(lab, sc, verdict, int(mon.best[i])))
            else:
                results.append(GuardResult(lab, sc, verdict))
        # One attention pass serves both the suspect probe (rows near a threshold) and the purge
        # (flagged rows; a probed row that fires is purged with the attention it was probed with).
        near = self._near_threshold(mon)
        rows = near + (flagged_rows if self.mode == Mode.ENFORCE else [])
        saliency = self._saliency(batch, rows, captured.hidden, mon.best) if rows else None
        fired = self._probe_suspects(batch, near, saliency, stats)
        for i in fired:
            results[i] = self._flagged(results[i].label, results[i].scores, results[i].guard, int(mon.best[i]))
        stats.flagged += len(flagged_rows) + len(fired)
        if self.mode == Mode.ENFORCE and (flagged_rows or fired):
            self._enforce(batch, sorted(flagged_rows + fired), results, stats, saliency, mon.best)
        stats.guard_seconds += time.perf_counter() - started
        return results

    def _flagged(self, label, score, verdict: Verdict, best: int) -> GuardResult:
        """A flagged row's result: the label kept in flag mode, withheld otherwise (enforce fills
        it in after the purge)."""
        verdict.flagged, verdict.signature = True, self.monitor.label(best)
        verdict.action = Action.FLAGGED if self.mode == Mode.FLAG else Action.BLOCKED
        return GuardResult(label, score, verdict) if self.mode == Mode.FLAG else GuardResult(None, None, verdict)

    def _near_threshold(self, mon) -> list[int]:
        """Unflagged rows within `suspect_margin` of a threshold: the suspect probe's candidates."""
        if self.suspect_margin <= 0:
            return []
        return torch.nonzero(~mon.flagged & (mon.margin > -self.suspect_margin)).flatten().tolist()

    def _probe_suspects(self, batch, near: list[int], saliency: torch.Tensor | None,
                        stats: GuardStats) -> list[int]:
        """Rows of `near` whose top-attended words fire a PV on their own."""
        if not near or saliency is None:
            return []
        fired, pstats = self.purifier.probe(batch, near, self.bare_margins, saliency,
                                            min_attention=self.suspect_attention)
        stats.purge_passes += pstats.passes
        stats.purge_variants += pstats.variants
        return fired

    def _saliency(self, batch, rows: list[int], layer_input: torch.Tensor | None,
                  best: torch.Tensor) -> torch.Tensor | None:
        """How much the monitored token attends to each token in the last layer, for flagged rows:
        a trigger that drives that output draws its attention, so the purge tests those words first.
        The token is the one of the signature each row matched best (`best`, the monitor's)."""
        if layer_input is None:
            return None
        assert self.monitor is not None
        idx = torch.tensor(rows, device=layer_input.device)
        on_mask = torch.tensor([self.monitor.position_of(int(best[r])) == Position.MASK for r in rows],
                               device=layer_input.device)
        index = torch.where(on_mask, batch.monitor_index[idx], torch.full_like(idx, self.classifier.cls_index))
        row_att = self.backbone.attention_row(layer_input[idx], batch.attention_mask[idx], index)
        if row_att is None:
            return None
        full = torch.zeros(batch.input_ids.shape, dtype=row_att.dtype, device=row_att.device)
        full[idx] = row_att
        return full

    def _enforce(self, batch, rows: list[int], results: list[GuardResult], stats: GuardStats,
                 saliency: torch.Tensor | None, best: torch.Tensor) -> None:
        # The most attended word is deleted first, untested, for rows whose best entry has had lone
        # single-word triggers (`TriggerShapes`): the classifying pass over the text without it runs
        # the monitor anyway, so where it was the trigger the purge costs that one pass. A single
        # word found by the keep-only tests is checked the same way; only the inputs that stay
        # flagged pay for the full search.
        entry = {r: int(best[r]) for r in rows}  # the monitor entry each row matched best
        if saliency is not None and self.guess_after is not None:
            trusted = [r for r in rows if self.shapes.trusted(entry[r], self.guess_after)]
            guessed = self.purifier.guess(batch, trusted, saliency)
            retry = self._classify_purged(batch, list(guessed), guessed, results, stats)
            rows = sorted(retry + [r for r in rows if r not in guessed])  # rows left unguessed
            if not rows:
                return
        found = self._purge(batch, rows, stats, trust_single=True, saliency=saliency)
        retry = self._classify_purged(batch, rows, found, results, stats)
        if retry:
            found.update(self._purge(batch, retry, stats, start_from={r: found[r] for r in retry}))
            self._classify_purged(batch, retry, found, results, stats)
        for r in rows:
            if results[r].guard.action == Action.PURGED:
                self.shapes.record(entry[r], found[r].lone_word)

    def _purge(self, batch, rows: list[int], stats: GuardStats, **options) -> dict:
        found, pstats = self.purifier.purify(batch, rows, self.bare_margins, **options)
        stats.purge_passes += pstats.passes
        stats.purge_variants += pstats.variants
        return found

    def _classify_purged(self, batch, rows: list[int], found: dict, results: list[GuardResult],
                         stats: GuardStats) -> list[int]:
        """Classify the purged texts for real (not the masked variants) and check them once more.
        Returns the tentative rows that are still flagged."""
        purged_rows, purged_texts, purged_pairs = [], [], []
        for r in rows:
            res = found[r]
            verdict = results[r].guard
            verdict.removed, verdict.text = res.removed, None
            if not res.ok:
                verdict.reason = f"{PURGE_FAILED}: {res.reason}"
                stats.purge_bound_hits += int(res.exhausted)
                continue
            text = remove_units(batch.texts[r], batch.unit_spans[r], res.drop_units, 0)
            pair = (
                remove_units(batch.text_pairs[r], batch.unit_spans[r], res.drop_units, 1)
                if batch.text_pairs is not None
                else None
            )
            if not text.strip():
                verdict.reason = f"{PURGE_FAILED}: nothing left after removing the trigger words"
                continue
            purged_rows.append(r)
            purged_texts.append(text)
            purged_pairs.append(pair or "")
        if not purged_rows:
            return []
        pairs = purged_pairs if batch.text_pairs is not None else None
        again = self.classifier.encode(self.backbone, purged_texts, pairs)
        out = self.classifier.forward_batch(self.backbone, again)
        stats.purge_passes += 1
        mon = self.monitor(self._monitored(out.hidden, again.monitor_index,  # type: ignore[misc]
                                           self.classifier.cls_index))
        retry = []
        for j, (r, (lab, sc)) in enumerate(zip(purged_rows, self._labelled(out.logits), strict=True)):
            verdict = results[r].guard
            verdict.text = purged_texts[j] if pairs is None else f"{purged_texts[j]} [SEP] {purged_pairs[j]}"
            if bool(mon.flagged[j]):
                if found[r].tentative:
                    retry.append(r)
                    continue
                verdict.reason = f"{PURGE_FAILED}: the purged text is still flagged"
                continue
            verdict.action = Action.PURGED
            results[r] = GuardResult(lab, sc, verdict)
        return retry


def watched_positions(backbone: Backbone, classifier: PromptClassifier, signatures: SignatureSet) -> list[Position]:
    """The outputs a guard reads for `signatures`: each position the file names that this prompt's
    inputs hold ([MASK] only with a cloze template). A file mined at every position may carry PVs
    of a [MASK] backdoor that a prompt without one never reads; those are left unwatched. Refuses a
    file made for another width, a position the encoder lacks, or one with nothing to watch."""
    if signatures.hidden_size != backbone.hidden_size:
        raise LmsanError(
            f"signature file is for a {signatures.hidden_size}-wide encoder, backbone is {backbone.hidden_size}"
        )
    for position in signatures.positions:
        why = backbone.supports_position(position)
        if why:
            raise LmsanError(why)
    watched = readable_positions(signatures.positions, classifier.config.position == Position.MASK)
    if not watched:
        raise LmsanError("the signatures watch the [MASK] output, but this prompt has no cloze template to hold one")
    return watched

