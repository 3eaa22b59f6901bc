"""What the suspect probe (guard.py: inputs near a threshold with one dominant word get their top
words tested alone) costs clean traffic: guard off vs enforce with and without the probe, in
process, on the demo's backdoored minilm, batches of 8 SST-2 dev sentences, order alternated.

    .venv/bin/python bench/bench_probe.py              # needs lmsan-out/demo (make demo)
    .venv/bin/python bench/bench_probe.py --quick      # the tiny model of bench/tiny_artifacts.py

`--quick` runs on the tiny backdoored BERT, guarded with its mined signatures, on fewer sentences:
it checks that the script runs (the ratios mean little on a model that small).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lmsan_serve import load_backbone
from lmsan_serve.data import load_examples, shipped
from lmsan_serve.errors import LmsanError
from lmsan_serve.guard import Guard, GuardStats
from lmsan_serve.prompts import PromptClassifier
from lmsan_serve.signatures import SignatureSet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from served import resolve_signatures  # noqa: E402  (sibling files, not a package)
from tiny_artifacts import add_quick_options, check_quick_options, quick_artifacts  # noqa: E402

BATCH = 8
PASSES = 2  # over the sentences, so that each guard sees each batch twice in alternating order


@dataclass
class ProbeCost:
    model: str
    signatures: str
    sentences: int
    batches: int  # batches each guard classified
    seconds: dict[str, float]  # per guard: off, enforce, enforce without the probe
    ratio_with_probe: float  # throughput enforce / off
    ratio_without_probe: float
    probe_passes: int  # extra forward passes the enforce guard spent (the probe's, no input was triggered)


def measure(backbone, classifier: PromptClassifier, sig: SignatureSet, texts: list[str]) -> tuple[dict, int, int]:
    """Seconds per guard, the enforce guard's extra passes and the batches run, order alternated
    per batch so that drift on a busy machine hits every guard alike."""
    guards = {"off": Guard(backbone, classifier, None, mode="off"), "enforce": Guard(backbone, classifier, sig),
              "enforce, no probe": Guard(backbone, classifier, sig, suspect_margin=0)}
    seconds = dict.fromkeys(guards, 0.0)
    probe_passes = batches = 0
    for _ in range(PASSES):
        for i in range(0, len(texts), BATCH):
            order = list(guards) if (i // BATCH) % 2 == 0 else list(guards)[::-1]
            for name in order:
                stats = GuardStats()
                t0 = time.perf_counter()
                guards[name].classify(texts[i : i + BATCH], stats=stats)
                seconds[name] += time.perf_counter() - t0
                if name == "enforce":
                    probe_passes += stats.purge_passes
            batches += 1
    return seconds, probe_passes, batches


def run(model: str, prompt: str, signatures: str, size: int) -> ProbeCost:
    backbone = load_backbone(model, "cpu")
    classifier = PromptClassifier.load(prompt, backbone)
    sig = SignatureSet.load(signatures, hidden_size=backbone.hidden_size, fingerprint=backbone.fingerprint)
    texts = [e.text for e in load_examples(shipped("sst2/dev.jsonl"))[:size]]
    seconds, passes, batches = measure(backbone, classifier, sig, texts)
    return ProbeCost(model, signatures, len(texts), batches, {k: round(v, 3) for k, v in seconds.items()},
                     seconds["off"] / seconds["enforce"], seconds["off"] / seconds["enforce, no probe"], passes)


def render(res: ProbeCost) -> str:
    return "\n".join([
        f"seconds: {res.seconds}",
        f"throughput enforce/off: {res.ratio_with_probe:.3f} with the probe, {res.ratio_without_probe:.3f} without; "
        f"extra passes with the probe: {res.probe_passes} over {res.batches} batches",
    ])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="backdoored model folder (default lmsan-out/demo/por)")
    ap.add_argument("--prompt", help="prompt trained on it (default lmsan-out/demo/prompt-sst2)")
    ap.add_argument("--signatures", help="signature file (default: the set mined for the model, bench/served.py; "
                    "MODEL/truth.safetensors serves the planted PVs)")
    ap.add_argument("--size", type=int, help="SST-2 dev sentences (default 480, 96 with --quick)")
    add_quick_options(ap, "its victim prompt and mined signatures")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    check_quick_options(ap, args, {"--model": args.model, "--prompt": args.prompt, "--signatures": args.signatures})
    args.size = (96 if args.quick else 480) if args.size is None else args.size
    if args.size < 1:
        ap.error("--size must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    try:
        if args.quick:
            with quick_artifacts(args.cache) as art:
                res = run(art.model, art.prompt, art.mined, args.size)
        else:
            model = args.model or "lmsan-out/demo/por"
            res = run(model, args.prompt or "lmsan-out/demo/prompt-sst2",
                      str(resolve_signatures(args.signatures, Path(model))), args.size)
    except LmsanError as exc:
        print(f"bench_probe: error: {exc}", file=sys.stderr)
        return 2
    print(render(res))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(res), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
