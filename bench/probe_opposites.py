"""Probe: can a soft trigger aimed at the sign opposite of a kept PV find a planted PV that search
mode missed, without forging one where nothing is planted?

All three attacks plant block PVs in opposite pairs (`lmsan_lab.attacks.block_pvs`). Search mode
on the demo's POR copy keeps 5 PVs and misses `pt`'s, the opposite of `cf`'s (docs/results.md,
mining). For each target this trains one soft trigger like a fuzz round (same initial trigger,
base learning rate without the round's early boost, epochs, batches and splice), but with the
loss the MSE of the triggered outputs to the target, then applies the mining filters' measures
on held-out clean lines: the collapse test (dispersion, must be under `max_dispersion`) and
`purest`'s self-agreement (must be at least `min_self_agreement`). The control target is random
signs at the same size, which no attack planted.

    .venv/bin/python bench/probe_opposites.py      # 6 targets, 72 to 99 s each on 2 shared cores

Needs the POR copy and its search signatures (`bench/bench_mine.py --attacks por --skip-reference
--search-rounds 16` writes both under runs/bench-mine/por). A probe, not part of `lmsan mine`.

    .venv/bin/python bench/probe_opposites.py --quick --json runs/opposites-quick.json

`--quick` needs neither: it runs on the tiny backdoored BERT of bench/tiny_artifacts.py (all six
POR triggers planted, so every PV's opposite is planted too) with its mined signatures, and trains
with the small settings they were mined with. It checks that the script runs.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

from lmsan_serve import load_backbone
from lmsan_serve.backbone import Backbone
from lmsan_serve.data import load_corpus
from lmsan_serve.errors import LmsanError
from lmsan_serve.mining import MiningConfig
from lmsan_serve.mining.model import (
    Prepared,
    _triggered,
    collapse,
    initial_trigger,
    prepare,
    resolved_lr,
    triggered_outputs,
)
from lmsan_serve.monitor import sign_agreement
from lmsan_serve.signatures import SignatureSet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_artifacts import add_quick_options, check_quick_options, quick_artifacts  # noqa: E402  (a sibling file, not a package)


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


def targets(mined: SignatureSet, hidden: int, seed: int) -> dict[str, torch.Tensor]:
    """The sign opposite of each kept PV, and the control: random signs at the kept PVs' mean size."""
    out = {f"opposite of kept PV {i}": -mined.pvs[i] for i in range(len(mined))}
    gen = torch.Generator().manual_seed(seed)
    size = float(mined.pvs.abs().mean())
    out["control: random signs"] = torch.randn(hidden, generator=gen).sign() * size
    return out


def probe(backbone: Backbone, prepared: Prepared, held: Prepared, config: MiningConfig, target: torch.Tensor,
          seed: int, truth: SignatureSet, mined: SignatureSet) -> dict:
    """Aim one soft trigger at `target`, then measure it as mining's filters would."""
    started = time.time()
    trigger = aim(backbone, prepared, config, target, seed)
    with torch.no_grad():
        out = triggered_outputs(backbone, held, trigger, config)
        mean = out.mean(dim=0, keepdim=True)
        dispersion = collapse(backbone, held, trigger, config, seed)
        self_agreement = float(sign_agreement(out, mean).mean())
        planted = sign_agreement(mean, truth.pvs)[0]
    best = int(planted.argmax())
    return {
        "dispersion": dispersion, "self_agreement": self_agreement,
        "passes": dispersion <= config.max_dispersion and self_agreement >= config.min_self_agreement,
        "nearest_planted": truth.label(best), "nearest_planted_agreement": float(planted[best]),
        "target_agreement": float(sign_agreement(mean, target[None])[0, 0]),
        "nearest_kept_agreement": float(sign_agreement(target[None], mined.pvs).max()),
        # is a PV planted where the target points (>= RECOVERED)? The control's never is, by design
        "target_planted_agreement": float(sign_agreement(target[None], truth.pvs).max()),
        "seconds": time.time() - started,
    }


def render_row(name: str, r: dict) -> str:
    return (f"| {name} | {r['dispersion']:.4f} | {r['self_agreement']:.3f} | {'yes' if r['passes'] else 'no'} | "
            f"{r['nearest_planted']} ({r['nearest_planted_agreement']:.3f}) | {r['target_agreement']:.3f} | "
            f"{r['nearest_kept_agreement']:.3f} | {r['seconds']:.0f} |")


def run(model: str, signatures: str, truth_path: str, config: MiningConfig, seed: int) -> list[dict]:
    """One row per target, printed as it comes."""
    try:
        backbone = load_backbone(model, "cpu")
        mined = SignatureSet.load(signatures, hidden_size=backbone.hidden_size)
        truth = SignatureSet.load(truth_path, hidden_size=backbone.hidden_size)
    except LmsanError as exc:
        raise LmsanError(f"{exc} (see this script's docstring for the run that makes them)") from exc
    corpus = load_corpus()
    prepared = prepare(backbone, corpus[: config.lines], config)
    held = prepare(backbone, corpus[-config.calibration_lines :][: config.held_out_lines], config)
    print(f"| target | dispersion (< {config.max_dispersion}) | self-agreement (>= {config.min_self_agreement}) | "
          "passes | nearest planted PV (sign agreement) | agreement with the target | nearest kept PV to it | s |")
    print("|---|---:|---:|---|---|---:|---:|---:|")
    rows = []
    for name, target in targets(mined, backbone.hidden_size, seed).items():
        row = probe(backbone, prepared, held, config, target, seed, truth, mined)
        print(render_row(name, row), flush=True)
        rows.append({"target": name, **row})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="backdoored model (default runs/bench-mine/por)")
    ap.add_argument("--signatures", help="its mined signatures (default runs/bench-mine/por/mined-search.safetensors)")
    ap.add_argument("--truth", help="its planted PVs (default runs/bench-mine/por/truth.safetensors)")
    ap.add_argument("--seed", type=int, default=99, help="initialisation rule's seed (fuzz rounds use 0..N-1)")
    add_quick_options(ap, "its mined signatures, with the mining settings they were mined with; checks that "
                      "the script runs")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    check_quick_options(ap, args, {"--model": args.model, "--signatures": args.signatures, "--truth": args.truth})
    torch.set_num_threads(1 if args.quick else 2)
    try:
        if args.quick:
            with quick_artifacts(args.cache) as art:
                config = MiningConfig(**art.mining)
                rows = run(art.model, art.mined, art.truth, config, args.seed)
        else:
            config = MiningConfig(mode="search", position="cls")
            rows = run(args.model or "runs/bench-mine/por",
                       args.signatures or "runs/bench-mine/por/mined-search.safetensors",
                       args.truth or "runs/bench-mine/por/truth.safetensors", config, args.seed)
    except LmsanError as exc:
        ap.error(str(exc))
    if args.json:
        Path(args.json).write_text(json.dumps({"quick": args.quick, "seed": args.seed, "config": config.model_dump(),
                                               "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
