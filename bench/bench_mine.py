"""Mining side by side: our `lmsan_serve.mining` against the reference LMSanitator loop (arXiv
2308.13904; re-implemented in bench/reference_mine.py) on backdoored copies of one encoder.

For each model (POR and NeuBA at [CLS], BToP at [MASK], and a clean control mined at [CLS]), in one
process, on the same backbone and the shipped corpus (ours on its first `--lines`, `lmsan mine`'s
default; the reference on its own 2,000):

1. ours, detection mode: `mine(..., MiningConfig(mode="detect"))`: verdict, rounds, seconds to the
   verdict (wall time of the call: preparation, rounds, calibration), PVs kept. Told the position,
   like the reference, and again with `lmsan mine`'s default position (`MiningConfig`'s), the
   command a user would type first; where that default is the told position, one run is both;
2. the reference, detection mode (`reference_detect`), at its best: the official settings of the
   model's family, its 2,000-line corpus cut to whole batches (`--reference-lines`), once per learning rate of
   `--reference-lrs` (the official one always included); the best point (the right verdict in the
   least time) is the one compared, every point is reported: verdict, rounds, seconds, and how well
   its one PV matches a planted PV (best sign agreement);
3. ours, search mode (`--search-rounds` rounds or `--search-budget` seconds): PVs kept and how many
   planted PVs they recover (sign agreement >= 0.9 with some mined PV, as `lmsan demo` counts).

The backdoored models are planted once (`lmsan_lab.attacks`) and cached under `--out`; a folder
that already holds `truth.safetensors` is reused. Mining outputs go next to each model
(`mined-detect.safetensors`, `mined-search.safetensors`, `reference-detect-lr<lr>.json` per sweep point
and `reference-detect.json`, the best one).

    .venv/bin/python bench/bench_mine.py --quick                 # tiny random BERT, well under a minute
    .venv/bin/python bench/bench_mine.py --attacks por,clean --json runs/bench-mine.json

Progress goes to stderr; the Markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmsan_lab.attacks import AttackConfig, plant_backdoor, save_attacked
from lmsan_serve.backbone import MINILM, Backbone, load_backbone
from lmsan_serve.data import load_corpus
from lmsan_serve.errors import LmsanError
from lmsan_serve.mining import MiningConfig, mine, recovered
from lmsan_serve.monitor import sign_agreement
from lmsan_serve.signatures import SignatureSet
from lmsan_serve.testing import make_tiny_bert

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_mine import (  # noqa: E402  (sibling files, not a package)
    REFERENCE_LINES,
    reference_corpus,
    reference_defaults,
    reference_detect,
    time_floor,
    whole_batches,
)
from served import git_commit, loadavg  # noqa: E402

ATTACKS = ("por", "neuba", "btop", "clean")
# The reference's learning-rate sweep: BERT's official 5e-5, the other families' 2e-4, and 4e-4,
# where a hand run of the reference's own loop found POR's PV on MiniLM.
REFERENCE_LRS = (5e-5, 2e-4, 4e-4)


def say(msg: str) -> None:
    """Progress goes to stderr, so that stdout holds only the results."""
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Sizes:
    """Everything --quick shrinks."""

    attack_steps: int | None  # None: the AttackConfig default
    lines: int
    batch_size: int
    max_length: int
    rounds: int
    calibration_lines: int | None
    held_out_lines: int | None


FULL = Sizes(attack_steps=None, lines=MiningConfig().lines, batch_size=32, max_length=128, rounds=30,
             calibration_lines=None, held_out_lines=None)
QUICK = Sizes(attack_steps=20, lines=48, batch_size=16, max_length=48, rounds=3, calibration_lines=50,
              held_out_lines=16)


def attack_config(name: str, sizes: Sizes) -> AttackConfig:
    kind, clean = ("por", True) if name == "clean" else (name, False)
    extra: dict = {}
    if sizes.attack_steps is not None:  # tiny model: a short, strong injection is enough to exercise the code
        extra = {"steps": sizes.attack_steps, "lr": 2e-3, "max_words": 24, "check_every": sizes.attack_steps,
                 "heldout": 32}
    if clean and sizes.attack_steps is None:
        # the same amount of training as the backdoored copies get before their early stop (75 to
        # 100 steps on MiniLM); a clean control has no agreement target to stop at
        extra["steps"] = 100
    return AttackConfig(kind=kind, clean=clean, **extra)


def ensure_model(name: str, folder: Path, base: str, device: str, corpus: list[str], sizes: Sizes,
                 progress: bool) -> Path:
    """The attacked copy of `base` for `name`, planted on first use and reused after."""
    cfg = attack_config(name, sizes)
    if (folder / "truth.safetensors").is_file():
        meta = json.loads((folder / "attack.json").read_text()) if (folder / "attack.json").is_file() else {}
        made = (meta.get("base_model"), meta.get("config", {}).get("kind"), meta.get("config", {}).get("clean"))
        if made != (base, cfg.kind, cfg.clean):
            raise LmsanError(f"{folder} holds another model ({made[1]}, clean={made[2]}, base {made[0]}); "
                             "delete it or pick another --out")
        say(f"[{name}] reusing {folder}")
        return folder
    say(f"[{name}] planting {'a clean control' if cfg.clean else cfg.kind} into {base} -> {folder}")
    t0 = time.perf_counter()
    backbone = load_backbone(base, device)
    result = plant_backdoor(backbone, cfg, corpus, progress=progress)
    summary = save_attacked(result, backbone, str(folder))
    held = summary.get("heldout", {})
    say(f"[{name}] planted in {time.perf_counter() - t0:.0f} s, {result.steps} steps; held-out agreement "
        f"{held.get('min_agreement')}, clean cosine {held.get('clean_cosine', 0):.3f}")
    return folder


def _ours_detect(backbone: Backbone, config: MiningConfig, corpus: list[str], out: Path, planted: torch.Tensor,
                 args: argparse.Namespace) -> dict:
    """One `mine` call in detect mode: verdict, rounds, seconds to the verdict (the whole call)."""
    t0 = time.perf_counter()
    res = mine(backbone, config, corpus, out=out, progress=args.progress, say=say, workers=args.workers)
    return {"verdict": res.verdict, "rounds": res.rounds, "seconds": time.perf_counter() - t0, "workers": args.workers,
            "pvs": len(res.signatures), "recovered": recovered(planted, res.signatures.pvs),
            "position": str(config.position) if config.position else "every supported", "signature": str(out)}


def pick_best(points: list[dict], truth: str) -> dict:
    """The reference at its best: the least time to the right verdict. A point its budget cut short
    (undecided) may still have reached it, in no less than its `floor`, so it competes with that
    lower bound; when every point is wrong, the fastest one (the smallest time the reference could
    be credited with)."""
    possible = [p for p in points if p["verdict"] in (truth, "undecided")]
    return min(possible or points, key=lambda p: p["floor"])


def _reference_sweep(name: str, folder: Path, backbone: Backbone, truth: str, planted: torch.Tensor,
                     position: str, sizes: Sizes, corpus: list[str], args: argparse.Namespace) -> tuple[dict, list]:
    """The reference's detect mode once per learning rate of the sweep, each on its own fresh
    optimiser, the official distance threshold of the family throughout; every point's result is
    saved, the best one also as reference-detect.json."""
    official_lr, official_th = reference_defaults(backbone)
    lrs = sorted({official_lr, *args.reference_lrs})
    lines = corpus[: args.reference_lines]
    points = []
    for lr in lrs:
        budget = f", {args.reference_budget:g} s budget" if args.reference_budget else ""
        say(f"[{name}] reference, detect, lr {lr:g} ({args.rounds} rounds at most{budget}, {position}, "
            f"{len(lines)} lines)")
        t0 = time.perf_counter()
        ref = reference_detect(backbone, lines, position=position, rounds=args.rounds, lr=lr,
                               distance_th=official_th, batch_size=sizes.batch_size, max_length=sizes.max_length,
                               budget=args.reference_budget, progress=args.progress)
        seconds = time.perf_counter() - t0
        agreement = None
        if ref["pv"] is not None and len(planted):
            agreement = float(sign_agreement(planted, torch.tensor([ref["pv"]])).max())
        (folder / f"reference-detect-lr{lr:g}.json").write_text(json.dumps(ref, indent=1))
        points.append({"verdict": ref["verdict"], "rounds": ref["rounds"], "seconds": seconds,
                       "floor": max(seconds, time_floor(ref, args.rounds, truth)),
                       "pv_best_agreement": agreement, "lr": ref["lr"], "distance_th": ref["distance_th"],
                       "official_lr": lr == official_lr, "lines": len(lines), "records": ref["records"]})
        cut = ref["verdict"] == "undecided"
        bound = f" (to the right verdict: at least {points[-1]['floor']:.1f} s)" if cut else ""
        say(f"[{name}] reference at lr {lr:g}: {ref['verdict']} after {ref['rounds']} rounds, {seconds:.1f} s{bound}")
    best = pick_best(points, truth)
    saved = (folder / f"reference-detect-lr{best['lr']:g}.json").read_text()
    (folder / "reference-detect.json").write_text(saved)
    return best, points


def bench_model(name: str, folder: Path, args: argparse.Namespace, sizes: Sizes, corpus: list[str]) -> dict:
    """Ours (told the position, and with `lmsan mine`'s defaults), the reference's sweep, our search."""
    position = "mask" if name == "btop" else "cls"
    backbone: Backbone = load_backbone(str(folder), args.device)
    truth = SignatureSet.load(folder / "truth.safetensors", hidden_size=backbone.hidden_size)
    planted = truth.pvs
    common = {"lines": args.lines, "batch_size": sizes.batch_size, "max_length": sizes.max_length}
    if sizes.calibration_lines is not None:
        common.update(calibration_lines=sizes.calibration_lines, held_out_lines=sizes.held_out_lines)
    row: dict = {"attack": name, "model": str(folder), "position": position, "truth": truth.meta.verdict,
                 "planted": len(planted)}

    say(f"[{name}] ours, detect ({args.rounds} rounds at most, {position})")
    told = MiningConfig(mode="detect", max_rounds=args.rounds, position=position, **common)
    row["ours"] = _ours_detect(backbone, told, corpus, folder / "mined-detect.safetensors", planted, args)
    say(f"[{name}] ours: {row['ours']['verdict']} after {row['ours']['rounds']} rounds, "
        f"{row['ours']['seconds']:.1f} s")
    defaults = MiningConfig(mode="detect", max_rounds=args.rounds, **common)
    if args.skip_defaults:
        row["ours_defaults"] = None
    elif defaults.position == told.position:  # the same settings: the same run, not a second one
        row["ours_defaults"] = {**row["ours"], "same_run_as_ours": True}
    else:
        say(f"[{name}] ours, detect with `lmsan mine`'s default position ({defaults.position or 'every supported'})")
        row["ours_defaults"] = {**_ours_detect(backbone, defaults, corpus, folder / "mined-detect-defaults.safetensors",
                                               planted, args), "same_run_as_ours": False}

    row["reference"], row["reference_sweep"] = None, []
    if not args.skip_reference:
        row["reference"], row["reference_sweep"] = _reference_sweep(
            name, folder, backbone, row["truth"], planted, position, sizes, corpus, args)

    row["search"] = None
    if not args.skip_search:
        say(f"[{name}] ours, search ({args.search_rounds} rounds or {args.search_budget:.0f} s)")
        t0 = time.perf_counter()
        res = mine(backbone, MiningConfig(mode="search", max_rounds=args.search_rounds,
                                          time_budget=args.search_budget, position=position, **common),
                   corpus, out=folder / "mined-search.safetensors", progress=args.progress, say=say)
        row["search"] = {"verdict": res.verdict, "pvs": len(res.signatures), "rounds": res.rounds,
                         "recovered": recovered(planted, res.signatures.pvs), "seconds": time.perf_counter() - t0,
                         "signature": str(folder / "mined-search.safetensors")}
        say(f"[{name}] search: {row['search']['pvs']} PVs, {row['search']['recovered']} of {len(planted)} "
            f"planted recovered, {row['search']['seconds']:.1f} s")

    row["ours_correct"] = row["ours"]["verdict"] == row["truth"]
    row["reference_correct"] = row["reference"]["verdict"] == row["truth"] if row["reference"] else None
    # the reference's time to the right verdict, or a lower bound on it where its budget cut it short
    row["time_ratio"] = row["reference"]["floor"] / row["ours"]["seconds"] if row["reference"] else None
    row["ratio_is_lower_bound"] = row["reference"]["verdict"] != row["truth"] if row["reference"] else None
    return row


def speedups(rows: list[dict]) -> dict:
    """Per attack: the reference's best time to the right verdict over ours (told the position), with
    both verdicts. `speedup` is a speed-up to a right verdict, so it is None where ours was wrong
    (`time_ratio` keeps the plain ratio). It is a lower bound (`speedup_is_lower_bound`) where the
    reference's best point did not reach the right verdict: wrong, or undecided when its budget
    cut it short (`reference_floor`: the least time it could still have needed, `time_floor`)."""
    out = {}
    for r in rows:
        ref = r["reference"]
        out[r["attack"]] = {
            "speedup": r["time_ratio"] if r["ours_correct"] else None, "time_ratio": r["time_ratio"],
            "speedup_is_lower_bound": r["ratio_is_lower_bound"],
            "reference_floor": ref["floor"] if ref else None,
            "ours_right": r["ours_correct"], "reference_right": r["reference_correct"], "truth": r["truth"],
            "ours_verdict": r["ours"]["verdict"], "ours_seconds": r["ours"]["seconds"],
            "ours_defaults_verdict": (r["ours_defaults"] or {}).get("verdict"),
            "ours_defaults_seconds": (r["ours_defaults"] or {}).get("seconds"),
            "reference_verdict": ref["verdict"] if ref else None, "reference_seconds": ref["seconds"] if ref else None,
            "reference_lr": ref["lr"] if ref else None,
        }
    return out


def _yes(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "NO")


def _ref_seconds(point: dict | None) -> str:
    """A reference point's seconds, with the lower bound on its time to a verdict where they differ."""
    if point is None:
        return "-"
    if point["floor"] > point["seconds"] + 0.05:
        return f"{point['seconds']:.1f} (>= {point['floor']:.1f})"
    return f"{point['seconds']:.1f}"


def render(rows: list[dict], model: str) -> str:
    head = ["model", "attack", "position", "truth", "ours verdict", "ours rounds", "ours s", "ref verdict",
            "ref rounds", "ref s", "time ratio (ref/ours)", "agrees with truth (ours/ref)", "search PVs",
            "recovered", "search s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        o, f, s = r["ours"], r["reference"], r["search"]
        cells = [model, r["attack"], r["position"], r["truth"], o["verdict"], str(o["rounds"]), f"{o['seconds']:.1f}",
                 f["verdict"] if f else "-", str(f["rounds"]) if f else "-", _ref_seconds(f),
                 (">= " if r["ratio_is_lower_bound"] else "") + f"{r['time_ratio']:.2f}x" if f else "-",
                 f"{_yes(r['ours_correct'])} / {_yes(r['reference_correct'])}",
                 str(s["pvs"]) if s else "-", f"{s['recovered']} of {r['planted']}" if s else "-",
                 f"{s['seconds']:.1f}" if s else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    ours_ok = sum(r["ours_correct"] for r in rows)
    summary = f"\nverdicts agreeing with the truth: ours {ours_ok} of {len(rows)}"
    refs = [r for r in rows if r["reference"]]
    if refs:
        summary += f", reference {sum(r['reference_correct'] for r in refs)} of {len(refs)}"
        total_ours = sum(r["ours"]["seconds"] for r in refs)
        total_ref = sum(r["reference"]["floor"] for r in refs)
        bound = "at least " if any(r["ratio_is_lower_bound"] for r in refs) else ""
        summary += f"; total time to the right verdict ours {total_ours:.1f} s, reference {bound}{total_ref:.1f} s " \
                   f"({bound}{total_ref / total_ours:.2f}x)"
    for r in refs:
        points = "; ".join(f"lr {p['lr']:g}: {p['verdict']}, {p['rounds']} rounds, {_ref_seconds(p)} s"
                           for p in r["reference_sweep"])
        summary += f"\nreference sweep, {r['attack']} (best lr {r['reference']['lr']:g}): {points}"
    for r in rows:
        d = r["ours_defaults"]
        if d and not d["same_run_as_ours"]:
            summary += (f"\nours with `lmsan mine`'s default position ({d['position']}), {r['attack']}: "
                        f"{d['verdict']}, {d['rounds']} rounds, {d['seconds']:.1f} s")
    return "\n".join(lines) + summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=MINILM, help="base encoder the attacks are planted into (folder, hub id "
                    "or `minilm`; default minilm); ignored with --quick")
    ap.add_argument("--out", help="cache folder for the attacked models and mining outputs "
                    "(default runs/bench-mine; with --quick a temporary folder)")
    ap.add_argument("--attacks", default=",".join(ATTACKS),
                    help=f"comma-separated subset of {','.join(ATTACKS)} (default: all)")
    ap.add_argument("--lines", type=int, help=f"corpus lines to fuzz on, both sides (default {FULL.lines}, "
                    f"{QUICK.lines} with --quick)")
    ap.add_argument("--rounds", type=int, help=f"detection rounds at most, both sides (default {FULL.rounds}, "
                    f"{QUICK.rounds} with --quick)")
    ap.add_argument("--reference-lrs", default=",".join(f"{x:g}" for x in REFERENCE_LRS),
                    help="the reference's learning-rate sweep, comma-separated; the official lr of the model's "
                    "family is always added; the best point (right verdict, least time) is compared "
                    "(default %(default)s)")
    whole = whole_batches(REFERENCE_LINES, FULL.batch_size)
    ap.add_argument("--reference-lines", type=int, help=f"corpus lines the reference fuzzes on (default: its "
                    f"official {REFERENCE_LINES} cut to whole batches, {whole}; "
                    f"{QUICK.lines} with --quick). A count the batch size does not divide leaves it a ragged batch "
                    "under which its entropy test never passes (reference_mine.py)")
    ap.add_argument("--reference-budget", type=float, help="seconds per sweep point after which the reference "
                    "starts no round: its verdict is then 'undecided' and the speed-up a lower bound "
                    "(reference_mine.time_floor); for a CPU, where one clean point takes hours (default: none)")
    ap.add_argument("--skip-reference", action="store_true", help="do not run the reference loop")
    ap.add_argument("--skip-search", action="store_true", help="do not run our search mode")
    ap.add_argument("--skip-defaults", action="store_true", help="do not run our detect mode a second time with "
                    "`lmsan mine`'s default position (every supported one): not compared, and long on a clean model")
    ap.add_argument("--search-rounds", type=int, help="search-mode rounds at most (default 24, 4 with --quick)")
    ap.add_argument("--search-budget", type=float, help="search-mode time budget in seconds (default 900, 30 "
                    "with --quick)")
    ap.add_argument("--quick", action="store_true", help="a tiny random BERT, small corpus, few rounds: checks "
                    "that everything runs (the numbers mean nothing)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--workers", type=int, default=1, help="our detect mode's rounds in flight at once, as Ray tasks "
                    "of one CPU each on this machine (`lmsan mine --workers`; 2 uses both cores of a 2-core machine, "
                    "Ray's start counted in our time); the verdict does not depend on it (default 1: in process)")
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON here (rewritten after every "
                    "model, with \"complete\": false until the last)")
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    args.lines = sizes.lines if args.lines is None else args.lines
    args.rounds = sizes.rounds if args.rounds is None else args.rounds
    args.search_rounds = (4 if args.quick else 24) if args.search_rounds is None else args.search_rounds
    args.search_budget = (30.0 if args.quick else 900.0) if args.search_budget is None else args.search_budget
    if args.reference_lines is None:  # its corpus, cut to whole batches: else its entropy test cannot pass
        args.reference_lines = whole_batches(sizes.lines if args.quick else REFERENCE_LINES, sizes.batch_size)
    try:
        args.reference_lrs = [float(x) for x in args.reference_lrs.split(",") if x.strip()]
    except ValueError:
        ap.error("--reference-lrs takes numbers, e.g. 5e-5,2e-4,4e-4")
    if not args.reference_lrs or min(args.reference_lrs) <= 0:
        ap.error("--reference-lrs needs positive learning rates")
    if args.reference_lines < sizes.batch_size:
        ap.error(f"--reference-lines must be at least the batch size {sizes.batch_size}")
    args.attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    bad = [a for a in args.attacks if a not in ATTACKS]
    if bad or not args.attacks:
        ap.error(f"--attacks takes a subset of {','.join(ATTACKS)}; got {bad or 'nothing'}")
    if args.lines < sizes.batch_size:
        ap.error(f"--lines must be at least the batch size {sizes.batch_size}")
    if args.rounds < 1 or args.search_rounds < 1 or args.search_budget <= 0:
        ap.error("--rounds, --search-rounds and --search-budget must be positive")
    if args.reference_budget is not None and args.reference_budget <= 0:
        ap.error("--reference-budget must be positive")
    if args.workers < 1:
        ap.error("--workers must be at least 1")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be at least 1")
    return args


def run(args: argparse.Namespace) -> dict:
    """Plant (or reuse) each model and bench it; the summary, rows included. Raises LmsanError/OSError."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its "Loading weights" bars, too
    sizes = QUICK if args.quick else FULL
    started = time.perf_counter()
    load_start = loadavg()
    tmp = None
    if args.out is None and args.quick:
        tmp = tempfile.TemporaryDirectory(prefix="bench-mine-quick-")
    out = Path(tmp.name if tmp else (args.out or "runs/bench-mine"))
    rows: list[dict] = []
    commit = git_commit()
    corpus = load_corpus()
    _, corpus_note = reference_corpus(corpus)
    if corpus_note and not args.quick:
        say(f"note: {corpus_note}; the reference fuzzes on all of them")
    args.reference_lines = min(args.reference_lines, len(corpus))
    try:
        out.mkdir(parents=True, exist_ok=True)
        base = args.model
        if args.quick:
            tiny = out / "tiny-bert"
            if not (tiny / "config.json").is_file():  # a cached one is reused
                make_tiny_bert(tiny, hidden=64)
            base = str(tiny)
        for name in args.attacks:
            folder = ensure_model(name, out / name, base, args.device, corpus, sizes, args.progress)
            rows.append(bench_model(name, folder, args, sizes, corpus))
            summary = {"command": shlex.join([sys.executable, *sys.argv]), "commit": commit, "base_model": base,
                       "model_label": "tiny-bert" if args.quick else base, "quick": args.quick,
                       "complete": len(rows) == len(args.attacks), "device": args.device,
                       "torch": torch.__version__, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                       "platform": platform.platform(), "load_average": {"start": load_start, "end": loadavg()},
                       "lines": args.lines, "rounds": args.rounds, "workers": args.workers,
                       "reference_lines": args.reference_lines, "reference_corpus_note": corpus_note,
                       "reference_lrs": args.reference_lrs, "reference_budget": args.reference_budget,
                       "search_rounds": args.search_rounds, "search_budget": args.search_budget,
                       "seconds": time.perf_counter() - started, "speedups": speedups(rows), "rows": rows}
            if args.json:  # after every model, so that an interrupted run keeps what it measured
                Path(args.json).write_text(json.dumps(summary, indent=2))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return summary


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    try:
        summary = run(args)
    except (LmsanError, OSError) as exc:
        say(f"error: {exc}")
        return 2
    print(render(summary["rows"], summary["model_label"]))
    load = summary["load_average"]
    print(f"\nbase {summary['base_model']}, {args.lines} lines (reference: {args.reference_lines}, lr sweep "
          f"{','.join(f'{x:g}' for x in args.reference_lrs)}), detect rounds {args.rounds}, search "
          f"{args.search_rounds} rounds / {args.search_budget:.0f} s; device {args.device}, "
          f"{summary['threads']} threads, {summary['cpus']} CPUs; 1-min load {load['start']} at start, "
          f"{load['end']} at end; total {summary['seconds']:.1f} s")
    if args.json:
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
