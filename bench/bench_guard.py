"""Side-by-side cost of the guard against faithful re-implementations of the LMSanitator reference.

Two figures, each measured in one run on the same inputs so that the ratios are meaningful even on
a noisy machine:

1. Monitor: our `Monitor` (one product of sign matrices) against the reference's Python loop over
   samples and PVs, on real output vectors of the guarded model, single-threaded. The reference
   scores single PVs only, so the like-for-like check runs our monitor on single PVs too: every
   per-PV score bit for bit, every flag and best PV the same. The monitor the guard runs also
   scores combinations of PVs: it must keep every single-PV flag, and the inputs only a
   combination flags are counted apart. The script fails on any mismatch.
2. Purge: our `Purifier` (through `Guard` in enforce mode) against the reference purge batched like
   the official harness (every single-word deletion, scored in batches of 32, left to right, up to
   the first batch that holds a deletion silencing the monitor; `reference_purge` says why there),
   on SST-2 (or WikiText) text clipped to 16/64/128 words with one trigger at a random position.
   The ms ratio (p50 and mean) is the comparison; passes and rows say where the time went.

`--quick` runs both on the tiny backdoored BERT of bench/tiny_artifacts.py, guarded with the
signatures mined from it, with fewer inputs and repeats: it checks that the script runs.

Run `python bench/bench_guard.py --help`; see bench/README.md for what it prints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from lmsan_serve.backbone import Backbone, load_backbone
from lmsan_serve.data import load_corpus, load_examples, shipped
from lmsan_serve.encoding import normalize_text
from lmsan_serve.errors import LmsanError
from lmsan_serve.guard import Guard, GuardResult, GuardStats
from lmsan_serve.monitor import Monitor
from lmsan_serve.prompts import PromptClassifier
from lmsan_serve.signatures import SignatureSet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from served import (  # noqa: E402  (sibling files, not a package)
    command_line,
    covered_triggers,
    loadavg,
    resolve_model,
    resolve_prompt,
    resolve_signatures,
    say,
)
from tiny_artifacts import add_quick_options, check_quick_options, quick_artifacts  # noqa: E402

# -- one plain pass (classifier + monitor), shared by the reference paths ---------------------------


@dataclass
class Pass:
    label: str
    flagged: bool


class PlainPass:
    """Encode one text, run the prompted encoder once, read label and monitor verdict.

    This is what the reference does for every candidate text. It reuses our `Monitor`, so the
    purge comparison measures the purge procedure, not the monitor's scoring (part 1 covers
    that)."""

    def __init__(self, guard: Guard):
        assert guard.monitor is not None and guard.signatures is not None
        self.guard = guard
        self.monitor: Monitor = guard.monitor

    @torch.no_grad()
    def __call__(self, text: str) -> Pass:
        g = self.guard
        batch = g.classifier.encode(g.backbone, [text])
        out = g.classifier.forward_batch(g.backbone, batch)
        mon = self.monitor(g._monitored(out.hidden, batch.monitor_index, g.classifier.cls_index))
        return Pass(g.classifier.labels[int(out.logits[0].argmax())], bool(mon.flagged[0]))

    @torch.no_grad()
    def batch(self, texts: list[str]) -> list[Pass]:
        """One pass over several texts, padded together (the reference harness's batched scoring)."""
        g = self.guard
        enc = g.classifier.encode(g.backbone, texts)
        out = g.classifier.forward_batch(g.backbone, enc)
        mon = self.monitor(g._monitored(out.hidden, enc.monitor_index, g.classifier.cls_index))
        return [Pass(g.classifier.labels[int(out.logits[i].argmax())], bool(mon.flagged[i])) for i in range(len(texts))]

    @torch.no_grad()
    def features(self, texts: list[str]) -> torch.Tensor:
        g = self.guard
        batch = g.classifier.encode(g.backbone, texts)
        out = g.classifier.forward_batch(g.backbone, batch)
        return g._monitored(out.hidden, batch.monitor_index, g.classifier.cls_index).float().cpu()


# -- 1. monitor ------------------------------------------------------------------------------------


def pv_columns(monitor: Monitor) -> list[int | None]:
    """Per PV, the slice of [N, P, H] features holding the output it describes (None: an output
    the guard does not read, e.g. [MASK] without a cloze prompt: never scored, never flags)."""
    watched = getattr(monitor, "watched", None)
    positions = getattr(monitor.signatures, "pv_positions", None)
    if watched is None or positions is None:  # one output for every PV
        return [0] * int(monitor.pvs.shape[0])
    return [watched.index(p) if p in watched else None for p in positions]


def _output(x: torch.Tensor, column: int) -> torch.Tensor:
    """One sample's output at `column`: x itself when the features hold one output per sample."""
    return x if x.ndim == 1 else x[column]


def per_pv_scores(monitor: Monitor, x: torch.Tensor) -> list[list[float]]:
    """Our metric's per-PV scores, each PV read at its own output (0 where it is not watched)."""
    cols = pv_columns(monitor)
    if x.ndim == 2:
        return monitor.metric(x, monitor.pvs).tolist()
    out = torch.zeros(x.shape[0], len(cols))
    for k, c in enumerate(cols):
        if c is not None:
            out[:, k] = monitor.metric(x[:, c], monitor.pvs[k : k + 1])[:, 0]
    return out.tolist()


def reference_monitor(features: torch.Tensor, pvs: torch.Tensor, thresholds: torch.Tensor,
                      columns: list[int | None] | None = None) -> tuple[list[bool], list[int], list[list[float]]]:
    """The reference monitor: per sample, per PV, the share of dimensions whose signs agree, flag
    above the threshold. It scores single PVs only, never combinations of them. Best PV: the one
    furthest over its threshold, else the highest score (first on ties), which is the rule
    `Monitor` documents. Features [N, H], or [N, P, H] with `columns` naming each PV's output
    (a signature set mined at several outputs). Returns flags, best PVs and every sample's per-PV scores."""
    flagged, best, scores = [], [], []
    for x in features:
        row = []
        best_score, best_k = -math.inf, -1
        best_margin, best_margin_k = -math.inf, -1
        for k, pv in enumerate(pvs):
            col = 0 if columns is None else columns[k]
            # a PV at an output not read scores 0 and never flags, as in `Monitor`
            score = 0.0 if col is None else float((torch.sign(_output(x, col)) == torch.sign(pv)).float().mean())
            margin = score - float(thresholds[k])
            row.append(score)
            if score > best_score:
                best_score, best_k = score, k
            if margin > best_margin:
                best_margin, best_margin_k = margin, k
        hit = best_margin > 0
        flagged.append(hit)
        best.append(best_margin_k if hit else best_k)
        scores.append(row)
    return flagged, best, scores


@dataclass
class MonitorBench:
    batches: int
    batch_size: int
    hidden: int
    pvs: int
    combinations: int  # PV combinations our deployed monitor also scores (the reference scores none)
    threads: int
    vectors_flagged: int  # by a single PV: the reference's decision, which ours must match
    combination_only: int  # flagged by our deployed monitor through a PV combination alone
    ours_ms: float  # median ms per batch, our Monitor on single PVs: the same work as the reference
    reference_ms: float
    speedup: float  # reference / ours, like for like
    ours_with_combinations_ms: float  # the monitor the guard runs: single PVs and their combinations
    speedup_with_combinations: float
    identical: bool  # per-PV scores bit for bit, single-PV flags and best PVs, and no flag lost
    mismatches: list[str] = field(default_factory=list)


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def monitor_inputs(plain: PlainPass, triggers: list[str], sentences: list[str], n: int, seed: int) -> torch.Tensor:
    """[n, H] real output vectors of the guarded model; every other one has a trigger inserted."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        s = rng.choice(sentences)
        if i % 2:
            words = s.split()
            words.insert(rng.randint(0, len(words)), triggers[(i // 2) % len(triggers)])
            s = " ".join(words)
        texts.append(s)
    return plain.features(texts)


def compare_monitors(single: Monitor, deployed: Monitor, x: torch.Tensor, where: str) -> tuple[list[str], int, int]:
    """Like with like: our single-PV monitor against the reference loop (every per-PV score bit for
    bit, flag, best PV), then our deployed monitor, which also scores PV combinations: it must keep
    every single-PV flag and name the same PV there; what it flags beyond that must be named by a
    combination. Returns the mismatches, the single-PV flags and the combination-only flags.

    Scores match exactly: (H + s.p) / 2H and mean(s == p) are the same rational number, rounded once."""
    ref_flag, ref_best, ref_scores = reference_monitor(x, single.pvs, single.thresholds, pv_columns(single))
    ours_scores = per_pv_scores(single, x)
    ours, full = single(x), deployed(x)
    k = single.pvs.shape[0]
    mismatches, combo_only = [], 0
    for i in range(len(x)):
        row = f"{where} row {i}"
        if ours_scores[i] != ref_scores[i]:
            mismatches.append(f"{row}: per-PV scores {ours_scores[i]}, reference {ref_scores[i]}")
        o = (bool(ours.flagged[i]), int(ours.best[i]), float(ours.score[i]))
        r = (ref_flag[i], ref_best[i], ref_scores[i][ref_best[i]])
        if o != r:
            mismatches.append(f"{row}: single-PV flag/best/score {o}, reference {r}")
        flag, best = bool(full.flagged[i]), int(full.best[i])
        if ref_flag[i] and (not flag or best != ref_best[i]):
            mismatches.append(f"{row}: deployed monitor flag/best {(flag, best)}, reference {(True, ref_best[i])}")
        elif flag and not ref_flag[i]:
            combo_only += 1
            if best < k:
                mismatches.append(f"{row}: flagged by the deployed monitor only, but it names PV {best}")
    return mismatches, sum(ref_flag), combo_only


def bench_monitor(plain: PlainPass, sig: SignatureSet, triggers: list[str], sentences: list[str],
                  n_batches: int, repeats: int, seed: int) -> MonitorBench:
    """Real output vectors (half of them triggered), scored by the monitors on one thread."""
    if sig.metric != "sign":
        raise LmsanError(f"{sig.path}: the reference monitor scores sign agreement; this file uses {sig.metric}")
    size = 32
    feats = monitor_inputs(plain, triggers, sentences, n_batches * size, seed)
    # the outputs the guard reads (a set mined at several outputs: those the prompt holds)
    watched = {"watched": plain.guard.watched} if hasattr(plain.guard, "watched") else {}
    single = Monitor(sig, combinations=False, **watched)  # on the CPU, like the loop
    deployed = Monitor(sig, **watched)  # what the guard runs
    pvs, thresholds, columns = single.pvs, single.thresholds, pv_columns(single)
    batches = [feats[i * size : (i + 1) * size] for i in range(n_batches)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mismatches: list[str] = []
        flagged_total = combo_total = 0
        for b, x in enumerate(batches):
            bad, flagged, combo = compare_monitors(single, deployed, x, f"batch {b}")
            mismatches += bad
            flagged_total += flagged
            combo_total += combo
        for _ in range(3):  # warm-up
            single(batches[0])
            deployed(batches[0])
            reference_monitor(batches[0], pvs, thresholds, columns)
        ours_ms = statistics.median(_median_ms(lambda x=x: single(x), repeats * 10) for x in batches)
        full_ms = statistics.median(_median_ms(lambda x=x: deployed(x), repeats * 10) for x in batches)
        ref_ms = statistics.median(
            _median_ms(lambda x=x: reference_monitor(x, pvs, thresholds, columns), repeats) for x in batches
        )
    finally:
        torch.set_num_threads(threads)
    return MonitorBench(
        batches=n_batches, batch_size=size, hidden=int(feats.shape[-1]), pvs=int(pvs.shape[0]),
        combinations=len(deployed.combos), threads=1, vectors_flagged=flagged_total, combination_only=combo_total,
        ours_ms=ours_ms, reference_ms=ref_ms, speedup=ref_ms / ours_ms, ours_with_combinations_ms=full_ms,
        speedup_with_combinations=ref_ms / full_ms, identical=not mismatches, mismatches=mismatches[:10],
    )


# -- 2. purge --------------------------------------------------------------------------------------


REFERENCE_BATCH = 32  # the official harness scores deletion variants 32 at a time


@dataclass
class RefPurge:
    passes: int  # batched deletion passes after the first classifying pass
    rows: int  # deletion variants scored in them
    silenced: bool
    label: str
    removed: str | None


def reference_purge(plain: PlainPass, text: str, batch: int = REFERENCE_BATCH) -> tuple[Pass, RefPurge | None]:
    """The reference purge, batched like the official harness: if the text is flagged, build every
    single-word-deletion variant (one per distinct word, every copy of it removed) and score them
    in batches of `batch`, left to right. It stops at the end of the first batch that holds a
    variant silencing the monitor and keeps the first such variant: the cheapest run of the
    harness that finds what scoring every batch would (the first silencing variant), so the
    reference is credited with its lowest cost."""
    first = plain(text)
    if not first.flagged:
        return first, None
    words = text.split()
    keys: list[str] = []
    variants: list[str] = []
    for w in words:
        key = w.lower()
        shorter = " ".join(x for x in words if x.lower() != key)
        if key in keys or not shorter:
            continue
        keys.append(key)
        variants.append(shorter)
    passes = rows = 0
    for s in range(0, len(variants), batch):
        results = plain.batch(variants[s : s + batch])
        passes += 1
        rows += len(results)
        for key, now in zip(keys[s : s + batch], results, strict=True):
            if not now.flagged:
                return first, RefPurge(passes, rows, True, now.label, key)
    return first, RefPurge(passes, rows, False, first.label, None)


@dataclass
class Case:
    clean: str
    text: str
    trigger: str
    truncated: bool


def build_cases(plain: PlainPass, source: list[str], words: int, count: int, triggers: list[str],
                rng: random.Random) -> list[Case]:
    """Concatenate consecutive source sentences from a random start, clip to `words` words, insert
    one trigger at a random word position. Positions are drawn among the words that survive the
    prompt's token window (a trigger cut off by truncation never reaches the encoder)."""
    g = plain.guard
    cases = []
    for i in range(count):
        start = rng.randrange(len(source))
        acc: list[str] = []
        j = start
        while len(acc) < words:
            acc.extend(source[j % len(source)].split())
            j += 1
        clean = normalize_text(" ".join(acc[:words]))
        batch = g.classifier.encode(g.backbone, [clean])
        kept_end = max((e for _, _, e in batch.unit_spans[0]), default=0)
        ends, pos = [], 0
        for w in clean.split():
            pos = clean.index(w, pos) + len(w)
            ends.append(pos)
        kept = sum(1 for e in ends if e <= kept_end)
        limit = max(0, kept - 3) if kept < len(ends) else len(ends)
        at = rng.randint(0, limit)
        trig = triggers[i % len(triggers)]
        split = clean.split()
        text = " ".join(split[:at] + [trig] + split[at:])
        cases.append(Case(clean, text, trig, kept < len(ends)))
    return cases


@dataclass
class LengthBench:
    words: int
    inputs: int
    truncated: int
    clean_flagged: int
    triggered_flagged: int
    first_pass_disagreements: int  # guard and plain pass flag the same text differently
    ours_passes: float  # mean batched purge passes per flagged input (incl. the re-check pass)
    ours_rows: float  # mean variant rows scored per flagged input
    ref_passes: float  # mean batched deletion passes per flagged input (batches of 32 variants)
    ref_rows: float  # mean deletion variants the reference scored per flagged input
    ours_mean_ms: float
    ref_mean_ms: float
    ours_p50_ms: float
    ref_p50_ms: float
    clean_p50_ms: float
    ours_success: float  # monitor silenced and clean label restored, over flagged inputs
    ref_success: float
    ours_exact: float  # removed exactly the trigger
    ref_exact: float

    @property
    def speedup_mean(self) -> float:
        return self.ref_mean_ms / self.ours_mean_ms if self.ours_mean_ms else math.nan

    @property
    def speedup_p50(self) -> float:
        return self.ref_p50_ms / self.ours_p50_ms if self.ours_p50_ms else math.nan


T = TypeVar("T")


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    """fn's result and its wall time in ms."""
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1e3


def _mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan


def _p50(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def bench_length(guard: Guard, plain: PlainPass, words: int, cases: list[Case]) -> LengthBench:
    """Per input, interleaved so that both methods see the same machine state: clean through the
    guard, triggered through the guard, triggered through the reference. Wall times include the
    first classifying pass for both; purge figures are over inputs flagged on that pass."""
    # Warm-up: one untimed round of each path.
    guard.classify([cases[0].text])
    reference_purge(plain, cases[0].text)
    clean_ms, ours_ms, ref_ms = [], [], []
    ours_passes, ours_rows, ref_passes, ref_rows = [], [], [], []
    ours_ok, ref_ok, ours_exact, ref_exact = [], [], [], []
    clean_flagged = flagged = disagree = 0
    for n, c in enumerate(cases):
        clean_label = plain(c.clean)
        clean_flagged += int(clean_label.flagged)

        clean_ms.append(_timed(lambda c=c: guard.classify([c.clean]))[1])

        stats = GuardStats()

        def run_ours(c: Case = c, stats: GuardStats = stats) -> GuardResult:
            return guard.classify([c.text], stats=stats)[0]

        def run_ref(c: Case = c) -> tuple[Pass, RefPurge | None]:
            return reference_purge(plain, c.text)

        # Alternate which method goes first, so that neither always runs on a warmer cache.
        if n % 2:
            (first, ref), t_ref = _timed(run_ref)
            res, t_ours = _timed(run_ours)
        else:
            res, t_ours = _timed(run_ours)
            (first, ref), t_ref = _timed(run_ref)

        disagree += int(first.flagged != res.guard.flagged)  # the same pass: should never happen
        if ref is None or not res.guard.flagged:
            continue  # not flagged: nothing to purge
        flagged += 1
        ours_ms.append(t_ours)
        ref_ms.append(t_ref)
        ours_passes.append(stats.purge_passes)
        ours_rows.append(stats.purge_variants)
        ref_passes.append(ref.passes)
        ref_rows.append(ref.rows)
        ours_ok.append(res.guard.action == "purged" and res.label == clean_label.label)
        ref_ok.append(ref.silenced and ref.label == clean_label.label)
        ours_exact.append(res.guard.removed == [c.trigger.lower()])
        ref_exact.append(ref.removed == c.trigger.lower())
    return LengthBench(
        words=words, inputs=len(cases), truncated=sum(c.truncated for c in cases),
        clean_flagged=clean_flagged, triggered_flagged=flagged, first_pass_disagreements=disagree,
        ours_passes=_mean(ours_passes), ours_rows=_mean(ours_rows), ref_passes=_mean(ref_passes),
        ref_rows=_mean(ref_rows), ours_mean_ms=_mean(ours_ms), ref_mean_ms=_mean(ref_ms),
        ours_p50_ms=_p50(ours_ms), ref_p50_ms=_p50(ref_ms),
        clean_p50_ms=_p50(clean_ms), ours_success=_mean(ours_ok), ref_success=_mean(ref_ok),
        ours_exact=_mean(ours_exact), ref_exact=_mean(ref_exact),
    )


# -- report ----------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                                 enumerate(zip(cells, widths, strict=True))) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def render(mon: MonitorBench, purge: list[LengthBench]) -> str:
    vectors = mon.batches * mon.batch_size
    out = [
        f"Monitor: {mon.batches} batches of {mon.batch_size} x {mon.hidden} output vectors, {mon.pvs} PVs, "
        f"1 thread ({mon.vectors_flagged} of {vectors} vectors flagged by a single PV)",
        "",
        _table(["monitor", "ms / batch"], [
            ["reference (loop over samples x PVs)", f"{mon.reference_ms:.3f}"],
            ["lmsan `Monitor` (one sign-matrix product)", f"{mon.ours_ms:.3f}"],
            ["speedup", f"{mon.speedup:.0f}x"],
            [f"lmsan `Monitor` + {mon.combinations} PV combinations (what the guard runs)",
             f"{mon.ours_with_combinations_ms:.3f}"],
        ]),
        "",
        f"Identical per-PV scores, flag decisions and best-PV choices: {'yes' if mon.identical else 'NO'} "
        f"({vectors} vectors, {mon.vectors_flagged} flagged); flagged only through a PV combination, which the "
        f"reference does not score: {mon.combination_only}",
        "",
        "Purge (per triggered input, flagged inputs only; times include the first classifying pass):",
        "",
    ]

    def pct(x: float) -> str:
        return "-" if math.isnan(x) else f"{100 * x:.0f}%"

    def num(x: float, fmt: str = ".1f") -> str:
        return "-" if math.isnan(x) else format(x, fmt)

    rows = []
    for p in purge:
        rows.append([
            str(p.words),
            f"{p.triggered_flagged}/{p.inputs}",
            f"{num(p.ours_passes)} ({num(p.ours_rows, '.0f')} rows)",
            f"{num(p.ref_passes)} ({num(p.ref_rows, '.0f')} rows)",
            f"{num(p.ours_mean_ms, '.0f')} / {num(p.ours_p50_ms, '.0f')}",
            f"{num(p.ref_mean_ms, '.0f')} / {num(p.ref_p50_ms, '.0f')}",
            f"{num(p.speedup_mean)}x / {num(p.speedup_p50)}x",
            num(p.clean_p50_ms, ".0f"),
            f"{num(p.ours_p50_ms / p.clean_p50_ms)}x / {num(p.ref_p50_ms / p.clean_p50_ms)}x",
            f"{pct(p.ours_success)} / {pct(p.ref_success)}",
        ])
    out.append(_table(
        ["words", "flagged", "passes ours (rows)", "passes ref (rows)", "ms ours mean / p50", "ms ref mean / p50",
         "ref / ours (mean / p50)", "clean p50 ms", "triggered / clean p50 (ours / ref)",
         "purged + label restored (ours / ref)"],
        rows,
    ))
    notes = [
        "",
        "passes: forward passes spent purging one input after its first classifying pass, both batched",
        "(rows = variant rows scored in them); ours include one re-check pass of the purged text; the",
        f"reference scores every single-word deletion in batches of {REFERENCE_BATCH}, up to the first batch that",
        "silences the monitor.",
    ]
    for p in purge:
        extra = [f"{p.words} words: removed exactly the trigger: {pct(p.ours_exact)} ours, "
                 f"{pct(p.ref_exact)} ref"]
        if p.clean_flagged:
            extra.append(f"{p.clean_flagged} clean inputs flagged")
        if p.first_pass_disagreements:
            extra.append(f"{p.first_pass_disagreements} inputs flagged by one path only")
        if p.truncated:
            extra.append(f"{p.truncated} inputs cut by the prompt's token window (trigger kept inside it)")
        notes.append("; ".join(extra))
    return "\n".join(out + notes)


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", help="backdoored model folder from `lmsan attack` (default: "
                    "lmsan-out/demo/por, else lmsan-out/bench/por, made on demand)")
    ap.add_argument("--prompt", help="prompt folder from `lmsan train-prompt` (default: a cached "
                    "SST-2 prompt for the model, else one trained into lmsan-out/bench/)")
    ap.add_argument("--signatures", help="signature file the guard uses (default: the set mined for the model, "
                    "bench/served.py; MODEL/truth.safetensors serves the planted PVs); inputs carry only the "
                    "triggers whose PV it covers")
    ap.add_argument("--inputs", type=int, help="triggered inputs per length (default 30, 10 with --quick)")
    add_quick_options(ap, "its victim prompt and mined signatures, fewer inputs and repeats; checks that the "
                      "script runs (the timings mean little)")
    ap.add_argument("--lengths", default="16,64,128", help="input lengths in words, comma-separated")
    ap.add_argument("--source", choices=["sst2", "wikitext"], default="sst2",
                    help="text to build inputs from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu",
                    help="cpu, cuda or auto (the monitor part always runs on the CPU)")
    ap.add_argument("--json", metavar="PATH", help="also write a JSON summary here")
    args = ap.parse_args(argv)
    check_quick_options(ap, args, {"--model": args.model, "--prompt": args.prompt, "--signatures": args.signatures})
    if args.inputs is None:
        args.inputs = 10 if args.quick else 30
    if args.inputs < 1:
        ap.error("--inputs must be at least 1")
    try:
        args.lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        ap.error("--lengths takes integers, e.g. 16,64,128")
    if not args.lengths or min(args.lengths) < 1:
        ap.error("--lengths needs positive integers")
    return args


@dataclass
class Setup:
    """What one run guards: the model, its prompt, the signature set, and which triggers it covers."""

    model_dir: Path
    backbone: Backbone
    classifier: PromptClassifier
    sig: SignatureSet
    truth: SignatureSet  # the planted PVs: which triggers exist, and which of them `sig` covers
    triggers: list[str]
    missed: list[str]  # planted triggers whose PV `sig` does not cover: left out of the inputs


def load_setup(model_dir: Path, prompt: str | None, signatures: str | None, device: str) -> Setup:
    """Load the model, prompt and signature set; refuse a set that covers none of the triggers."""
    backbone = load_backbone(str(model_dir), device)
    classifier = resolve_prompt(prompt, backbone)
    truth = SignatureSet.load(model_dir / "truth.safetensors", hidden_size=backbone.hidden_size,
                              fingerprint=backbone.fingerprint)
    sig = SignatureSet.load(resolve_signatures(signatures, model_dir), hidden_size=backbone.hidden_size,
                            fingerprint=backbone.fingerprint)
    triggers, missed = covered_triggers(truth, sig)
    if not triggers:
        raise LmsanError(f"{sig.path} covers none of the planted triggers {missed}")
    return Setup(model_dir, backbone, classifier, sig, truth, triggers, missed)


def run(args: argparse.Namespace, setup: Setup) -> tuple[MonitorBench, list[LengthBench]]:
    """Both parts of the benchmark on one setup."""
    guard = Guard(setup.backbone, setup.classifier, setup.sig, mode="enforce")
    plain = PlainPass(guard)
    sst2 = [e.text for e in load_examples(shipped("sst2/dev.jsonl"))]
    source = sst2 if args.source == "sst2" else load_corpus()
    say(f"[1/2] monitor: real output vectors, {len(setup.sig)} PVs, single thread")
    mon = bench_monitor(plain, setup.sig, setup.triggers, sst2, n_batches=2 if args.quick else 4,
                        repeats=10 if args.quick else 30, seed=args.seed)
    purge = []
    rng = random.Random(args.seed)
    for n in args.lengths:
        say(f"[2/2] purge: {args.inputs} inputs of {n} words ({torch.get_num_threads()} threads)")
        cases = build_cases(plain, source, n, args.inputs, setup.triggers, rng)
        purge.append(bench_length(guard, plain, n, cases))
    return mon, purge


def summarize(args: argparse.Namespace, setup: Setup, mon: MonitorBench, purge: list[LengthBench], cmd: str,
              load: tuple[float | None, float | None]) -> dict:
    """The JSON summary: settings, machine, and both parts' figures."""
    return {
        "command": cmd,
        "quick": args.quick,
        "model": str(setup.model_dir),
        "signatures": str(setup.sig.path),
        "truth": str(setup.truth.path),
        "triggers": setup.triggers,
        "missed_triggers": setup.missed,
        "device": str(setup.backbone.device),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "load_average": {"start": load[0], "end": load[1]},
        "source": args.source,
        "seed": args.seed,
        "monitor": asdict(mon),
        "purge": [{**asdict(p), "speedup_mean": p.speedup_mean, "speedup_p50": p.speedup_p50} for p in purge],
    }


def measure(args: argparse.Namespace, model_dir: Path, prompt: str | None, signatures: str | None
            ) -> tuple[dict, str]:
    """Both parts on one model: the JSON summary and the printed report. Raises LmsanError when the
    model, prompt or signature file is unusable."""
    load_start = loadavg()
    say(f"model: {model_dir}")
    setup = load_setup(model_dir, prompt, signatures, args.device)
    if setup.missed:
        say(f"note: {setup.sig.path} does not cover the triggers {setup.missed}; they are left out of the inputs")
    mon, purge = run(args, setup)
    cmd = command_line()
    load_end = loadavg()
    text = "\n".join([
        render(mon, purge),
        f"\nmodel {model_dir} ({len(setup.triggers)} triggers covered, {len(setup.missed)} not), signatures "
        f"{setup.sig.path}, source {args.source}, seed {args.seed}, device {setup.backbone.device}, "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads for the purge part; "
        f"1-min load average {load_start} at start, {load_end} at end (absolute ms grow with load, the "
        "side-by-side ratios much less)",
        f"command: {cmd}",
    ])
    return summarize(args, setup, mon, purge, cmd, (load_start, load_end)), text


def bench(args: argparse.Namespace, model_dir: Path, prompt: str | None, signatures: str | None) -> int:
    """Run, print and write the benchmark on one model; 1 when the monitors disagree."""
    try:
        summary, text = measure(args, model_dir, prompt, signatures)
    except LmsanError as exc:
        say(f"error: {exc}")
        return 2
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
        say(f"wrote {args.json}")
    mon = summary["monitor"]
    if not mon["identical"]:
        say("FAIL: the monitors disagree:\n  " + "\n  ".join(mon["mismatches"]))
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is first imported
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    if not args.quick:
        try:
            model_dir = resolve_model(args.model)
        except LmsanError as exc:
            say(f"error: {exc}")
            return 2
        return bench(args, model_dir, args.prompt, args.signatures)
    torch.set_num_threads(1)  # a tiny model gains nothing from threads; a busy machine loses with them
    try:
        with quick_artifacts(args.cache) as art:
            return bench(args, Path(art.model), art.prompt, art.mined)
    except LmsanError as exc:
        say(f"error: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
