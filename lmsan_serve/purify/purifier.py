"""`Purifier`: the purge's steps (see the package docstring), one method each."""

from __future__ import annotations

import torch

from ..encoding import EncodedBatch
from .records import (
    Deletion,
    Pruned,
    PurgeCall,
    PurifyResult,
    PurifyStats,
    RowWords,
    Scorer,
    VariantKind,
)


class Purifier:
    def __init__(self, groups: int = 8, max_rounds: int = 3, max_variants: int = 160, chunk: int = 128,
                 ranked: int = 4, partner_window: int = 3, guess_dominance: float = 3.0):
        # A wrong guess costs a full classifying pass where the ranked tests cost a short one, so a
        # row is guessed only where its top word draws clearly more attention than the next.
        self.guess_dominance = guess_dominance
        # A phrase of four words (the attack's limit) lies within three words of any of its words.
        self.partner_window = partner_window
        self.groups = groups
        self.ranked = ranked
        self.max_rounds = max_rounds
        self.max_variants = max_variants
        self.chunk = chunk

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
        words = {r: RowWords.of(batch, r) for r in rows}
        call = PurgeCall(batch, scorer, words, {r: PurifyResult(ok=False) for r in rows}, {r: set() for r in rows})
        for r in rows:
            if not words[r].types:
                call.results[r].reason = "no user words to remove"
        active = [r for r in rows if words[r].types]
        if start_from is not None:
            self._resume(call, active, start_from)
            # a ranked test found one trigger but the text stayed flagged: look for the others
            self._keep_only_tests(call, [r for r in active if not call.results[r].grouped])
        else:
            rest = active
            if saliency is not None and self.ranked > 0:
                rest = self._ranked_tests(call, active, saliency)
            self._keep_only_tests(call, rest)
        pending = active
        if start_from is None and trust_single:
            pending = self._trust_single(call, active)
        self._deletion_rounds(call, self._verify(call, pending))
        self._prune_and_complete(call, [r for r in active if call.results[r].ok and not call.results[r].tentative])
        self._record_found(call, active)
        return call.results, call.stats

    def guess(self, batch: EncodedBatch, rows: list[int], saliency: torch.Tensor) -> dict[int, PurifyResult]:
        """Step 00, no pass: the word type the monitored token attends to most in each row (of
        `rows` with user words), returned `tentative` as the word to delete. A trigger that drives
        the monitored output draws its attention, so deleting that word is the likeliest purge; the
        guard classifies the text without it through the soft prompt, and the monitor on that
        pass, which it runs anyway, is the test. A row still flagged there goes on to `purify`, as
        does a row whose top word draws less than `guess_dominance` times the next one's attention."""
        out: dict[int, PurifyResult] = {}
        for r in rows:
            words = RowWords.of(batch, r)
            if not words.types:
                continue
            att = words.attention(saliency[r])
            top = att.topk(min(2, len(att)))
            if len(att) == 1 or float(top.values[0]) >= self.guess_dominance * float(top.values[1]):
                out[r] = _found_words(batch, r, words, {int(top.indices[0])}, PurifyResult(ok=True, tentative=True))
        return out

    def probe(self, batch: EncodedBatch, rows: list[int], scorer: Scorer, saliency: torch.Tensor,
              top: int = 2, min_attention: float = 0.0) -> tuple[list[int], PurifyStats]:
        """The `top` most salient word types of each row alone, in one pass; the rows where one
        fires (an unflagged input hiding a trigger, e.g. cancelled by another). Only rows whose
        `top` words together draw at least `min_attention` of the monitored token's attention
        are tested."""
        stats = PurifyStats()
        tested = {}
        for r in rows:
            words = RowWords.of(batch, r)
            if words.types and float(words.attention(saliency[r]).clamp(min=0).topk(
                    min(top, len(words.types))).values.sum()) >= min_attention:
                tested[r] = words
        if not tested:
            return [], stats
        call = PurgeCall(batch, scorer, tested, {r: PurifyResult(ok=False) for r in tested}, {r: set() for r in tested},
                     stats)
        self._ranked_tests(call, list(tested), saliency, top)
        return [r for r in tested if call.found[r]], stats

    # -- the steps, numbered as in the module docstring ------------------------------------------

    def _resume(self, call: PurgeCall, active: list[int], start_from: dict[int, PurifyResult]) -> None:
        """A follow-up call (`start_from`) continues from the words found and the variants spent."""
        for r in active:
            if r in start_from:
                call.found[r] = set(start_from[r].found_types)
                call.results[r].variants = start_from[r].variants
                call.results[r].grouped = start_from[r].grouped
                call.results[r].alone = set(start_from[r].alone)

    def _ranked_tests(self, call: PurgeCall, active: list[int], saliency: torch.Tensor,
                      top: int | None = None) -> list[int]:
        """Step 0: the highest-ranked word types alone; returns the rows where none fired."""
        ranked: dict[int, list[int]] = {}
        for r in active:
            ranked[r] = call.words[r].attention(saliency[r]).argsort(descending=True)[: top or self.ranked].tolist()
        self._test_singles(call, ranked)
        return [r for r in active if not call.found[r]]

    def _keep_only_tests(self, call: PurgeCall, active: list[int]) -> None:
        """Step 1: keep-only tests on groups of word types (1a), then on each word type of a
        flagged group alone (1b)."""
        for r in active:
            call.results[r].grouped = True
        groups = {r: self._groups(len(call.words[r].types)) for r in active}
        refs = [(r, members) for r in active for members in groups[r]]
        margins = self._score(call, [r for r, _ in refs], [call.words[r].keep_only(set(m)) for r, m in refs])
        positive: dict[int, list[int]] = {r: [] for r in active}
        for (r, members), m in zip(refs, margins.tolist(), strict=True):
            call.results[r].variants += 1
            if m > 0:
                positive[r].extend(members)
        singles: dict[int, list[int]] = {}
        for r in active:
            if len(groups[r]) == len(call.words[r].types):  # groups were single types already
                call.found[r].update(positive[r][: self.max_variants])
                call.results[r].alone.update(positive[r][: self.max_variants])
            else:
                singles[r] = positive[r][: self.max_variants]
        self._test_singles(call, singles)

    def _groups(self, n: int) -> list[list[int]]:
        """Step 1a: the `n` word types of a row in at most `groups` runs of consecutive types."""
        g = min(self.groups, n)
        bounds = [round(i * n / g) for i in range(g + 1)]
        return [list(range(bounds[i], bounds[i + 1])) for i in range(g)]

    def _trust_single(self, call: PurgeCall, pending: list[int]) -> list[int]:
        """With `trust_single`, a row whose keep-only tests found one word type is returned
        tentative, unverified (the guard's own pass checks it); returns the rows left to verify."""
        for r in pending:
            if len(call.found[r]) == 1:
                call.results[r].ok = call.results[r].tentative = True
        return [r for r in pending if len(call.found[r]) != 1]

    def _verify(self, call: PurgeCall, pending: list[int]) -> list[int]:
        """Step 2: every word type found deleted, one pass; returns the rows still flagged."""
        return self._keep_best(call, pending, [Deletion(r, VariantKind.VERIFY, set(call.found[r])) for r in pending])

    def _deletion_rounds(self, call: PurgeCall, pending: list[int]) -> None:
        """Step 3, where the words found do not silence the input (triggers that fire only
        together, or hide each other): each round tries every remaining word type on top of those
        found, in one pass, and keeps the best, until silent or out of rounds or variants."""
        for _ in range(self.max_rounds):
            if not pending:
                break
            tests: list[Deletion] = []
            for r in pending:
                found = call.found[r]
                rest = [t for t in range(len(call.words[r].types)) if t not in found]
                budget = self.max_variants - call.results[r].variants
                tests += [Deletion(r, VariantKind.EXTEND, found | {t}, t) for t in rest[: max(0, budget)]]
            pending = self._keep_best(call, pending, tests)
        for r in pending:
            call.results[r].reason = call.results[r].reason or f"still flagged after {self.max_rounds} deletion rounds"
            call.results[r].exhausted = True

    def _keep_best(self, call: PurgeCall, pending: list[int], tests: list[Deletion]) -> list[int]:
        """Steps 2-3: scores `tests` in one pass; per row, the word of the lowest-scoring one (if
        it tests one) joins those found. Returns the rows still flagged; a row with no test has
        spent its variant budget."""
        best: dict[int, tuple[float, int | None]] = {}
        for test, m in zip(tests, self._score_deletions(call, tests), strict=True):
            if test.row not in best or m < best[test.row][0]:
                best[test.row] = (m, test.word)
        still = []
        for r in pending:
            if r not in best:
                call.results[r].reason = f"search budget of {self.max_variants} variants exhausted"
                call.results[r].exhausted = True
                continue
            m, t = best[r]
            if t is not None:
                call.found[r].add(t)
            if m <= 0:
                call.results[r].ok = True
            else:
                still.append(r)
        return still

    def _prune_and_complete(self, call: PurgeCall, settled: list[int]) -> None:
        """Step 4: deletion tests on the full text (reliable where keep-only tests are not), one
        pass to prune the words found, then one for their neighbours and to confirm."""
        self._complete(call, self._prune(call, settled))

    def _prune(self, call: PurgeCall, settled: list[int]) -> dict[int, Pruned]:
        """Step 4, first pass: each found word deleted alone and, with several found, kept alone
        with the others deleted."""
        tests: list[Deletion] = []
        for r in settled:
            found = call.found[r]
            tests.append(Deletion(r, VariantKind.BASE, set()))
            tests += [Deletion(r, VariantKind.SOLE, {t}, t) for t in sorted(found)]
            if len(found) > 1:
                tests += [Deletion(r, VariantKind.SPARE, found - {t}, t) for t in sorted(found)]
        margin = self._margins(call, tests)
        pruned: dict[int, Pruned] = {}
        for r in settled:
            found = call.found[r]
            base = margin[r, VariantKind.BASE, None]
            # A found word stays if it fires alone in the full text (the others deleted, the input
            # stays flagged) or if deleting it alone silences the input (a trigger's word); one
            # that does neither is clean.
            sole = {t for t in found if margin[r, VariantKind.SOLE, t] <= 0} if base > 0 else set()
            spare = {t for t in found if len(found) > 1 and margin[r, VariantKind.SPARE, t] <= 0}
            pruned[r] = Pruned(base, (found - spare) | sole, sole)
        return pruned

    def _complete(self, call: PurgeCall, pruned: dict[int, Pruned]) -> None:
        """Step 4, second pass: confirm the words kept (unless they are all those found) and test
        the neighbours of a trigger's words; where confirmed, the words kept and the neighbours
        that are the rest of a phrase are the words found."""
        proposed = {r: p.keep for r, p in pruned.items() if p.keep}
        near: dict[int, list[int]] = {}
        tests: list[Deletion] = []
        for r, keep in proposed.items():
            near[r] = sorted(call.words[r].neighbours(pruned[r].sole, self.partner_window) - keep)
            tests.append(Deletion(r, VariantKind.CONFIRM, keep))
            tests += [Deletion(r, VariantKind.PARTNER, {t}, t) for t in near[r]]
            tests += [Deletion(r, VariantKind.AFTER, keep | {t}, t) for t in near[r]]
        margin = self._margins(call, tests)
        for r, keep in proposed.items():
            confirm = margin[r, VariantKind.CONFIRM, None]
            # The rest of a phrase pulls the output towards the PV, where a clean word leaves a
            # triggered output where it was: deleting it alone takes at least half the margin
            # (its partner fires only weakly alone, in a short text), or deleting it after
            # the trigger's found words moves the output at least that much further away
            # (repeated, its partner still fires alone and was found first).
            pull = pruned[r].base / 2
            partners = {t for t in near[r] if margin[r, VariantKind.PARTNER, t] <= pull
                        or margin[r, VariantKind.AFTER, t] <= confirm - pull}
            if keep == call.found[r] or confirm <= 0:
                call.found[r] = keep | partners

    def _record_found(self, call: PurgeCall, active: list[int]) -> None:
        """The words found, as each row's result reports them."""
        for r in active:
            _found_words(call.batch, r, call.words[r], call.found[r], call.results[r])

    # -- scoring ------------------------------------------------------------------------------------

    def _test_singles(self, call: PurgeCall, candidates: dict[int, list[int]]) -> None:
        """Keep-only tests of single word types, one batched pass; the ones that fire are found."""
        refs = [(r, t) for r, types in candidates.items() for t in types]
        margins = self._score(call, [r for r, _ in refs], [call.words[r].keep_only({t}) for r, t in refs])
        for (r, t), m in zip(refs, margins.tolist(), strict=True):
            call.results[r].variants += 1
            if m > 0:
                call.found[r].add(t)
                call.results[r].alone.add(t)

    def _score_deletions(self, call: PurgeCall, tests: list[Deletion]) -> list[float]:
        """Margins of the deletion variants `tests`, in order, one pass."""
        margins = self._score(call, [d.row for d in tests], [call.words[d.row].delete(d.drop) for d in tests])
        for d in tests:
            call.results[d.row].variants += 1
        return margins.tolist()

    def _margins(self, call: PurgeCall, tests: list[Deletion]) -> dict[tuple[int, VariantKind, int | None], float]:
        """Margins of the deletion variants `tests`, one pass, by row, kind and word type."""
        return dict(zip([d.key for d in tests], self._score_deletions(call, tests), strict=True))

    def _score(self, call: PurgeCall, rows: list[int], masks: list[torch.Tensor]) -> torch.Tensor:
        """Margins of the variants `masks` (attention masks over rows `rows` of the batch)."""
        if not masks:
            return torch.empty(0)
        batch = call.batch
        call.stats.passes += 1
        call.stats.variants += len(masks)
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
                call.scorer(ids[sl, :n], attn[sl, :n], tti[sl, :n] if tti is not None else None, mon[sl])
                .detach().cpu()
            )
        return torch.cat(out)


def _found_words(batch: EncodedBatch, r: int, words: RowWords, found: set[int], result: PurifyResult) -> PurifyResult:
    """`result` with the word types `found` of row `r` recorded as the words it removes."""
    drop_words = {words.types[t] for t in found}
    result.removed = sorted(drop_words)
    result.drop_units = {u for u, w in enumerate(batch.unit_words[r]) if w in drop_words}
    result.found_types = set(found)
    return result
