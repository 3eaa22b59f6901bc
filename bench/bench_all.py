"""One benchmark command, one JSON: every figure issue 20 asks for, measured in one run.

The pieces run one after the other in this process, each through its own script's functions, on
one backdoored model and one prompt, guarded with a **mined** signature set (what a deployment
serves), the planted PVs measured beside it where the piece can take a second set:

1. guard, in process (bench_guard.py and bench_probe.py): monitor cost against the reference loop,
   purge cost against the reference purge batched like the official harness, and clean throughput
   with the guard enforcing against the guard off; once with the mined set, once with the planted;
2. endpoint (bench_endpoint.py): the served endpoint's inputs per second against the raw batched
   forward pass of the same backbone and prompt, over request sizes and client counts, and one
   sentence on the idle endpoint against one bare forward pass (mined set; forward pass first,
   before Ray starts);
3. serve (bench_serve.py): over HTTP, clean throughput enforce against off, triggered against clean
   p50 and p99 (mined set; a second set would need a second endpoint and double its time);
4. mining (bench_mine.py): our detect mode against the reference loop at its best (official
   per-family settings, its 2,000-line corpus, a learning-rate sweep) per attack and on a clean
   control. Long: `--skip mining` leaves it out.

The whole report goes to `--json` (pieces, machine, commit, command, signature files and their
sha256); stdout gets ONE JSON line with the headline keys (a skipped or failed piece's keys are
null); progress goes to stderr. `--quick` runs every piece on the tiny artifacts of
bench/tiny_artifacts.py (mining on its own tiny models) with the pieces' quick sizes: it checks
that the whole chain runs, its figures mean little.

    .venv/bin/python bench/bench_all.py                      # = make bench; see bench/README.md
    .venv/bin/python bench/bench_all.py --quick --cache runs/tiny
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is first imported
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_endpoint  # noqa: E402  (sibling files, not a package)
import bench_guard  # noqa: E402
import bench_mine  # noqa: E402
import bench_probe  # noqa: E402
import bench_serve  # noqa: E402
import served  # noqa: E402
from served import DEMO_MINED, command_line, git_commit, say  # noqa: E402
from tiny_artifacts import add_quick_options, check_quick_options, quick_artifacts  # noqa: E402

from lmsan_serve.backbone import load_backbone  # noqa: E402
from lmsan_serve.errors import LmsanError  # noqa: E402

DEFAULT_JSON = "lmsan-out/bench/bench.json"
# The reference's seconds per round per corpus line on minilm, 2-core CPU: 36 s a round on 256
# lines (docs/results.md, Mining). Only for the warning that the mining piece is long.
REFERENCE_ROUND_S = 36 / 256


class Piece(str, Enum):
    GUARD = "guard"
    ENDPOINT = "endpoint"
    SERVE = "serve"
    MINING = "mining"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Artifacts:
    """What the guard, endpoint and serve pieces run on."""

    model: str
    prompt: str
    mined: str  # the guarded set
    planted: str  # the attack's PVs (truth.safetensors), measured beside it


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# -- the pieces: each returns its script's report as a dict -------------------------------------------


def _with_threads(n: int, fn: Callable[[], object]) -> object:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def run_guard(args: argparse.Namespace, art: Artifacts) -> dict:
    """bench_guard (monitor and purge against the reference) and bench_probe's in-process
    throughput, enforce against off, for the mined set and the planted one."""
    gargs = bench_guard.parse_args(["--quick"] if args.quick else [])
    out: dict = {"mined": None, "planted": None, "throughput_in_process": {}}
    size = 96 if args.quick else 480  # bench_probe's own sizes
    for name, sig in (("mined", art.mined), ("planted", art.planted)):
        say(f"[guard] in process, {name} set: monitor and purge against the reference")
        # the scripts' own thread choice: one thread on the tiny model, torch's default on minilm
        threads = 1 if args.quick else torch.get_num_threads()
        summary, text = _with_threads(threads, lambda s=sig: bench_guard.measure(gargs, Path(art.model), art.prompt, s))
        say(text)  # bench_guard's tables, for a reader watching the run; the figures are in the file
        out[name] = summary
        say(f"[guard] in process, {name} set: clean throughput, enforce against off (batches of {bench_probe.BATCH})")
        cost = _with_threads(1, lambda s=sig: bench_probe.run(art.model, art.prompt, s, size))
        out["throughput_in_process"][name] = asdict(cost)
    return out


def run_endpoint(args: argparse.Namespace, art: Artifacts) -> dict:
    """bench_endpoint's measurement; its stdout line goes to stderr, its JSON is read back."""
    eargs = bench_endpoint.parse_args(["--quick"] if args.quick else [])
    with tempfile.TemporaryDirectory(prefix="bench-endpoint-") as tmp:
        eargs.json = str(Path(tmp) / "endpoint.json")
        with contextlib.redirect_stdout(sys.stderr):
            rc = bench_endpoint.measure(eargs, Path(art.model), Path(art.prompt), Path(art.mined))
        if rc != 0:
            raise LmsanError(f"bench_endpoint exited {rc}")
        return json.loads(Path(eargs.json).read_text())


def run_serve(args: argparse.Namespace, art: Artifacts) -> dict:
    sargs = bench_serve.parse_args(["--quick"] if args.quick else [])
    return bench_serve.run(sargs, bench_serve.resolve_served(art.model, art.prompt, art.mined))


def run_mining(args: argparse.Namespace) -> dict:
    argv = ["--skip-search", "--no-progress", "--attacks", args.mine_attacks, "--reference-lrs", args.reference_lrs]
    argv += ["--quick", "--threads", "1"] if args.quick else ["--out", args.mine_out]
    if args.reference_budget is not None:
        argv += ["--reference-budget", str(args.reference_budget)]
    margs = bench_mine.parse_args(argv)
    if not args.quick:
        points = len(margs.attacks) * len(set(margs.reference_lrs) | {5e-5})
        hours = points * margs.rounds * REFERENCE_ROUND_S * margs.reference_lines / 3600
        say(f"[mining] this is long: ours and the reference's sweep ({args.reference_lrs}) on {args.mine_attacks}; "
            f"the reference fuzzes {margs.reference_lines} lines, {margs.rounds} rounds per sweep point that finds "
            f"nothing: up to about {hours:.0f} h on a 2-core CPU with minilm (an estimate; bench/README.md; "
            "--skip mining leaves it out)")
    return bench_mine.run(margs)


# -- the one line ------------------------------------------------------------------------------------


def headline(report: dict) -> dict:
    """The keys the issue names, from the pieces' reports; null where a piece was skipped or failed."""
    pieces = report["pieces"]
    guard, serve, endpoint, mining = (pieces[str(p)] if pieces[str(p)] and "error" not in pieces[str(p)] else None
                                      for p in (Piece.GUARD, Piece.SERVE, Piece.ENDPOINT, Piece.MINING))
    line: dict = {
        "guard_throughput_ratio": serve["throughput_ratio"] if serve else None,
        "guard_throughput_ratio_in_process":
            round(guard["throughput_in_process"]["mined"]["ratio_with_probe"], 4) if guard else None,
        "triggered_p50_ratio": serve["triggered_vs_clean_p50"] if serve else None,
        "triggered_p99_ratio": None,
        "endpoint_vs_forward": endpoint["endpoint_vs_forward"] if endpoint else None,
        "idle_vs_forward_one": endpoint["idle_vs_forward_one"] if endpoint else None,
        "purge_speedup_vs_reference_p50": None,
        "monitor_speedup_vs_reference": round(guard["mined"]["monitor"]["speedup"], 2) if guard else None,
        "mining_speedup_vs_reference": mining["speedups"] if mining else None,
    }
    if serve:
        trig, clean = serve["phases"]["triggered, enforce"], serve["phases"]["clean, enforce (reference)"]
        line["triggered_p99_ratio"] = round(trig["p99_ms"] / clean["p99_ms"], 3)
    if guard:
        line["purge_speedup_vs_reference_p50"] = {str(p["words"]): round(p["speedup_p50"], 3)
                                                  for p in guard["mined"]["purge"]}
    return {**line, "quick": report["quick"], "skipped": report["skipped"],
            "failed": [name for name, p in pieces.items() if p and "error" in p], "json": report["json"]}


# -- main ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="backdoored model folder (default: the demo's, else bench_guard's own)")
    ap.add_argument("--prompt", help="prompt folder trained on it (default: the demo's, else a cached one)")
    ap.add_argument("--signatures", help=f"the mined signature set to guard with (default {DEMO_MINED}, "
                    "written by `make demo`)")
    ap.add_argument("--skip", default="", help=f"pieces to leave out, comma-separated: {', '.join(map(str, Piece))}")
    ap.add_argument("--mine-attacks", default=",".join(bench_mine.ATTACKS), help="mining: attacks to plant and mine")
    ap.add_argument("--reference-lrs", default=",".join(f"{x:g}" for x in bench_mine.REFERENCE_LRS),
                    help="mining: the reference's learning-rate sweep (the family's official lr always added)")
    ap.add_argument("--mine-out", default="runs/bench-mine", help="mining: cache of the planted copies")
    ap.add_argument("--reference-budget", type=float, help="mining: seconds per reference sweep point, after "
                    "which its speed-up is a lower bound (bench_mine.py --reference-budget; default: none)")
    add_quick_options(ap, "every piece at its quick size (mining on its own tiny models); checks the chain runs")
    ap.add_argument("--json", default=DEFAULT_JSON, help="where the whole report goes (default %(default)s)")
    args = ap.parse_args(argv)
    check_quick_options(ap, args, {"--model": args.model, "--prompt": args.prompt, "--signatures": args.signatures})
    names = [x.strip() for x in args.skip.split(",") if x.strip()]
    bad = [x for x in names if x not in {str(p) for p in Piece}]
    if bad:
        ap.error(f"--skip takes {', '.join(map(str, Piece))}; got {', '.join(bad)}")
    args.skip = [Piece(x) for x in names]
    try:
        lrs = [float(x) for x in args.reference_lrs.split(",") if x.strip()]
    except ValueError:
        lrs = []
    if not lrs or min(lrs) <= 0:
        ap.error("--reference-lrs takes positive numbers, e.g. 5e-5,2e-4,4e-4")
    attacks = [x.strip() for x in args.mine_attacks.split(",") if x.strip()]
    if not attacks or set(attacks) - set(bench_mine.ATTACKS):
        ap.error(f"--mine-attacks takes a subset of {','.join(bench_mine.ATTACKS)}")
    return args


@contextlib.contextmanager
def artifacts(args: argparse.Namespace) -> Iterator[Artifacts]:
    """The tiny artifacts with --quick, else the demo's model, prompt and mined set (or the ones given)."""
    if args.quick:
        with quick_artifacts(args.cache) as art:
            yield Artifacts(art.model, art.prompt, art.mined, art.truth)
        return
    model = served.resolve_model(args.model)
    mined = Path(args.signatures) if args.signatures else DEMO_MINED
    if not mined.is_file():
        raise LmsanError(f"no mined signature set at {mined}: run `make demo` (it mines one) or pass --signatures")
    prompt = served.resolve_prompt_dir(args.prompt, load_backbone(str(model), "cpu"))
    yield Artifacts(str(model), str(prompt), str(mined), str(model / "truth.safetensors"))


def run_pieces(args: argparse.Namespace, art: Artifacts | None) -> dict:
    """Every piece not skipped, in an order that keeps the forward pass off Ray's cores; a piece
    that fails is recorded with its reason and the others still run."""
    steps: list[tuple[Piece, Callable[[], dict]]] = []
    if art is not None:
        steps += [(Piece.GUARD, lambda: run_guard(args, art)), (Piece.ENDPOINT, lambda: run_endpoint(args, art)),
                  (Piece.SERVE, lambda: run_serve(args, art))]
    steps.append((Piece.MINING, lambda: run_mining(args)))
    pieces: dict = {str(p): None for p in Piece}
    for piece, fn in steps:
        if piece in args.skip:
            continue
        say(f"== {piece} ==")
        t0 = time.perf_counter()
        try:
            pieces[str(piece)] = fn()
        except (LmsanError, OSError) as exc:
            say(f"[{piece}] error: {exc}")
            pieces[str(piece)] = {"error": str(exc)}
        except Exception as exc:  # a bug in one piece: its traceback, and the other pieces still run
            say(traceback.format_exc())
            pieces[str(piece)] = {"error": f"{type(exc).__name__}: {exc}"}
        say(f"[{piece}] {time.perf_counter() - t0:.0f} s")
    return pieces


def bench(args: argparse.Namespace) -> dict:
    """The whole report."""
    started, load_start = time.perf_counter(), loadavg()
    need_art = any(p not in args.skip for p in (Piece.GUARD, Piece.ENDPOINT, Piece.SERVE))
    with artifacts(args) if need_art else contextlib.nullcontext() as art:
        files = {} if art is None else {k: {"path": v, "sha256": sha256(v)} for k, v in
                                        (("mined", art.mined), ("planted", art.planted))}
        pieces = run_pieces(args, art)
    return {
        "command": command_line(), "commit": git_commit(), "quick": args.quick, "json": args.json,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version(), "load_average_start": load_start,
                    "load_average_end": loadavg()},
        "model": art.model if art else None, "prompt": art.prompt if art else None, "signatures": files,
        "skipped": [str(p) for p in args.skip], "seconds": round(time.perf_counter() - started, 1),
        "pieces": pieces,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Only the one line may reach stdout: Ray, progress bars and the pieces' own prints go to stderr.
    stdout = os.dup(1)
    sys.stdout.flush()
    os.dup2(2, 1)
    try:
        report = bench(args)
    except LmsanError as exc:
        say(f"bench_all: error: {exc}")
        return 2
    finally:
        sys.stdout.flush()
        os.dup2(stdout, 1)
        os.close(stdout)
    report["headline"] = headline(report)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    say(f"wrote {args.json} ({report['seconds']:.0f} s)")
    print(json.dumps(report["headline"]), flush=True)
    guard = report["pieces"]["guard"]
    monitors_agree = not guard or "error" in guard or all(guard[s]["monitor"]["identical"]
                                                          for s in ("mined", "planted"))
    return 0 if monitors_agree and not report["headline"]["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
