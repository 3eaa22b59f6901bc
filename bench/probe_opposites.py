"""Probe: can a soft trigger aimed at the sign opposite of a kept PV find a planted PV that search
mode missed, without forging one where nothing is planted?

All three attacks plant block PVs in opposite pairs (`lmsan_serve.attacks.block_pvs`). Search mode
on the demo's POR copy keeps 5 PVs and misses `pt`'s, the opposite of `cf`'s (README, Results,
mining). For each target this trains one soft trigger like a fuzz round (same initial trigger,
base learning rate without the round's early boost, epochs, batches and splice), but with the
loss the MSE of the triggered outputs to the target, then applies the mining filters' measures
on held-out clean lines: the collapse test (dispersion, must be under `max_dispersion`) and
`purest`'s self-agreement (must be at least `min_self_agreement`). The control target is random
signs at the same size, which no attack planted.

    .venv/bin/python bench/probe_opposites.py      # 6 targets, 72 to 99 s each on 2 shared cores

Needs the POR copy and its search signatures (`bench/bench_mine.py --attacks por --skip-reference
--search-rounds 16` writes both under runs/bench-mine/por). A probe, not part of `lmsan mine`.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch
from torch import nn

from lmsan_serve import load_backbone
from lmsan_serve.data import load_corpus
from lmsan_serve.errors import LmsanError
from lmsan_serve.mining import MiningConfig
from lmsan_serve.mining.model import (
    _triggered,
    collapse,
    initial_trigger,
    prepare,
    resolved_lr,
    triggered_outputs,
)
from lmsan_serve.monitor import sign_agreement
from lmsan_serve.signatures import SignatureSet


def aim(backbone, prepared, config: MiningConfig, target: torch.Tensor, seed: int) -> torch.Tensor:
    """A soft trigger trained to drive the monitored outputs onto `target`."""
    trigger = nn.Parameter(initial_trigger(backbone.model.get_input_embeddings().weight.detach(), config, seed))
    optim = torch.optim.Adam([trigger], lr=resolved_lr(backbone, config))
    rng = random.Random(seed)
    n, bs = prepared.input_ids.shape[0], config.batch_size
    for _ in range(config.epochs):
        order = list(range(n))
        rng.shuffle(order)
        for s in range(0, n - bs + 1, bs):
            feats = _triggered(backbone, prepared, torch.tensor(order[s : s + bs]), trigger, config, rng)
            loss = nn.functional.mse_loss(feats, target.expand_as(feats))
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
    return trigger.detach()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="runs/bench-mine/por")
    ap.add_argument("--signatures", default="runs/bench-mine/por/mined-search.safetensors")
    ap.add_argument("--truth", default="runs/bench-mine/por/truth.safetensors")
    ap.add_argument("--seed", type=int, default=99, help="initialisation rule's seed (fuzz rounds use 0..N-1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    config = MiningConfig(mode="search")
    try:
        backbone = load_backbone(args.model, "cpu")
        mined = SignatureSet.load(args.signatures, hidden_size=backbone.hidden_size)
        truth = SignatureSet.load(args.truth, hidden_size=backbone.hidden_size)
    except LmsanError as exc:
        ap.error(f"{exc} (see this script's docstring for the run that makes them)")
    corpus = load_corpus()
    prepared = prepare(backbone, corpus[: config.lines], config)
    held = prepare(backbone, corpus[-config.calibration_lines :][: config.held_out_lines], config)
    targets = {f"opposite of kept PV {i}": -mined.pvs[i] for i in range(len(mined))}
    gen = torch.Generator().manual_seed(args.seed)
    size = float(mined.pvs.abs().mean())
    targets["control: random signs"] = torch.randn(backbone.hidden_size, generator=gen).sign() * size
    labels = [truth.label(i) for i in range(len(truth))]
    print(f"| target | dispersion (< {config.max_dispersion}) | self-agreement (>= {config.min_self_agreement}) | "
          "passes | nearest planted PV (sign agreement) | agreement with the target | nearest kept PV to it | s |")
    print("|---|---:|---:|---|---|---:|---:|---:|")
    for name, target in targets.items():
        started = time.time()
        trigger = aim(backbone, prepared, config, target, args.seed)
        with torch.no_grad():
            out = triggered_outputs(backbone, held, trigger, config)
            mean = out.mean(dim=0, keepdim=True)
            dispersion = collapse(backbone, held, trigger, config, args.seed)
            self_agreement = float(sign_agreement(out, mean).mean())
            planted = sign_agreement(mean, truth.pvs)[0]
        best = int(planted.argmax())
        ok = dispersion <= config.max_dispersion and self_agreement >= config.min_self_agreement
        print(f"| {name} | {dispersion:.4f} | {self_agreement:.3f} | {'yes' if ok else 'no'} | {labels[best]} "
              f"({float(planted[best]):.3f}) | {float(sign_agreement(mean, target[None])[0, 0]):.3f} | "
              f"{float(sign_agreement(target[None], mined.pvs).max()):.3f} | {time.time() - started:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
