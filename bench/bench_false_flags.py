"""False flags on clean traffic after per-task calibration, on more test inputs than the removal
run's 200: how far the rate measured on the calibration inputs carries to unseen ones, and what
more calibration inputs buy. In process, guard mode `flag` (no purge), per task of the removal
split (lmsan_lab.removal.TASKS); inputs that already hold a trigger's tokens are counted apart.

    .venv/bin/python bench/bench_false_flags.py --tasks sms_spam,ag_news --test 1000 --calibrate 500,1500
    .venv/bin/python bench/bench_false_flags.py --quick --json runs/false-flags-quick.json

Each calibration size is run both ways, side by side: `held-out` (thresholds fitted on half the
inputs, then the split-conformal margin from the other half) and `exact` (fitted to all of them,
the guard's default).

Needs the POR copy and the set mined from it (`lmsan demo` writes lmsan-out/demo/por and
lmsan-out/demo/mined/search.safetensors) and the removal run's prompts (`lmsan eval removal all
--model lmsan-out/demo/por --out lmsan-out/matrix/por ...` writes OUT/prompts/TASK). Calibration
rows are the last N training rows: up to 500 the prompt never trained on them (they pick its
checkpoint); beyond 500 they reach into its training rows.

`--quick` needs none of them: it runs on the tiny backdoored BERT of bench/tiny_artifacts.py with
its mined signatures, 200 test inputs and 0 or 100 calibration inputs per task, and serves every
task with the tiny victim prompt (trained on a toy task, not on these; false flags depend on the
outputs the monitor sees, not on the labels). It checks that the script runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from lmsan_lab.evaluation import holds_trigger
from lmsan_lab.removal import TASKS
from lmsan_serve import load_backbone
from lmsan_serve.backbone import Backbone
from lmsan_serve.data import Example, comma_list, text_pairs
from lmsan_serve.errors import LmsanError
from lmsan_serve.guard import Guard
from lmsan_serve.prompts import PromptClassifier
from lmsan_serve.signatures import SignatureSet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from served import resolve_signatures  # noqa: E402  (sibling files, not a package)
from tiny_artifacts import add_quick_options, check_quick_options, quick_artifacts  # noqa: E402

HEADER = ("| task | calibration inputs | method | flagged on them (after) | bound on unseen | combinations off | "
          "test inputs | false flags | of them holding a trigger | false flags without those |\n"
          "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")


def task_rows(backbone: Backbone, classifier: PromptClassifier, sig: SignatureSet, task: str, args: argparse.Namespace,
              triggers: list[str]) -> Iterator[dict]:
    """One row per calibration size and method: a fresh guard calibrated on the task's last
    training rows, then the false flags on its first `--test` test rows."""
    train, test = TASKS[task].load()
    test = test[: args.test]
    holds = [holds_trigger(e, triggers) for e in test]
    for n, method in [(size, m) for size in args.calibrate for m in (args.methods if size else ["-"])]:
        guard = Guard(backbone, classifier, sig, mode="flag")
        row: dict = {"task": task, "calibration_inputs": n, "method": method, "flagged_on_them": None,
                     "fpr_bound": None, "combinations_off": None}
        if n:
            rows = train[-n:]
            done = guard.calibrate([e.text for e in rows], text_pairs(rows), args.target_fpr,
                                   held_out=method == "held-out")
            row.update(flagged_on_them=done.flag_rate_after, fpr_bound=done.fpr_bound,
                       combinations_off=done.combinations_off)
        flags = flag_all(guard, test)
        flagged = sum(flags)
        holding = sum(f and h for f, h in zip(flags, holds, strict=True))
        row.update(test_inputs=len(test), flagged=flagged, holding_trigger=holding,
                   false_flags=flagged / len(test), false_flags_without=(flagged - holding) / len(test))
        yield row


def flag_all(guard: Guard, examples: list[Example]) -> list[bool]:
    """The guard's flag for every input, in batches of 64."""
    flags: list[bool] = []
    for s in range(0, len(examples), 64):
        chunk = examples[s : s + 64]
        flags += [r.guard.flagged for r in guard.classify([e.text for e in chunk], text_pairs(chunk))]
    return flags


def render_row(r: dict) -> str:
    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    off = "-" if r["combinations_off"] is None else str(r["combinations_off"])
    return (f"| {r['task']} | {r['calibration_inputs']} | {r['method']} | {fmt(r['flagged_on_them'])} | "
            f"{fmt(r['fpr_bound'])} | {off} | {r['test_inputs']} | {r['false_flags']:.4f} | {r['holding_trigger']} | "
            f"{r['false_flags_without']:.4f} |")


def run(model: str, signatures: str, prompt_for: Callable[[str], str], args: argparse.Namespace) -> list[dict]:
    """Every task's rows, printed as they come; `prompt_for(task)` names the task's prompt folder."""
    try:
        backbone = load_backbone(model, "cpu")
        sig = SignatureSet.load(signatures, hidden_size=backbone.hidden_size)
    except LmsanError as exc:  # the inputs come from earlier runs: say which, not a traceback
        raise LmsanError(f"{exc} (see this script's docstring for the runs that make --model, --signatures, "
                         "--prompts)") from exc
    print(HEADER)
    rows = []
    for task in args.tasks:
        classifier = PromptClassifier.load(prompt_for(task), backbone)
        for row in task_rows(backbone, classifier, sig, task, args, args.triggers):
            print(render_row(row), flush=True)
            rows.append(row)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="backdoored model (default lmsan-out/demo/por)")
    ap.add_argument("--signatures", help="signature file (default: the set mined for the model, bench/served.py)")
    ap.add_argument("--prompts", help="folder with one prompt per task (default lmsan-out/matrix/por/prompts)")
    ap.add_argument("--triggers", default="cf,mn,tq,qt,mm,pt")
    ap.add_argument("--tasks", help="tasks to run (default sms_spam,ag_news)")
    ap.add_argument("--test", type=int, help="clean test inputs per task (default 1000, 200 with --quick)")
    ap.add_argument("--calibrate", help="calibration sizes to compare, 0: none (default 0,500,1500; 0,100 with "
                    "--quick)")
    ap.add_argument("--target-fpr", type=float, default=0.005)
    ap.add_argument("--methods", default="held-out,exact", help="calibrations to compare: held-out, exact")
    add_quick_options(ap, "its mined signatures and victim prompt, few inputs; checks that the script runs")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    check_quick_options(ap, args, {"--model": args.model, "--signatures": args.signatures, "--prompts": args.prompts})
    args.tasks = comma_list(args.tasks or "sms_spam,ag_news")
    args.test = (200 if args.quick else 1000) if args.test is None else args.test
    args.methods = comma_list(args.methods)
    args.triggers = comma_list(args.triggers)
    if not args.methods or set(args.methods) - {"held-out", "exact"}:
        ap.error("--methods takes held-out and/or exact")
    if unknown := [t for t in args.tasks if t not in TASKS]:
        ap.error(f"unknown task(s) {unknown}: choose from {', '.join(TASKS)}")
    try:
        args.calibrate = [int(x) for x in comma_list(args.calibrate or ("0,100" if args.quick else "0,500,1500"))]
    except ValueError:
        ap.error("--calibrate takes integers, e.g. 0,500,1500")
    if not args.calibrate or min(args.calibrate) < 0 or args.test < 1 or not 0 < args.target_fpr < 1:
        ap.error("--calibrate needs sizes >= 0, --test at least 1, --target-fpr in (0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1 if args.quick else 2)
    try:
        if args.quick:
            with quick_artifacts(args.cache) as art:
                rows = run(art.model, art.mined, lambda _task: art.prompt, args)
        else:
            prompts = args.prompts or "lmsan-out/matrix/por/prompts"
            model = args.model or "lmsan-out/demo/por"
            rows = run(model, str(resolve_signatures(args.signatures, Path(model))),
                       lambda task: f"{prompts}/{task}", args)
    except LmsanError as exc:
        print(f"bench_false_flags: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "cache")}
        Path(args.json).write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
