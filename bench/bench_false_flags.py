"""False flags on clean traffic after per-task calibration, on more test inputs than the removal
run's 200: how far the rate measured on the calibration inputs carries to unseen ones, and what
more calibration inputs buy. In process, guard mode `flag` (no purge), per task of the removal
split (lmsan_serve.removal.TASKS); inputs that already hold a trigger's tokens are counted apart.

    .venv/bin/python bench/bench_false_flags.py --tasks sms_spam,ag_news --test 1000 --calibrate 500,1500

Needs the removal run's prompts (`lmsan eval --removal ...` writes OUT/prompts/TASK). Calibration
rows are the last N training rows: up to 500 the prompt never trained on them (they pick its
checkpoint); beyond 500 they reach into its training rows.
"""

from __future__ import annotations

import argparse
import sys

import torch

from lmsan_serve import load_backbone
from lmsan_serve.data import comma_list, text_pairs
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
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    backbone = load_backbone(args.model, "cpu")
    sig = SignatureSet.load(args.signatures, hidden_size=backbone.hidden_size)
    triggers = comma_list(args.triggers)
    print("| task | calibration inputs | flagged on them (after) | combinations off | test inputs | "
          "false flags | of them holding a trigger | false flags without those |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for task in comma_list(args.tasks):
        train, test = TASKS[task].load()
        test = test[: args.test]
        classifier = PromptClassifier.load(f"{args.prompts}/{task}", backbone)
        holds = [holding_trigger(backbone.tokenizer, [e], triggers) > 0 for e in test]
        for n in (int(x) for x in comma_list(args.calibrate)):
            guard = Guard(backbone, classifier, sig, mode="flag")
            cal_rate, off = "-", "-"
            if n:
                rows = train[-n:]
                done = guard.calibrate([e.text for e in rows], text_pairs(rows), args.target_fpr)
                cal_rate, off = f"{done.flag_rate_after:.4f}", str(done.combinations_off)
            flags: list[bool] = []
            for s in range(0, len(test), 64):
                chunk = test[s : s + 64]
                flags += [r.guard.flagged for r in guard.classify([e.text for e in chunk], text_pairs(chunk))]
            flagged = sum(flags)
            holding = sum(f and h for f, h in zip(flags, holds, strict=True))
            print(f"| {task} | {n} | {cal_rate} | {off} | {len(test)} | {flagged / len(test):.4f} | {holding} | "
                  f"{(flagged - holding) / len(test):.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
