"""False flags on clean traffic after per-task calibration, on more test inputs than the removal
run's 200: how far the rate measured on the calibration inputs carries to unseen ones, and what
more calibration inputs buy. In process, guard mode `flag` (no purge), per task of the removal
split (lmsan_serve.removal.TASKS); inputs that already hold a trigger's tokens are counted apart.

    .venv/bin/python bench/bench_false_flags.py --tasks sms_spam,ag_news --test 1000 --calibrate 500,1500

Each calibration size is run both ways, side by side: `held-out` (the default: thresholds fitted
on half the inputs, then the split-conformal margin from the other half) and `exact` (fitted to
all of them, as before the margin).

Needs the POR copy (`lmsan demo` writes lmsan-out/demo/por), its mined search signatures
(`bench/bench_mine.py --attacks por --skip-reference --search-rounds 16` writes
runs/bench-mine/por/mined-search.safetensors) and the removal run's prompts (`lmsan eval --removal
...` writes OUT/prompts/TASK). Calibration
rows are the last N training rows: up to 500 the prompt never trained on them (they pick its
checkpoint); beyond 500 they reach into its training rows.
"""

from __future__ import annotations

import argparse
import sys

import torch

from lmsan_serve import load_backbone
from lmsan_serve.data import comma_list, text_pairs
from lmsan_serve.errors import LmsanError
from lmsan_serve.guard import Guard
from lmsan_serve.prompts import PromptClassifier
from lmsan_serve.removal import TASKS, holding_trigger
from lmsan_serve.signatures import SignatureSet


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="lmsan-out/demo/por")
    ap.add_argument("--signatures", default="runs/bench-mine/por/mined-search.safetensors")
    ap.add_argument("--prompts", default="lmsan-out/removal-minilm-cal/prompts")
    ap.add_argument("--triggers", default="cf,mn,tq,qt,mm,pt")
    ap.add_argument("--tasks", default="sms_spam,ag_news")
    ap.add_argument("--test", type=int, default=1000, help="clean test inputs per task")
    ap.add_argument("--calibrate", default="0,500,1500", help="calibration sizes to compare (0: none)")
    ap.add_argument("--target-fpr", type=float, default=0.005)
    ap.add_argument("--methods", default="held-out,exact", help="calibrations to compare: held-out, exact")
    args = ap.parse_args(argv)
    methods = comma_list(args.methods)
    if not methods or set(methods) - {"held-out", "exact"}:
        ap.error("--methods takes held-out and/or exact")
    torch.set_num_threads(2)
    try:
        backbone = load_backbone(args.model, "cpu")
        sig = SignatureSet.load(args.signatures, hidden_size=backbone.hidden_size)
    except LmsanError as exc:  # the inputs come from earlier runs: say which, not a traceback
        ap.error(f"{exc} (see this script's docstring for the runs that make --model, --signatures, --prompts)")
    triggers = comma_list(args.triggers)
    print("| task | calibration inputs | method | flagged on them (after) | bound on unseen | combinations off | "
          "test inputs | false flags | of them holding a trigger | false flags without those |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for task in comma_list(args.tasks):
        train, test = TASKS[task].load()
        test = test[: args.test]
        classifier = PromptClassifier.load(f"{args.prompts}/{task}", backbone)
        holds = [holding_trigger(backbone.tokenizer, [e], triggers) > 0 for e in test]
        sizes = [int(x) for x in comma_list(args.calibrate)]
        for n, method in [(size, m) for size in sizes for m in (methods if size else ["-"])]:
            guard = Guard(backbone, classifier, sig, mode="flag")
            cal_rate, off, bound = "-", "-", "-"
            if n:
                rows = train[-n:]
                done = guard.calibrate([e.text for e in rows], text_pairs(rows), args.target_fpr,
                                       held_out=method == "held-out")
                cal_rate, off = f"{done.flag_rate_after:.4f}", str(done.combinations_off)
                bound = "-" if done.fpr_bound is None else f"{done.fpr_bound:.4f}"
            flags: list[bool] = []
            for s in range(0, len(test), 64):
                chunk = test[s : s + 64]
                flags += [r.guard.flagged for r in guard.classify([e.text for e in chunk], text_pairs(chunk))]
            flagged = sum(flags)
            holding = sum(f and h for f, h in zip(flags, holds, strict=True))
            print(f"| {task} | {n} | {method} | {cal_rate} | {bound} | {off} | {len(test)} | "
                  f"{flagged / len(test):.4f} | {holding} | {(flagged - holding) / len(test):.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
