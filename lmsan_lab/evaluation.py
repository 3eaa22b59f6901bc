"""Clean accuracy and attack success rate (ASR) with the guard off and on.

Protocol (after the paper, arXiv 2308.13904): take the clean inputs the unguarded model gets
right; insert each trigger separately at a random word position (<= 64); an input counts as
attacked once if any trigger makes the returned label wrong. With the guard on, a blocked input
is not an attack success (the attacker did not get a label), a purged one is judged by the label
returned for its purged text. Type I = wrong label and not flagged; Type II = flagged but the
label returned after purging is wrong.

Adaptive variants (`adaptive.py`) dress the trigger up; an attacked input counts only where its
control (the same dressing without the trigger) is still classified right, so the ASR measures
the trigger, not the punctuation around it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm.auto import tqdm

from lmsan_serve.client import GuardClient
from lmsan_serve.data import Example, text_pairs
from lmsan_serve.guard import Guard, GuardResult, GuardStats

from .adaptive import PAIR_ONLY, VARIANTS, attacked_examples

# classify(examples, mode, stats) -> one result per example, with the guard in `mode` ("off" or
# "enforce"); a local Guard (`local_runner`) or the served endpoint (`http_runner`).
Runner = Callable[[list[Example], str, GuardStats], list[GuardResult]]


def local_runner(guard: Guard, batch_size: int = 64) -> Runner:
    def run(examples: list[Example], mode: str, stats: GuardStats) -> list[GuardResult]:
        saved, guard.mode = guard.mode, mode
        try:
            out: list[GuardResult] = []
            for i in range(0, len(examples), batch_size):
                chunk = examples[i : i + batch_size]
                out.extend(guard.classify([e.text for e in chunk], text_pairs(chunk), stats=stats))
            return out
        finally:
            guard.mode = saved

    return run


def http_runner(client: GuardClient, tasks: dict[str, str], chunk: int = 16, clients: int = 4) -> Runner:
    """A `Runner` that classifies through the served endpoint (`client`, shared by `clients` threads,
    which retries as documented): mode -> task name."""

    def run(examples: list[Example], mode: str, stats: GuardStats) -> list[GuardResult]:
        parts = [examples[i : i + chunk] for i in range(0, len(examples), chunk)]
        as_inputs = [[e.text if not e.text_pair else {"text": e.text, "text_pair": e.text_pair} for e in part]
                     for part in parts]
        with ThreadPoolExecutor(clients) as pool:
            out = [r for rs in pool.map(lambda inputs: client.classify(tasks[mode], inputs), as_inputs) for r in rs]
        stats.inputs += len(out)
        stats.flagged += sum(r.guard.flagged for r in out)
        return out

    return run


def _as_runner(guard: Guard | Runner, batch_size: int) -> Runner:
    return local_runner(guard, batch_size) if isinstance(guard, Guard) else guard


def _run(runner: Runner, examples: list[Example], mode: str, desc: str, progress: bool,
         stats: GuardStats, step: int = 64) -> list[GuardResult]:
    out: list[GuardResult] = []
    for i in tqdm(range(0, len(examples), step), desc=desc, disable=not progress or not examples, unit="batch"):
        out.extend(runner(examples[i : i + step], mode, stats))
    return out


@dataclass
class GuardEvaluation:
    cacc_off: float
    cacc_on: float
    asr_off: float
    asr_on: float
    false_flag_rate: float  # clean inputs flagged
    holding_trigger: int  # clean inputs that already hold a trigger (a common-word trigger's, say)
    holding_flagged: int  # of those, flagged: the backdoor firing on them, no false flag in substance
    false_flags_without: float  # the false-flag rate over the clean inputs that hold no trigger
    triggered_flag_rate: float  # triggered inputs flagged
    type1: int
    type2: int
    blocked: int
    purged: int
    detections: int  # triggered inputs flagged
    correct: int  # clean inputs the unguarded model gets right, with a valid control (ASR denominator)
    attacked: int  # (input, trigger) pairs sent
    inputs: int
    triggers: list[str]
    guard_seconds_per_input: float
    purge_passes_per_flagged: float
    seconds: float

    def table(self) -> str:
        rows = [
            ("clean accuracy", f"{self.cacc_off:.3f}", f"{self.cacc_on:.3f}"),
            ("attack success rate", f"{self.asr_off:.3f}", f"{self.asr_on:.3f}"),
            ("false flags on clean", "-", f"{self.false_flag_rate:.3f}"),
            ("  without those holding one", "-", f"{self.false_flags_without:.3f}"),
            ("triggered inputs flagged", "-", f"{self.triggered_flag_rate:.3f}"),
        ]
        lines = [f"{'':26s} {'guard off':>10s} {'guard on':>10s}"]
        lines += [f"{a:26s} {b:>10s} {c:>10s}" for a, b, c in rows]
        lines.append(
            f"{self.inputs} clean inputs, {self.correct} correct, {len(self.triggers)} triggers; "
            f"purged {self.purged}, blocked {self.blocked}, type I {self.type1}, type II {self.type2}; "
            f"{self.holding_trigger} clean inputs hold a trigger already ({self.holding_flagged} flagged)"
        )
        return "\n".join(lines)


def holds_trigger(example: Example, triggers: list[str]) -> bool:
    """Whether a clean input already holds one of `triggers` as whole words (either text of a pair):
    a common word as trigger occurs in real text, and the backdoor fires there too. Whole words
    only, so a trigger a longer word starts with is not counted, though its first word piece may
    be the trigger's (AG News's `MMCmicro` tokenizes to `mm` + ..., and `mm` fires there)."""
    text = f"{example.text} {example.text_pair or ''}".lower()
    return any(re.search(rf"(?<!\w){re.escape(t.lower())}(?!\w)", text) for t in triggers)


@dataclass
class CleanRuns:
    """The clean inputs classified with the guard off and on, shared by every trigger variant."""

    off: list[GuardResult]
    on: list[GuardResult]
    stats: GuardStats


def run_clean(guard: Guard | Runner, examples: list[Example], *, batch_size: int = 64,
              progress: bool = True) -> CleanRuns:
    runner = _as_runner(guard, batch_size)
    stats = GuardStats()
    off = _run(runner, examples, "off", "clean, guard off", progress, GuardStats(), batch_size)
    on = _run(runner, examples, "enforce", "clean, guard on", progress, stats, batch_size)
    return CleanRuns(off, on, stats)


def evaluate_guard(
    guard: Guard | Runner,
    examples: list[Example],
    triggers: list[str],
    *,
    variant: str = "plain",
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
    clean: CleanRuns | None = None,
) -> GuardEvaluation:
    """`variant` names how each trigger is put in (`adaptive.VARIANTS`; `plain`: the paper's protocol).
    `guard` is a local Guard or a `Runner` (e.g. the served endpoint over HTTP)."""
    started = time.time()
    runner = _as_runner(guard, batch_size)
    clean = clean or run_clean(runner, examples, batch_size=batch_size, progress=progress)
    clean_off, clean_on, stats = clean.off, clean.on, clean.stats
    correct = [i for i, (r, e) in enumerate(zip(clean_off, examples, strict=True)) if r.label == e.label]
    made = attacked_examples(variant, [examples[i] for i in correct], triggers, seed)
    if variant != "plain":  # plain's control is the clean text itself, already right
        controls = _run(runner, [c for _, _, c in made], "off", f"{variant} control", progress, GuardStats(),
                        batch_size)
        made = [m for m, c in zip(made, controls, strict=True) if c.label == m[2].label]
    owner = [correct[j] for j, _, _ in made]
    attacked = [a for _, a, _ in made]
    trig_off = _run(runner, attacked, "off", f"{variant}, guard off", progress, GuardStats(), batch_size)
    trig_stats = GuardStats()
    trig_on = _run(runner, attacked, "enforce", f"{variant}, guard on", progress, trig_stats, batch_size)
    n = len(examples)
    holding = [i for i, e in enumerate(examples) if holds_trigger(e, triggers)]
    clean_flags = sum(r.guard.flagged for r in clean_on)
    holding_flagged = sum(clean_on[i].guard.flagged for i in holding)
    beaten_off: set[int] = set()
    beaten_on: set[int] = set()
    type1 = type2 = blocked = purged = flagged = 0
    for i, e, off, on in zip(owner, attacked, trig_off, trig_on, strict=True):
        if off.label != e.label:
            beaten_off.add(i)
        v = on.guard
        flagged += int(v.flagged)
        blocked += int(v.action == "blocked")
        purged += int(v.action == "purged")
        if on.label is not None and on.label != e.label:
            beaten_on.add(i)
            if v.flagged:
                type2 += 1
            else:
                type1 += 1
    denom = max(1, len(set(owner)))
    return GuardEvaluation(
        cacc_off=sum(r.label == e.label for r, e in zip(clean_off, examples, strict=True)) / n,
        cacc_on=sum(r.label == e.label for r, e in zip(clean_on, examples, strict=True)) / n,
        asr_off=len(beaten_off) / denom,
        asr_on=len(beaten_on) / denom,
        false_flag_rate=clean_flags / n,
        holding_trigger=len(holding),
        holding_flagged=holding_flagged,
        false_flags_without=(clean_flags - holding_flagged) / max(1, n - len(holding)),
        triggered_flag_rate=flagged / max(1, len(attacked)),
        type1=type1,
        type2=type2,
        blocked=blocked,
        purged=purged,
        detections=flagged,
        correct=len(set(owner)),
        attacked=len(attacked),
        inputs=n,
        triggers=list(triggers),
        guard_seconds_per_input=(stats.guard_seconds + trig_stats.guard_seconds) / max(1, n + len(attacked)),
        purge_passes_per_flagged=trig_stats.purge_passes / max(1, trig_stats.flagged),
        seconds=round(time.time() - started, 1),
    )


def evaluate_adaptive(
    guard: Guard | Runner,
    examples: list[Example],
    triggers: list[str],
    variants: list[str] | None = None,
    *,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, GuardEvaluation]:
    """ASR with the guard off and on for each adaptive trigger variant; the clean runs are shared.
    Pair-only variants are skipped on single-text examples."""
    paired = all(e.text_pair for e in examples)
    names = [v for v in (variants or list(VARIANTS)) if paired or v not in PAIR_ONLY]
    runner = _as_runner(guard, batch_size)
    clean = run_clean(runner, examples, batch_size=batch_size, progress=progress)
    return {v: evaluate_guard(runner, examples, triggers, variant=v, seed=seed, batch_size=batch_size,
                              progress=progress, clean=clean) for v in names}
