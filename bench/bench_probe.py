"""What the suspect probe (guard.py: inputs near a threshold with one dominant word get their top
words tested alone) costs clean traffic: guard off vs enforce with and without the probe, in
process, on the demo's backdoored minilm, batches of 8 SST-2 dev sentences, order alternated.

    .venv/bin/python bench/bench_probe.py      # needs lmsan-out/demo (make demo)
"""

from __future__ import annotations

import sys
import time

import torch

from lmsan_serve import load_backbone
from lmsan_serve.data import load_examples, shipped
from lmsan_serve.guard import Guard, GuardStats
from lmsan_serve.prompts import PromptClassifier
from lmsan_serve.signatures import SignatureSet


def main(model: str = "lmsan-out/demo/por", prompt: str = "lmsan-out/demo/prompt-sst2", size: int = 480) -> int:
    torch.set_num_threads(1)
    backbone = load_backbone(model, "cpu")
    classifier = PromptClassifier.load(prompt, backbone)
    sig = SignatureSet.load(f"{model}/truth.safetensors")
    guards = {"off": Guard(backbone, classifier, None, mode="off"), "enforce": Guard(backbone, classifier, sig),
              "enforce, no probe": Guard(backbone, classifier, sig, suspect_margin=0)}
    texts = [e.text for e in load_examples(shipped("sst2/dev.jsonl"))[:size]]
    seconds = dict.fromkeys(guards, 0.0)
    probe_passes = batches = 0
    for _ in range(2):
        for i in range(0, len(texts), 8):
            order = list(guards) if (i // 8) % 2 == 0 else list(guards)[::-1]
            for name in order:
                stats = GuardStats()
                t0 = time.perf_counter()
                guards[name].classify(texts[i : i + 8], stats=stats)
                seconds[name] += time.perf_counter() - t0
                if name == "enforce":
                    probe_passes += stats.purge_passes
            batches += 1
    print(f"seconds: { {k: round(v, 2) for k, v in seconds.items()} }")
    print(f"throughput enforce/off: {seconds['off'] / seconds['enforce']:.3f} with the probe, "
          f"{seconds['off'] / seconds['enforce, no probe']:.3f} without; "
          f"extra passes with the probe: {probe_passes} over {batches} batches")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
