"""The defended-ASR matrix: attacks x tasks, each attack's copy of the encoder guarded over HTTP
with the signature file mining found on it (never its planted PVs), from `lmsan eval removal`
runs, assembled into one JSON under docs/results with the commit, machine and commands.

    .venv/bin/python bench/asr_matrix.py --run por=lmsan-out/matrix/por --run neuba=lmsan-out/matrix/neuba \\
        --out docs/results/asr-matrix-minilm.json

Each RUN folder holds `removal.json` (`lmsan eval removal ... --out RUN`). The planted PVs of the
model folder the run names (`truth.safetensors`) only score how many of them the mined set
recovered. The table in docs/results.md is generated from the JSON (bench/results_tables.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path


def mined_summary(model: str, signatures: str) -> dict:
    """The mined set's PVs, the positions they sit at and, where the model folder holds its planted
    PVs, how many of those a mined PV recovers (sign agreement >= mining.RECOVERED)."""
    from lmsan_serve.mining import RECOVERED, recovered
    from lmsan_serve.signatures import SignatureSet

    sig = SignatureSet.load(signatures)
    out = {"pvs": len(sig), "positions": sorted(set(sig.pv_positions)), "verdict": sig.meta.verdict}
    truth = Path(model) / "truth.safetensors"
    if truth.is_file():
        planted = SignatureSet.load(truth)
        out |= {"planted": len(planted), "recovered": recovered(planted.pvs, sig.pvs), "recovered_at": RECOVERED}
    attack = Path(model) / "attack.json"
    if attack.is_file():
        cfg = json.loads(attack.read_text())["config"]
        out["attack"] = {k: cfg.get(k) for k in ("kind", "triggers", "pv_design", "text", "steps")}
    return out


def assemble(runs: dict[str, Path], runs_commit: str | None) -> dict:
    attacks = {}
    for name, folder in runs.items():
        res = json.loads((folder / "removal.json").read_text())
        attacks[name] = {"command": res["command"], "model": res["model"], "signatures": res["signatures"],
                         "mined": mined_summary(res["model"], res["signatures"]), "triggers": res["triggers"],
                         "size": res["size"], "over_http": res["over_http"],
                         "calibration_lines": res["calibration_lines"], "variants": res.get("variants", []),
                         "tasks": res["tasks"]}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"commit": commit, "runs_commit": runs_commit or commit,
            "command": "python bench/asr_matrix.py " + " ".join(sys.argv[1:]),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "attacks": attacks}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, metavar="NAME=DIR",
                    help="an attack's name and the --out folder of its `lmsan eval removal` run (repeatable)")
    ap.add_argument("--out", required=True, help="the JSON to write")
    ap.add_argument("--runs-commit", help="the commit the removal runs were made at (default: HEAD)")
    args = ap.parse_args(argv)
    runs = {}
    for spec in args.run:
        name, _, folder = spec.partition("=")
        if not name or not (Path(folder) / "removal.json").is_file():
            print(f"asr_matrix: error: --run {spec!r}: need NAME=DIR with DIR/removal.json", file=sys.stderr)
            return 2
        runs[name] = Path(folder)
    Path(args.out).write_text(json.dumps(assemble(runs, args.runs_commit), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
