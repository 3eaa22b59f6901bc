"""Side-by-side cost of the guard against faithful re-implementations of the LMSanitator reference.

Two figures, each measured in one run on the same inputs so that the ratios are meaningful even on
a noisy machine:

1. Monitor: our `Monitor` (one product of sign matrices) against the reference's Python loop over
   samples and PVs, on real output vectors of the guarded model, single-threaded. Both must make
   identical flag decisions and best-PV choices; the script fails otherwise.
2. Purge: our `Purifier` (through `Guard` in enforce mode) against the reference purge (delete one
   word per forward pass, left to right, stop at the first deletion that silences the monitor), on
   SST-2 (or WikiText) text clipped to 16/64/128 words with one trigger at a random position.

Run `python bench/bench_guard.py --help`; see bench/README.md for what it prints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from lmsan_serve.backbone import MINILM, Backbone, load_backbone
from lmsan_serve.data import load_corpus, load_examples, shipped
from lmsan_serve.encoding import normalize_text
from lmsan_serve.errors import LmsanError
from lmsan_serve.guard import Guard, GuardResult, GuardStats
from lmsan_serve.monitor import Monitor, MonitorResult
from lmsan_serve.prompts import PromptClassifier, PromptConfig, train_prompt
from lmsan_serve.signatures import SignatureSet

DEMO_DIR = Path("lmsan-out/demo")
BENCH_DIR = Path("lmsan-out/bench")
BENCH_PROMPT = PromptConfig(method="prefix", max_steps=150)


def say(msg: str) -> None:
    """Progress goes to stderr, so that stdout holds only the results."""
    print(msg, file=sys.stderr, flush=True)


# -- artifacts ------------------------------------------------------------------------------------


def _is_model_dir(p: Path) -> bool:
    return (p / "truth.safetensors").is_file() and (p / "config.json").is_file()


def resolve_model(arg: str | None) -> Path:
    """--model, else the demo's backdoored minilm, else ours under lmsan-out/bench (made on demand)."""
    if arg is not None:
        p = Path(arg)
        if not _is_model_dir(p):
            raise LmsanError(f"{p}: not a model folder written by `lmsan attack` (needs truth.safetensors)")
        return p
    for p in (DEMO_DIR / "por", BENCH_DIR / "por"):
        if _is_model_dir(p):
            return p
    from lmsan_serve.attacks import AttackConfig, plant_backdoor, save_attacked

    out = BENCH_DIR / "por"
    say(f"no backdoored model found; planting a POR backdoor into minilm -> {out} "
        "(with the prompt below, about 10 minutes on a 2-core CPU; `lmsan demo` makes the same model)")
    clean = load_backbone(MINILM, "cpu")
    result = plant_backdoor(clean, AttackConfig(kind="por"), load_corpus())
    save_attacked(result, clean, str(out))
    return out


def resolve_prompt_dir(arg: str | None, backbone: Backbone) -> Path:
    """--prompt, else the first cached SST-2 prompt trained on these exact weights, else train one."""
    if arg is not None:
        PromptClassifier.load(arg, backbone)  # refuse a prompt made for other weights now
        return Path(arg)
    own = BENCH_DIR / f"prompt-sst2-{backbone.fingerprint[:12]}"
    for p in (DEMO_DIR / "prompt-sst2", BENCH_DIR / "prompt-sst2", own):
        if (p / "manifest.json").is_file():
            try:
                PromptClassifier.load(p, backbone)
            except LmsanError as exc:
                say(f"skipping {p}: {exc}")
                continue
            say(f"prompt: {p}")
            return p
    if backbone.name.rstrip("/").endswith(str(DEMO_DIR / "por")):
        say(f"note: {DEMO_DIR / 'prompt-sst2'} is missing; if `lmsan demo` is still running, wait for it")
    say(f"training an SST-2 prefix prompt (150 steps) -> {own} (several minutes on a 2-core CPU)")
    classifier = train_prompt(backbone, BENCH_PROMPT, load_examples(shipped("sst2/train.jsonl")),
                              load_examples(shipped("sst2/dev.jsonl"))[:300])
    return classifier.save(own)


def resolve_prompt(arg: str | None, backbone: Backbone) -> PromptClassifier:
    return PromptClassifier.load(resolve_prompt_dir(arg, backbone), backbone)


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
        self.position = guard.signatures.position

    @torch.no_grad()
    def __call__(self, text: str) -> Pass:
        g = self.guard
        batch = g.classifier.encode(g.backbone, [text])
        out = g.classifier.forward_batch(g.backbone, batch)
        mon = self.monitor(g.backbone.select(out.hidden, self.position, batch.monitor_index))
        return Pass(g.classifier.labels[int(out.logits[0].argmax())], bool(mon.flagged[0]))

    @torch.no_grad()
    def features(self, texts: list[str]) -> torch.Tensor:
        g = self.guard
        batch = g.classifier.encode(g.backbone, texts)
        out = g.classifier.forward_batch(g.backbone, batch)
        return g.backbone.select(out.hidden, self.position, batch.monitor_index).float().cpu()


# -- 1. monitor ------------------------------------------------------------------------------------


def reference_monitor(features: torch.Tensor, pvs: torch.Tensor, thresholds: torch.Tensor
                      ) -> tuple[list[bool], list[int], list[float]]:
    """The reference monitor: per sample, per PV, the share of dimensions whose signs agree, flag
    above the threshold. Best PV: the one furthest over its threshold, else the highest score
    (first on ties), which is the rule `Monitor` documents. Returns flags, best PVs, their scores."""
    flagged, best, scores = [], [], []
    for x in features:
        row = []
        best_score, best_k = -math.inf, -1
        best_margin, best_margin_k = -math.inf, -1
        for k, pv in enumerate(pvs):
            score = float((torch.sign(x) == torch.sign(pv)).float().mean())
            margin = score - float(thresholds[k])
            row.append(score)
            if score > best_score:
                best_score, best_k = score, k
            if margin > best_margin:
                best_margin, best_margin_k = margin, k
        hit = best_margin > 0
        flagged.append(hit)
        best.append(best_margin_k if hit else best_k)
        scores.append(row[best[-1]])
    return flagged, best, scores


@dataclass
class MonitorBench:
    batches: int
    batch_size: int
    hidden: int
    pvs: int
    threads: int
    vectors_flagged: int
    ours_ms: float  # median ms per batch
    reference_ms: float
    speedup: float
    identical: bool
    mismatches: list[str] = field(default_factory=list)


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bench_monitor(plain: PlainPass, sig: SignatureSet, triggers: list[str], sentences: list[str],
                  n_batches: int, repeats: int, seed: int) -> MonitorBench:
    """Real output vectors (half of them triggered), scored by both monitors on one thread."""
    rng = random.Random(seed)
    size = 32
    texts = []
    for i in range(n_batches * size):
        s = rng.choice(sentences)
        if i % 2:
            words = s.split()
            words.insert(rng.randint(0, len(words)), triggers[(i // 2) % len(triggers)])
            s = " ".join(words)
        texts.append(s)
    feats = plain.features(texts)
    monitor = Monitor(sig)  # on the CPU, like the loop
    pvs, thresholds = monitor.pvs, monitor.thresholds
    batches = [feats[i * size : (i + 1) * size] for i in range(n_batches)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mismatches: list[str] = []
        flagged_total = 0
        for b, x in enumerate(batches):
            ours: MonitorResult = monitor(x)
            ref_flag, ref_best, ref_score = reference_monitor(x, pvs, thresholds)
            flagged_total += sum(ref_flag)
            for i in range(len(x)):
                # Scores must match exactly too: (H + s.p) / 2H and mean(s == p) are the same
                # rational number, rounded once.
                o = (bool(ours.flagged[i]), int(ours.best[i]), float(ours.score[i]))
                r = (ref_flag[i], ref_best[i], ref_score[i])
                if o != r:
                    mismatches.append(f"batch {b} row {i}: ours flag/best/score {o}, reference {r}")
        for _ in range(3):  # warm-up
            monitor(batches[0])
            reference_monitor(batches[0], pvs, thresholds)
        ours_ms = statistics.median(_median_ms(lambda x=x: monitor(x), repeats * 10) for x in batches)
        ref_ms = statistics.median(
            _median_ms(lambda x=x: reference_monitor(x, pvs, thresholds), repeats) for x in batches
        )
    finally:
        torch.set_num_threads(threads)
    return MonitorBench(
        batches=n_batches, batch_size=size, hidden=int(feats.shape[1]), pvs=int(pvs.shape[0]), threads=1,
        vectors_flagged=flagged_total, ours_ms=ours_ms, reference_ms=ref_ms, speedup=ref_ms / ours_ms,
        identical=not mismatches, mismatches=mismatches[:10],
    )


# -- 2. purge --------------------------------------------------------------------------------------


@dataclass
class RefPurge:
    passes: int  # deletion passes after the first classifying pass
    silenced: bool
    label: str
    removed: str | None


def reference_purge(plain: PlainPass, text: str) -> tuple[Pass, RefPurge | None]:
    """The reference purge: if flagged, delete each word (all copies of it) from the original text,
    left to right, one forward pass per deletion; stop at the first that silences the monitor."""
    first = plain(text)
    if not first.flagged:
        return first, None
    words = text.split()
    tried: set[str] = set()
    passes = 0
    for w in words:
        key = w.lower()
        if key in tried:
            continue
        tried.add(key)
        shorter = " ".join(x for x in words if x.lower() != key)
        if not shorter:
            continue
        passes += 1
        now = plain(shorter)
        if not now.flagged:
            return first, RefPurge(passes, True, now.label, key)
    return first, RefPurge(passes, False, first.label, None)


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
    ref_passes: float  # mean sequential deletion passes per flagged input
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
    ours_passes, ours_rows, ref_passes = [], [], []
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
        ours_ok.append(res.guard.action == "purged" and res.label == clean_label.label)
        ref_ok.append(ref.silenced and ref.label == clean_label.label)
        ours_exact.append(res.guard.removed == [c.trigger.lower()])
        ref_exact.append(ref.removed == c.trigger.lower())
    return LengthBench(
        words=words, inputs=len(cases), truncated=sum(c.truncated for c in cases),
        clean_flagged=clean_flagged, triggered_flagged=flagged, first_pass_disagreements=disagree,
        ours_passes=_mean(ours_passes), ours_rows=_mean(ours_rows), ref_passes=_mean(ref_passes),
        ours_mean_ms=_mean(ours_ms), ref_mean_ms=_mean(ref_ms),
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
    out = [
        f"Monitor: {mon.batches} batches of {mon.batch_size} x {mon.hidden} output vectors, {mon.pvs} PVs, "
        f"1 thread ({mon.vectors_flagged} of {mon.batches * mon.batch_size} vectors flagged)",
        "",
        _table(["monitor", "ms / batch"], [
            ["reference (loop over samples x PVs)", f"{mon.reference_ms:.3f}"],
            ["lmsan `Monitor` (one sign-matrix product)", f"{mon.ours_ms:.3f}"],
            ["speedup", f"{mon.speedup:.0f}x"],
        ]),
        "",
        f"Identical flag decisions and best-PV choices: {'yes' if mon.identical else 'NO'}",
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
            num(p.ref_passes),
            f"{num(p.ours_mean_ms, '.0f')} / {num(p.ours_p50_ms, '.0f')}",
            f"{num(p.ref_mean_ms, '.0f')} / {num(p.ref_p50_ms, '.0f')}",
            f"{num(p.speedup_mean)}x / {num(p.speedup_p50)}x",
            num(p.clean_p50_ms, ".0f"),
            f"{num(p.ours_p50_ms / p.clean_p50_ms)}x / {num(p.ref_p50_ms / p.clean_p50_ms)}x",
            f"{pct(p.ours_success)} / {pct(p.ref_success)}",
        ])
    out.append(_table(
        ["words", "flagged", "passes ours (rows)", "passes ref", "ms ours mean / p50", "ms ref mean / p50",
         "ref / ours (mean / p50)", "clean p50 ms", "triggered / clean p50 (ours / ref)",
         "purged + label restored (ours / ref)"],
        rows,
    ))
    notes = [
        "",
        "passes: forward passes spent purging one input after its first classifying pass: ours are",
        "batched (rows = variant rows scored in them) and include one re-check pass of the purged text;",
        "the reference's are sequential, one row each.",
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


def _loadavg() -> float | None:
    """1-minute load average: other processes on a small machine inflate absolute times."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def command_line() -> str:
    exe = sys.executable
    try:
        rel = os.path.relpath(exe)
        exe = rel if not rel.startswith("..") else exe
    except ValueError:
        pass
    return shlex.join([exe, *sys.argv])


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", help="backdoored model folder from `lmsan attack` (default: "
                    "lmsan-out/demo/por, else lmsan-out/bench/por, made on demand)")
    ap.add_argument("--prompt", help="prompt folder from `lmsan train-prompt` (default: a cached "
                    "SST-2 prompt for the model, else one trained into lmsan-out/bench/)")
    ap.add_argument("--inputs", type=int, help="triggered inputs per length (default 30, 10 with --quick)")
    ap.add_argument("--quick", action="store_true", help="fewer inputs and repeats")
    ap.add_argument("--lengths", default="16,64,128", help="input lengths in words, comma-separated")
    ap.add_argument("--source", choices=["sst2", "wikitext"], default="sst2",
                    help="text to build inputs from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu",
                    help="cpu, cuda or auto (the monitor part always runs on the CPU)")
    ap.add_argument("--json", metavar="PATH", help="also write a JSON summary here")
    args = ap.parse_args(argv)
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


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is first imported
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    load_start = _loadavg()
    try:
        model_dir = resolve_model(args.model)
        say(f"model: {model_dir}")
        backbone = load_backbone(str(model_dir), args.device)
        classifier = resolve_prompt(args.prompt, backbone)
        sig = SignatureSet.load(model_dir / "truth.safetensors", hidden_size=backbone.hidden_size,
                                fingerprint=backbone.fingerprint)
    except LmsanError as exc:
        say(f"error: {exc}")
        return 2
    triggers = [r.trigger for r in sig.meta.pvs if r.trigger]
    if not triggers:
        say(f"error: {sig.path} names no triggers (a --clean control model?)")
        return 2
    guard = Guard(backbone, classifier, sig, mode="enforce")
    plain = PlainPass(guard)
    sst2 = [e.text for e in load_examples(shipped("sst2/dev.jsonl"))]
    source = sst2 if args.source == "sst2" else load_corpus()

    say(f"[1/2] monitor: real output vectors, {len(sig)} PVs, single thread")
    mon = bench_monitor(plain, sig, triggers, sst2, n_batches=2 if args.quick else 4,
                        repeats=10 if args.quick else 30, seed=args.seed)
    purge = []
    rng = random.Random(args.seed)
    for n in args.lengths:
        say(f"[2/2] purge: {args.inputs} inputs of {n} words ({torch.get_num_threads()} threads)")
        cases = build_cases(plain, source, n, args.inputs, triggers, rng)
        purge.append(bench_length(guard, plain, n, cases))

    report = render(mon, purge)
    cmd = command_line()
    print(report)
    load_end = _loadavg()
    print(f"\nmodel {model_dir} ({len(triggers)} triggers), source {args.source}, seed {args.seed}, "
          f"device {backbone.device}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads for the purge part; 1-min load average {load_start} at start, "
          f"{load_end} at end (absolute ms grow with load, the side-by-side ratios much less)")
    print(f"command: {cmd}")
    if args.json:
        summary = {
            "command": cmd,
            "model": str(model_dir),
            "device": str(backbone.device),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "load_average": {"start": load_start, "end": load_end},
            "source": args.source,
            "seed": args.seed,
            "monitor": asdict(mon),
            "purge": [{**asdict(p), "speedup_mean": p.speedup_mean, "speedup_p50": p.speedup_p50}
                      for p in purge],
        }
        Path(args.json).write_text(json.dumps(summary, indent=2))
        say(f"wrote {args.json}")
    if not mon.identical:
        say("FAIL: the monitors disagree:\n  " + "\n  ".join(mon.mismatches))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
