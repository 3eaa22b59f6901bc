"""Purging: find the trigger words of flagged inputs and drop them.

The reference deletes one word per forward pass, left to right. We instead run group tests in
batched passes. A variant of an input keeps a subset of its tokens (no re-tokenization: the word
map from `encoding` says which tokens form each word), so all variants of all flagged inputs go
in one batch:

00. the guess (`Purifier.guess`, no pass of its own): where the monitored token's last-layer
   attention singles out one word (the top word draws `guess_dominance` times the next one's), the
   guard deletes it untested and classifies the text without it through the soft prompt; the
   monitor on that pass, which the guard runs anyway, is the test. A right guess makes the purge
   one pass beside the classifying pass; a row still flagged goes on to the steps below. The
   guard guesses only for a PV whose earlier purges found lone words that fire by themselves
   (`guard.TriggerShapes`): deleting one word of a phrase trigger can silence the monitor and
   leave the rest of the phrase in the text, which the steps below would have traced.
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
   skips this step: where a phrase was traced, the keep-only tests had already found both of its
   words, so that path is rare.

`Purifier.purify` runs each step as a method named after it: `_ranked_tests` (0), `_keep_only_tests`
(1), `_verify` (2), `_deletion_rounds` (3) and `_prune_and_complete` (4).

Variants are scored without the soft prompt, on the bare encoder: the PVs describe its outputs,
a trigger fires there whatever the task, and the variants are short. The guard then classifies the
purged text with the prompt and checks it with the monitor once more.

Work is bounded: a call makes at most `6 + max_rounds` batched passes, and an input gets at most
`ranked + groups + max_variants` variants, plus one verify per call, two prune tests per call and
at most `2 + 4 * partner_window` per occurrence of a word found, counted across a call and its
follow-up.
"""

from .purifier import Purifier
from .records import PurifyResult, PurifyStats, RowWords, Scorer

__all__ = ["Purifier", "PurifyResult", "PurifyStats", "RowWords", "Scorer"]
