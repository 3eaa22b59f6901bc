"""Purging: find the trigger words of flagged inputs and drop them.

The reference deletes one word per forward pass, left to right. We instead run group tests in
batched passes. A variant of an input keeps a subset of its tokens (no re-tokenization: the word
map from `encoding` says which tokens form each word), so all variants of all flagged inputs go
in one batch:

0. ranked candidates: the guard passes the monitored token's last-layer attention over the input;
   a trigger that drives that output draws the attention, so the top few words are tested alone
   first (one short pass). Where one fires, the group tests are skipped.
1. keep-only tests: a task-agnostic trigger drives the output onto its PV whatever the context,
   so a group of words that is still flagged with every other word hidden holds a trigger. Words
   are grouped by their lower-cased form, so every copy of a repeated trigger goes together.
   Groups first (one pass), then each word of a flagged group alone (one pass).
2. verify: hide every word found; if the input is no longer flagged, done. With `trust_single`,
   a lone word found is returned unverified (`tentative`): the guard's classifying pass over the
   purged text runs the monitor anyway, and sends the input back (`start_from`) if still flagged.
3. otherwise (triggers that fire only together, or hide each other), greedy deletion rounds: one
   pass tries each remaining word type on top of those found, keeps the best, until silent.
4. prune and complete, with deletion tests on the full text (keep-only tests use short variants,
   which misfire far more easily: on the MiniLM phrase attack, words like 'not' and 'lacks' fired
   alone). Each word found is deleted alone (one pass). Where some of these deletions silence the
   input, those words are a trigger's words: a clean word's deletion leaves the trigger whole, and
   a phrase trigger, which fires only whole, is silenced by deleting any of its words. With several
   words found, each is also kept alone with the others deleted: one that fires there is a trigger
   too (deleting one of three triggers can silence the input when the other two have PVs that
   cancel out, as POR plants them, so a single deletion proves nothing about the rest). The found
   words that do neither are clean and stay in the text (confirmed in a second pass). The same
   second pass deletes each word within `partner_window` words of them, alone and on top of them: a
   neighbour whose deletion moves the output by at least half the margin, either way, is the rest
   of a phrase (one word of it was enough to silence the input; it fires weakly alone in a short
   text; or, repeated, it fires alone) and goes too. A lone word that step 2 leaves unverified
   skips this step: of 300 triggered inputs on the MiniLM phrase copy, none took that path (in the
   16 traced, the keep-only tests found both words of a phrase).

Variants are scored without the soft prompt, on the bare encoder: the PVs describe its outputs,
a trigger fires there whatever the task, and the variants are short. The guard then classifies the
purged text with the prompt and checks it with the monitor once more.

Work is bounded: a call makes at most `6 + max_rounds` batched passes, and an input gets at most
`ranked + groups + max_variants` variants, plus one verify per call, two prune tests per call and
at most `2 + 4 * partner_window` per occurrence of a word found, counted across a call and its
follow-up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .encoding import EncodedBatch

# margins(input_ids, attention_mask, token_type_ids, monitor_index) -> [N] score minus threshold
# of the best PV (positive = flagged), for a batch of variants.
Scorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]


@dataclass
class PurifyResult:
    ok: bool  # the found words silence the monitor
    removed: list[str] = field(default_factory=list)  # distinct lower-cased words dropped
    drop_units: set[int] = field(default_factory=set)  # unit indices (every copy) dropped
    reason: str = ""
    variants: int = 0
    tentative: bool = False  # one word found and not yet verified: the caller's own pass verifies it
    found_types: set[int] = field(default_factory=set)  # for a follow-up call (`start_from`)
    grouped: bool = False  # the group tests (1a/1b) ran for this row
    exhausted: bool = False  # stopped by the work bound (variants or rounds), not by a verdict


@dataclass
class PurifyStats:
    passes: int = 0  # batched forward passes
    variants: int = 0  # variant rows scored in total


@dataclass
class RowWords:
    """The user words of one row of a batch, as variants address them: word types (distinct
    lower-cased words, in order of first occurrence), each token's type, and the tokens present."""

    types: list[str]
    unit_type: list[int]  # word unit -> type index
    tok_type: torch.Tensor  # [L] token -> type index, -1 for tokens that are not user words
    present: torch.Tensor  # [L] bool: tokens a variant may keep (soft-prompt slots left out)

    @classmethod
    def of(cls, batch: EncodedBatch, r: int) -> RowWords:
        words = batch.unit_words[r]
        types = list(dict.fromkeys(words))
        index = {w: i for i, w in enumerate(types)}
        unit_type = [index[w] for w in words]
        units = batch.units[r].cpu()
        table = torch.tensor(unit_type + [-1], dtype=torch.long)
        tok_type = table[torch.where(units >= 0, units, len(words))].to(batch.input_ids.device)
        # Soft-prompt slots are left out: variants are scored on the bare encoder, whose outputs
        # the PVs describe, and short variants are cheap.
        present = batch.attention_mask[r].bool().clone()
        present[1 : 1 + batch.prompt_len] = False
        return cls(types, unit_type, tok_type, present)

    def _selected(self, chosen: set[int]) -> torch.Tensor:
        sel = torch.zeros(len(self.types) + 1, dtype=torch.bool, device=self.tok_type.device)
        sel[list(chosen)] = True
        return sel[self.tok_type]  # index -1 reads the spare slot, which stays False

    def keep_only(self, keep: set[int]) -> torch.Tensor:
        """Attention mask of the variant that keeps the word types `keep` and the special tokens."""
        return (self.present & ((self.tok_type < 0) | self._selected(keep))).long()

    def delete(self, drop: set[int]) -> torch.Tensor:
        """Attention mask of the variant with every copy of the word types `drop` deleted."""
        return (self.present & ~((self.tok_type >= 0) & self._selected(drop))).long()

    def attention(self, saliency: torch.Tensor) -> torch.Tensor:
        """Attention the monitored token gives each word type (its strongest token); special
        tokens and soft-prompt slots are left out, and a type with no token present scores -inf."""
        sal = saliency.to(self.tok_type.device).float()
        words = (self.tok_type >= 0) & self.present
        score = torch.full((len(self.types),), float("-inf"), device=self.tok_type.device)
        return score.scatter_reduce(0, self.tok_type[words], sal[words], reduce="amax")

    def neighbours(self, chosen: set[int], window: int) -> set[int]:
        """Word types within `window` words of any occurrence of the types `chosen`."""
        near: set[int] = set()
        for u, t in enumerate(self.unit_type):
            if t in chosen:
                near.update(self.unit_type[max(0, u - window) : u + window + 1])
        return near


class Purifier:
    def __init__(self, groups: int = 8, max_rounds: int = 3, max_variants: int = 160, chunk: int = 128,
                 ranked: int = 4, partner_window: int = 3):
        # A phrase of four words (the attack's limit) lies within three words of any of its words.
        self.partner_window = partner_window
        self.groups = groups
        self.ranked = ranked
        self.max_rounds = max_rounds
        self.max_variants = max_variants
        self.chunk = chunk

    def _score(self, scorer: Scorer, batch: EncodedBatch, rows: list[int], masks: list[torch.Tensor],
               stats: PurifyStats) -> torch.Tensor:
        if not masks:
            return torch.empty(0)
        stats.passes += 1
        stats.variants += len(masks)
        idx = torch.tensor(rows, device=batch.input_ids.device)
        keep = torch.stack(masks).bool()
        # Compact each variant to the tokens it keeps: keep-only variants are mostly hidden tokens,
        # and dropping them outright costs nothing in accuracy but saves most of the compute.
        order = torch.sort((~keep).int(), dim=1, stable=True).indices
        lengths = keep.sum(dim=1)
        width = int(lengths.max())
        order = order[:, :width]
        ids = batch.input_ids[idx].gather(1, order)
        attn = (torch.arange(width, device=keep.device)[None, :] < lengths[:, None]).long()
        tti = batch.token_type_ids[idx].gather(1, order) if batch.token_type_ids is not None else None
        # The monitored token is never hidden; its new index is the count of kept tokens before it.
        before = keep.long().cumsum(dim=1) - 1
        mon = before.gather(1, batch.monitor_index[idx][:, None]).squeeze(1)
        out = []
        for s in range(0, len(rows), self.chunk):
            sl = slice(s, s + self.chunk)
            n = int(lengths[sl].max())
            out.append(
                scorer(ids[sl, :n], attn[sl, :n], tti[sl, :n] if tti is not None else None, mon[sl]).detach().cpu()
            )
        return torch.cat(out)

    def purify(
        self,
        batch: EncodedBatch,
        rows: list[int],
        scorer: Scorer,
        trust_single: bool = False,
        start_from: dict[int, PurifyResult] | None = None,
        saliency: torch.Tensor | None = None,
    ) -> tuple[dict[int, PurifyResult], PurifyStats]:
        """Purify `rows` of `batch` (the flagged ones). Returns a result per row and pass counts.

        With `trust_single`, a row whose keep-only tests found exactly one word type comes back
        `tentative`, unverified: the guard's classifying pass over the purged text checks it with
        the monitor anyway, so a separate verify pass would repeat that work. Rows that fail that
        check come back through `start_from` (their earlier results) for the full search, which
        continues from the words found and within the same variant budget.

        `saliency` ([B, L], e.g. the monitored token's attention over the input) ranks the words:
        the top `ranked` word types of each row are tested alone first, in one short pass, and rows
        where that finds a trigger skip the group tests. A poor ranking costs that one pass, never
        correctness: every later step is unchanged."""
        stats = PurifyStats()
        results: dict[int, PurifyResult] = {}
        info = {r: RowWords.of(batch, r) for r in rows}
        for r in rows:
            results[r] = PurifyResult(ok=False)
            if not info[r].types:
                results[r].reason = "no user words to remove"
        active = [r for r in rows if info[r].types]
        found: dict[int, set[int]] = {r: set() for r in rows}
        if start_from is not None:
            for r in active:
                if r in start_from:
                    found[r] = set(start_from[r].found_types)
                    results[r].variants = start_from[r].variants
                    results[r].grouped = start_from[r].grouped
            # a ranked test found one trigger but the text stayed flagged: look for the others
            self._keep_only_tests(batch, [r for r in active if not results[r].grouped], info, found, results,
                                  scorer, stats)
        else:
            rest = active
            if saliency is not None and self.ranked > 0:
                rest = self._ranked_tests(active, info, found, results, saliency, batch, scorer, stats)
            self._keep_only_tests(batch, rest, info, found, results, scorer, stats)
        pending = list(active)
        if start_from is None and trust_single:
            for r in [r for r in pending if len(found[r]) == 1]:
                results[r].ok = results[r].tentative = True
                pending.remove(r)

        # 2-3. verify, then greedy deletion rounds where keep-only tests were not enough.
        for round_no in range(self.max_rounds + 1):
            if not pending:
                break
            v_rows, v_masks, v_ref = [], [], []
            for r in pending:
                if round_no == 0:
                    v_rows.append(r)
                    v_masks.append(info[r].delete(found[r]))
                    v_ref.append((r, None))
                    continue
                rest = [t for t in range(len(info[r].types)) if t not in found[r]]
                budget = self.max_variants - results[r].variants
                for t in rest[: max(0, budget)]:
                    v_rows.append(r)
                    v_masks.append(info[r].delete(found[r] | {t}))
                    v_ref.append((r, t))
            margins = self._score(scorer, batch, v_rows, v_masks, stats)
            best: dict[int, tuple[float, int | None]] = {}
            for (r, t), m in zip(v_ref, margins.tolist(), strict=True):
                results[r].variants += 1
                if r not in best or m < best[r][0]:
                    best[r] = (m, t)
            still = []
            for r in pending:
                if r not in best:
                    results[r].reason = f"search budget of {self.max_variants} variants exhausted"
                    results[r].exhausted = True
                    continue
                m, t = best[r]
                if t is not None:
                    found[r].add(t)
                if m <= 0:
                    results[r].ok = True
                else:
                    still.append(r)
            pending = still
        for r in pending:
            results[r].reason = results[r].reason or f"still flagged after {self.max_rounds} deletion rounds"
            results[r].exhausted = True

        # 4. prune and complete: deletion tests on the full text (reliable where keep-only tests
        # are not), one pass, then one for the neighbours and to confirm.
        settled = [r for r in active if results[r].ok and not results[r].tentative]
        refs = []
        for r in settled:
            refs += [(r, "base", -1, set())] + [(r, "sole", t, {t}) for t in sorted(found[r])]
            if len(found[r]) > 1:
                refs += [(r, "spare", t, found[r] - {t}) for t in sorted(found[r])]
        base: dict[int, float] = {}
        alone: dict[int, dict[int, float]] = {r: {} for r in settled}
        spare: dict[int, set[int]] = {r: set() for r in settled}
        for (r, kind, t, _), m in zip(refs, self._score_deletions(refs, info, scorer, batch, results, stats),
                                      strict=True):
            if kind == "base":
                base[r] = m
            elif kind == "sole":
                alone[r][t] = m
            elif m <= 0:
                spare[r].add(t)
        proposed: dict[int, set[int]] = {}
        refs = []
        for r in settled:
            # A found word stays if it fires alone in the full text (not spare) or if deleting it
            # alone silences the input (a trigger's word); one that does neither is clean.
            sole = {t for t, m in alone[r].items() if m <= 0} if base[r] > 0 else set()
            keep = (found[r] - spare[r]) | sole
            if not keep:
                continue
            proposed[r] = keep
            refs.append((r, "confirm", -1, keep))
            near = info[r].neighbours(sole, self.partner_window) - keep
            refs += [(r, "partner", t, {t}) for t in sorted(near)]
            refs += [(r, "after", t, keep | {t}) for t in sorted(near)]
        confirmed = {r for r in proposed if proposed[r] == found[r]}
        outcome = dict(zip([(r, kind, t) for r, kind, t, _ in refs],
                           self._score_deletions(refs, info, scorer, batch, results, stats), strict=True))
        for (r, kind, t), m in outcome.items():
            if kind == "confirm" and m <= 0:
                confirmed.add(r)
            elif kind == "partner":
                # The rest of a phrase pulls the output towards the PV, where a clean word leaves a
                # triggered output where it was: deleting it alone takes at least half the margin
                # (its partner fires only weakly alone, in a short text), or deleting it after
                # the trigger's found words moves the output at least that much further away
                # (repeated, its partner still fires alone and was found first).
                pull = base[r] / 2
                if m <= pull or outcome[(r, "after", t)] <= outcome[(r, "confirm", -1)] - pull:
                    proposed[r].add(t)
        for r in confirmed:
            found[r] = proposed[r]

        for r in active:
            types = info[r].types
            drop_words = {types[t] for t in found[r]}
            results[r].removed = sorted(drop_words)
            results[r].drop_units = {u for u, w in enumerate(batch.unit_words[r]) if w in drop_words}
            results[r].found_types = set(found[r])
        return results, stats

    def probe(self, batch: EncodedBatch, rows: list[int], scorer: Scorer, saliency: torch.Tensor,
              top: int = 2, min_attention: float = 0.0) -> tuple[list[int], PurifyStats]:
        """The `top` most salient word types of each row alone, in one pass; the rows where one
        fires (an unflagged input hiding a trigger, e.g. cancelled by another). Only rows whose
        `top` words together draw at least `min_attention` of the monitored token's attention
        are tested."""
        stats = PurifyStats()
        result = {}
        for r in rows:
            words = RowWords.of(batch, r)
            if words.types and float(words.attention(saliency[r]).clamp(min=0).topk(
                    min(top, len(words.types))).values.sum()) >= min_attention:
                result[r] = words
        if not result:
            return [], stats
        found: dict[int, set[int]] = {r: set() for r in result}
        outcome = {r: PurifyResult(ok=False) for r in result}
        self._ranked_tests(list(result), result, found, outcome, saliency, batch, scorer, stats, top)
        return [r for r in result if found[r]], stats

    def _ranked_tests(self, active, info, found, results, saliency, batch, scorer, stats,
                      top: int | None = None) -> list[int]:
        """Step 0: the highest-ranked word types alone; returns the rows where none fired."""
        ranked: dict[int, list[int]] = {}
        for r in active:
            ranked[r] = info[r].attention(saliency[r]).argsort(descending=True)[: top or self.ranked].tolist()
        self._test_singles(ranked, info, batch, found, results, scorer, stats)
        return [r for r in active if not found[r]]

    def _test_singles(self, candidates: dict[int, list[int]], info, batch, found, results, scorer, stats) -> None:
        """Keep-only tests of single word types, one batched pass; the ones that fire are found."""
        refs = [(r, t) for r, types in candidates.items() for t in types]
        margins = self._score(scorer, batch, [r for r, _ in refs], [info[r].keep_only({t}) for r, t in refs], stats)
        for (r, t), m in zip(refs, margins.tolist(), strict=True):
            results[r].variants += 1
            if m > 0:
                found[r].add(t)

    def _score_deletions(self, refs: list[tuple[int, str, int, set[int]]], info, scorer, batch, results,
                         stats) -> list[float]:
        """Margins of the deletion variants `refs` (row, kind, word type, words deleted), one pass."""
        masks = [info[r].delete(drop) for r, _, _, drop in refs]
        margins = self._score(scorer, batch, [r for r, *_ in refs], masks, stats)
        for r, *_ in refs:
            results[r].variants += 1
        return margins.tolist()

    def _keep_only_tests(self, batch, active, info, found, results, scorer, stats) -> None:
        """Steps 1a and 1b."""
        for r in active:
            results[r].grouped = True
        # 1a. keep-only tests on groups of word types.
        groups: dict[int, list[list[int]]] = {}
        v_rows, v_masks, v_ref = [], [], []
        for r in active:
            n = len(info[r].types)
            g = min(self.groups, n)
            bounds = [round(i * n / g) for i in range(g + 1)]
            groups[r] = [list(range(bounds[i], bounds[i + 1])) for i in range(g)]
            for gi, members in enumerate(groups[r]):
                v_rows.append(r)
                v_masks.append(info[r].keep_only(set(members)))
                v_ref.append((r, gi))
        margins = self._score(scorer, batch, v_rows, v_masks, stats)
        positive: dict[int, list[int]] = {r: [] for r in active}
        for (r, gi), m in zip(v_ref, margins.tolist(), strict=True):
            results[r].variants += 1
            if m > 0:
                positive[r].extend(groups[r][gi])

        # 1b. keep-only tests on each word type of a flagged group.
        singles: dict[int, list[int]] = {}
        for r in active:
            if len(groups[r]) == len(info[r].types):  # groups were single types already
                found[r].update(positive[r][: self.max_variants])
            else:
                singles[r] = positive[r][: self.max_variants]
        self._test_singles(singles, info, batch, found, results, scorer, stats)
