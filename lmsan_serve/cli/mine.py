"""`lmsan mine`: fuzz-train soft triggers to invert an encoder's PVs; the verdict and the signature file."""

from __future__ import annotations

import argparse

from ..errors import LmsanError, settings
from ..kinds import MiningMode, Position
from ..storage import output_file
from .common import add_common, emit, progress, say

ALL_POSITIONS = "all"  # --position: every position the encoder supports


def cmd_mine(args: argparse.Namespace) -> int:
    from ..backbone import load_backbone
    from ..data import load_corpus
    from ..mining import MiningConfig, mine
    from ..mining.positions import mined_positions
    from ..mining.runners import driver_device, round_device

    config = settings(
        MiningConfig,
        "mining",
        mode=args.mode,
        position=None if args.position == ALL_POSITIONS else args.position,
        max_rounds=args.max_rounds,
        time_budget=args.time_budget,
        lines=args.lines,
        first_seed=args.first_seed,
        wave=args.wave,
        patience=args.patience,
        probe_opposites=args.probe_opposites,
        split_rows=args.split_rows,
        **({"lr": args.lr} if args.lr else {}),
    )
    if args.workers < 1:
        raise LmsanError("--workers must be at least 1")
    on_ray = args.workers > 1 or bool(args.ray_address)
    # on Ray each round resolves --device on its node; this process only prepares and calibrates
    rounds_on = round_device(args.device) if on_ray else None
    out = output_file(args.out)  # proved writable now, not after hours of mining
    sign_key = None
    if args.sign_key:
        from ..signing import load_private_key

        sign_key = load_private_key(args.sign_key)  # now, not after hours of mining
    corpus = load_corpus(args.corpus)
    backbone = load_backbone(args.model, driver_device(args.device) if on_ray else args.device)
    positions, unsupported = mined_positions(backbone, config)  # a named position it lacks: one line, exit 2
    where = f"position{'s' if len(positions) > 1 else ''} {', '.join(positions)}"
    say(args, f"mining {args.model} ({config.mode} mode, {where}, up to {config.rounds} rounds each)"
        + "".join(f"; not {p}: {why}" for p, why in unsupported.items()))
    result = mine(backbone, config, corpus, out, resume=args.resume, progress=progress(args),
                  say=lambda m: say(args, m), workers=args.workers, ray_address=args.ray_address,
                  device=rounds_on, sign_key=sign_key)
    mining = result.signatures.meta.mining
    summary = {
        "verdict": result.verdict,
        "pvs": len(result.signatures),
        "rounds": result.rounds,
        "seconds": round(result.seconds, 1),
        "out": str(out),
        "thresholds": [r.threshold for r in result.signatures.meta.pvs],
        "pv_positions": [str(p) for p in result.signatures.pv_positions],
        "signed_by": result.signatures.signed_by,
        **({"stop": result.stop} if result.stop else {}),
        **{k: mining[k] for k in ("positions", "not_covered", "unsupported") if k in mining},
    }
    human = (f"{result.verdict}: {summary['pvs']} PV(s) kept after {result.rounds} rounds "
             f"in {summary['seconds']} s -> {out}")
    human += "".join("\n" + position_line(p, run) for p, run in result.positions.items())
    if mining.get("not_covered"):
        human += f"\nnot mined: {', '.join(mining['not_covered'])} (detect mode stops at the first backdoored position)"
    if result.stop and len(result.positions) > 1:
        human += "\noverall: " + stop_line(result.stop)
    emit(args, human, summary)
    return 0


def position_line(position: str, run: dict) -> str:
    """What mining found at one position, in words."""
    line = f"  {position}: {run['pvs']} PV(s) after {run['rounds']} rounds in {run['seconds']} s"
    return line + (f"; {stop_line(run['stop'])}" if run.get("stop") else "")


def stop_line(stop: dict) -> str:
    """Why a search stopped, in words."""
    probes = f"; {stop['probes']} aimed rounds added {stop['probe_pvs']} PV(s)" if stop["probes"] else ""
    if stop["exhausted"]:
        return (f"search finished: {stop['rounds_since_last_pv']} rounds in a row found no new PV "
                f"(patience {stop['patience']}){probes}")
    what = "round budget (--max-rounds)" if stop["reason"] == "max_rounds" else "time budget (--time-budget)"
    return (f"search stopped by its {what} {stop['rounds_since_last_pv']} rounds after its last new PV, before "
            f"the stopping rule (patience {stop['patience']}) said none is left: --resume with a larger budget"
            f"{probes}")


def add_mine(sub) -> None:
    p = sub.add_parser("mine", help="fuzz-train soft triggers to invert PVs: verdict + signature file",
                       description="Mine the predefined vectors of --model (LMSanitator fuzz training) and write "
                       "the signature file with the verdict. A checkpoint is written beside --out after every round.")
    add_common(p)
    p.add_argument("--out", required=True, help="signature file to write (SIG.safetensors)")
    p.add_argument("--mode", choices=MiningMode.values(), default=MiningMode.DETECT.value,
                   help="detect: stop at the first PV (verdict); search: keep every unique PV")
    p.add_argument("--corpus", help="clean text lines or JSONL (default: shipped WikiText-2)")
    p.add_argument("--position", choices=[ALL_POSITIONS, *Position.values()], default=ALL_POSITIONS,
                   help="the encoder output to mine (default all: every one this encoder has, as a backdoor may "
                   "drive any; a named one narrows mining to it)")
    p.add_argument("--max-rounds", type=int, help="default 30 (detect) or 1000 (search, which normally stops "
                   "earlier by --patience)")
    p.add_argument("--time-budget", type=float, help="seconds; no new round starts after")
    p.add_argument("--lines", type=int, default=256, help="clean lines to fuzz on (default 256)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--lr", type=float, help="base learning rate (default adapts to the embedding scale)")
    p.add_argument("--no-split", dest="split_rows", action="store_false",
                   help="keep the PV of the whole soft trigger, without trying each of its rows alone")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --out")
    p.add_argument("--workers", type=int, default=1,
                   help="run rounds as N parallel Ray tasks (local Ray on 127.0.0.1 unless --ray-address)")
    p.add_argument("--ray-address", help="run rounds on an existing Ray cluster (e.g. head:6379, or auto where "
                   "RAY_ADDRESS names it); with Ray, each round resolves --device on the node that runs it and "
                   "--device cuda asks Ray for one GPU per round")
    p.add_argument("--wave", type=int, default=1,
                   help="search mode: rounds started from the same found PVs (default 1: each round knows every "
                   "PV found before it; set it to at least --workers to keep workers busy); results do not "
                   "depend on --workers")
    p.add_argument("--patience", type=int, default=24,
                   help="search mode: stop once this many rounds in a row found no new PV (default 24: a PV "
                   "that 12%% of rounds reach is missed with probability under 5%%)")
    p.add_argument("--no-probes", dest="probe_opposites", action="store_false",
                   help="search mode: skip the rounds aimed at each kept PV's sign opposite after the search")
    p.add_argument("--sign-key", metavar="KEY.pem", help="sign the signature file with this Ed25519 private key")
    p.set_defaults(func=cmd_mine)


def register(sub) -> None:
    add_mine(sub)
