"""Load on the guarded HTTP endpoint, on loopback: what the guard costs a served model.

One app serves the same SST-2 prompt on the backdoored `minilm` twice: task `sst2` in mode
enforce and task `sst2-off` in mode off. Same replica, same backbone, same batching, so the two
differ only by the guard. The script then measures, in one run:

1. Clean traffic, mode off vs mode enforce: requests alternate between the two modes in rounds
   (off, enforce, enforce, off, ...) so that drift on a busy machine hits both equally. Reports
   throughput (requests/s over the time each mode was being driven), p50/p99 latency and the
   throughput ratio enforce/off (target >= 0.97).
2. Triggered vs clean requests in mode enforce, at the same concurrency: p50/p99 of each and the
   p50 ratio (target <= 3x); also a mixed stream (10% triggered) where both kinds share batches.
   Every triggered answer is checked: flagged, purged, trigger named.

`--quick` serves the tiny backdoored BERT of bench/tiny_artifacts.py instead, guarded with its
mined signatures, with a few dozen requests per phase: it checks that the script runs end to end.

Run `python bench/bench_serve.py --help`; see bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmsan_serve.backbone import load_backbone
from lmsan_serve.client import EndpointError, GuardClient, RetryPolicy
from lmsan_serve.data import clip_words, insert_trigger, load_examples, shipped
from lmsan_serve.errors import LmsanError
from lmsan_serve.kinds import Action
from lmsan_serve.serving import parse_config
from lmsan_serve.serving.run import free_port, start, stop
from lmsan_serve.signatures import SignatureSet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from served import command_line, covered_triggers, loadavg, resolve_model, resolve_prompt_dir, resolve_signatures, say  # noqa: E402
from tiny_artifacts import add_quick_options, check_quick_options, quick_artifacts  # noqa: E402  (sibling files, not a package)


@dataclass
class Phase:
    name: str
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0  # wall time while this phase's requests were being driven
    errors: int = 0
    flagged: int = 0
    purged_right: int = 0  # triggered inputs purged with their trigger named

    @property
    def requests(self) -> int:
        return len(self.latencies_ms)

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    def summary(self) -> dict:
        return {"requests": self.requests, "seconds": round(self.seconds, 3), "rps": round(self.throughput, 2),
                "p50_ms": round(self.pct(0.5), 2), "p99_ms": round(self.pct(0.99), 2),
                "mean_ms": round(statistics.fmean(self.latencies_ms), 2) if self.latencies_ms else None,
                "errors": self.errors, "flagged": self.flagged, "purged_right": self.purged_right}


@dataclass
class Item:
    task: str
    text: str
    trigger: str | None  # the planted trigger, for triggered inputs
    phase: Phase


def drive(url: str, items: list[Item], concurrency: int) -> float:
    """Send every item as one request from `concurrency` keep-alive clients; returns wall seconds.
    No retries: a retry would hide an error and add its backoff to a latency; errors are counted."""
    lock = threading.Lock()
    queue = list(reversed(items))

    def client() -> None:
        with GuardClient(url, timeout=120.0, retries=RetryPolicy.none()) as endpoint:
            while True:
                with lock:
                    if not queue:
                        break
                    item = queue.pop()
                t0 = time.perf_counter()
                try:
                    verdict = endpoint.classify(item.task, [item.text])[0].guard
                except EndpointError:
                    verdict = None
                ms = (time.perf_counter() - t0) * 1000
                with lock:
                    if verdict is None:
                        item.phase.errors += 1
                        continue
                    item.phase.latencies_ms.append(ms)
                    item.phase.flagged += verdict.flagged
                    if item.trigger is not None and verdict.action == Action.PURGED and item.trigger in verdict.removed:
                        item.phase.purged_right += 1

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


@dataclass
class Served:
    """What the endpoint serves: model, prompt, the signature file it guards with, and the triggers
    that file covers (triggered traffic carries only those)."""

    model: Path
    prompt: Path
    signatures: Path
    triggers: list[str]
    missed: list[str]


def resolve_served(model: str | None, prompt: str | None, signatures: str | None) -> Served:
    """--model/--prompt/--signatures, else the demo's (or our own) artifacts, guarded with the set mined
    for the model (`served.resolve_signatures`)."""
    model_dir = resolve_model(model)
    backbone = load_backbone(str(model_dir), "cpu")
    prompt_dir = resolve_prompt_dir(prompt, backbone)
    sig_path = resolve_signatures(signatures, model_dir)
    truth = SignatureSet.load(model_dir / "truth.safetensors", hidden_size=backbone.hidden_size)
    sig = SignatureSet.load(sig_path, hidden_size=backbone.hidden_size, fingerprint=backbone.fingerprint)
    triggers, missed = covered_triggers(truth, sig)
    if not triggers:
        raise LmsanError(f"{sig_path}: covers none of the planted triggers {missed}; cannot build triggered traffic")
    return Served(model_dir, prompt_dir, sig_path, triggers, missed)


def run(args: argparse.Namespace, served: Served) -> dict:
    """Start the endpoint on loopback, drive the three phases, stop it; the results as a dict."""
    model_dir, prompt_dir, sig_path, triggers = served.model, served.prompt, served.signatures, served.triggers
    rng = random.Random(args.seed)
    sentences = [clip_words(e.text, args.words) for e in load_examples(shipped("sst2/dev.jsonl"))]
    rng.shuffle(sentences)

    def clean(n: int) -> list[str]:
        return [sentences[i % len(sentences)] for i in range(n)]

    def triggered(n: int) -> list[tuple[str, str]]:
        out = []
        for i in range(n):
            trig = triggers[i % len(triggers)]
            out.append((insert_trigger(sentences[(i * 7 + 3) % len(sentences)], trig, rng), trig))
        return out

    config = parse_config({
        "model": str(model_dir), "signatures": str(sig_path), "device": args.device,
        "tasks": {"sst2": str(prompt_dir), "sst2-off": {"prompt": str(prompt_dir), "mode": "off"}},
        "batching": {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_ms / 1000},
    })
    say(f"starting the endpoint on 127.0.0.1 (model {model_dir}, prompt {prompt_dir}) ...")
    t0 = time.perf_counter()
    endpoint = start(config, port=free_port(), metrics_port=None, num_cpus=args.num_cpus or os.cpu_count(),
                     replicas=args.replicas)
    ready_s = time.perf_counter() - t0
    try:
        say("warming up ...")
        warm = Phase("warmup")
        warmup = clean(8 if args.quick else 40)
        drive(endpoint.url, [Item(t, s, None, warm) for t in ("sst2", "sst2-off") for s in warmup], args.concurrency)

        off, on = Phase("clean, mode off"), Phase("clean, mode enforce")
        per_round = max(1, args.requests // args.rounds)
        round_ratios = []
        for r in range(args.rounds):
            texts = clean(per_round * (r + 1))[per_round * r:]
            order = [("sst2-off", off), ("sst2", on)] if r % 2 == 0 else [("sst2", on), ("sst2-off", off)]
            took = {}
            for task, phase in order:
                say(f"round {r + 1}/{args.rounds}: {per_round} clean requests, {phase.name}")
                took[task] = drive(endpoint.url, [Item(task, s, None, phase) for s in texts], args.concurrency)
                phase.seconds += took[task]
            round_ratios.append(took["sst2-off"] / took["sst2"])  # throughput enforce / off in this round

        trig_only, clean_ref = Phase("triggered, enforce"), Phase("clean, enforce (reference)")
        n = args.triggered
        for r in range(2):  # interleave again: triggered, clean, clean, triggered
            order = [(trig_only, True), (clean_ref, False)] if r == 0 else [(clean_ref, False), (trig_only, True)]
            for phase, is_trig in order:
                say(f"{phase.name}: {n // 2} requests")
                items = ([Item("sst2", t, trig, phase) for t, trig in triggered(n // 2)] if is_trig
                         else [Item("sst2", s, None, phase) for s in clean(n // 2)])
                phase.seconds += drive(endpoint.url, items, args.concurrency)

        mixed_trig, mixed_clean = Phase("mixed: triggered"), Phase("mixed: clean")
        items = [Item("sst2", s, None, mixed_clean) for s in clean(args.mixed)]
        for i, (t, trig) in enumerate(triggered(args.mixed // 10)):
            items.insert(i * 10 + 5, Item("sst2", t, trig, mixed_trig))
        say(f"mixed stream: {len(items)} requests, {len(items) - args.mixed} triggered")
        mixed_s = drive(endpoint.url, items, args.concurrency)  # one stream: no per-kind throughput
    finally:
        stop(endpoint)

    phases = [off, on, clean_ref, trig_only, mixed_clean, mixed_trig]
    # what was sent per phase, answered or not: a test compares it with the requests answered
    sent = {off.name: per_round * args.rounds, on.name: per_round * args.rounds,
            clean_ref.name: 2 * (n // 2), trig_only.name: 2 * (n // 2),
            mixed_clean.name: args.mixed, mixed_trig.name: len(items) - args.mixed}
    return {
        "command": command_line(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_1m": loadavg()},
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "model": str(model_dir), "prompt": str(prompt_dir), "signatures": str(sig_path), "triggers": triggers,
        "missed_triggers": served.missed, "ready_seconds": round(ready_s, 1),
        "phases": {p.name: p.summary() for p in phases},
        "throughput_ratio": round(on.throughput / off.throughput, 4) if off.throughput else None,
        "throughput_ratio_rounds": [round(x, 4) for x in round_ratios],
        "throughput_ratio_median_round": round(statistics.median(round_ratios), 4),
        "p50_ratio_enforce_vs_off": round(on.pct(0.5) / off.pct(0.5), 3),
        "triggered_vs_clean_p50": round(trig_only.pct(0.5) / clean_ref.pct(0.5), 3),
        "mixed_triggered_vs_clean_p50": round(mixed_trig.pct(0.5) / mixed_clean.pct(0.5), 3),
        "mixed_rps": round((mixed_clean.requests + mixed_trig.requests) / mixed_s, 2),
        "requests_sent": sent,
        "errors": sum(p.errors for p in phases),
        "false_flags": off.flagged + on.flagged + clean_ref.flagged + mixed_clean.flagged,
        "triggered_purged": f"{trig_only.purged_right + mixed_trig.purged_right}/"
                            f"{trig_only.requests + mixed_trig.requests}",
    }


def render(res: dict) -> str:
    rows = [["phase", "requests", "req/s", "p50 ms", "p99 ms", "errors", "flagged"]]
    for name, p in res["phases"].items():
        rps = f"{p['rps']:.1f}" if p["rps"] else "-"
        rows.append([name, str(p["requests"]), rps, f"{p['p50_ms']:.1f}", f"{p['p99_ms']:.1f}",
                     str(p["errors"]), str(p["flagged"])])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    s = res["settings"]
    return "\n".join([
        f"HTTP load on loopback: {s['concurrency']} concurrent clients, 1 input per request, "
        f"{res['machine']['cpus']} CPUs, load avg {res['machine']['loadavg_1m']}",
        *lines,
        "",
        f"throughput enforce/off (clean traffic): {res['throughput_ratio']:.3f}  (target >= 0.97; median of "
        f"{len(res['throughput_ratio_rounds'])} rounds {res['throughput_ratio_median_round']:.3f}, "
        f"range {min(res['throughput_ratio_rounds']):.3f}-{max(res['throughput_ratio_rounds']):.3f})",
        f"p50 latency enforce/off (clean traffic): {res['p50_ratio_enforce_vs_off']:.3f}",
        f"p50 latency triggered/clean (enforce):   {res['triggered_vs_clean_p50']:.2f}x  (target <= 3x)",
        f"p50 latency triggered/clean, mixed 10%:  {res['mixed_triggered_vs_clean_p50']:.2f}x  "
        f"(mixed stream {res['mixed_rps']:.1f} req/s)",
        f"errors: {res['errors']}   false flags on clean: {res['false_flags']}   "
        f"triggered purged with the trigger named: {res['triggered_purged']}",
        f"command: {res['command']}",
    ])


# --quick: bounded request counts, so that Ray starting and stopping is most of the run
QUICK = {"requests": 40, "rounds": 2, "triggered": 16, "mixed": 30, "concurrency": 4, "words": 32}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="backdoored model folder from `lmsan attack` (default: the demo's)")
    p.add_argument("--prompt", help="prompt folder trained on that model (default: the demo's)")
    p.add_argument("--signatures", help="signature file the endpoint guards with (default: the set mined for the "
                   "model, bench/served.py; MODEL/truth.safetensors serves the planted PVs); triggered traffic "
                   "carries only the triggers whose PV it covers")
    p.add_argument("--requests", type=int, help="clean requests per mode (default 1000, 40 with --quick)")
    p.add_argument("--rounds", type=int, help="alternations between the modes (default 10, 2 with --quick)")
    p.add_argument("--triggered", type=int, help="triggered requests, and as many clean (default 200, 16 with "
                   "--quick)")
    p.add_argument("--mixed", type=int, help="clean requests in the mixed stream (default 400, 30 with --quick)")
    p.add_argument("--concurrency", type=int, help="concurrent clients (default 8, 4 with --quick)")
    p.add_argument("--words", type=int, help="clip inputs to this many words (default 64, 32 with --quick)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--num-cpus", type=int, help="CPUs Ray may use (default: all of them)")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    add_quick_options(p, "its mined signatures, a few dozen requests per phase; checks that the script runs")
    p.add_argument("--json", help="also write the results as JSON to this path")
    args = p.parse_args(argv)
    check_quick_options(p, args, {"--model": args.model, "--prompt": args.prompt, "--signatures": args.signatures})
    full = {"requests": 1000, "rounds": 10, "triggered": 200, "mixed": 400, "concurrency": 8, "words": 64}
    for name, value in (QUICK if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if min(args.requests, args.rounds, args.triggered, args.mixed, args.concurrency, args.words) < 1:
        p.error("counts must be positive")
    if args.num_cpus is not None and args.num_cpus < 1:
        p.error("--num-cpus must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.quick:
            with quick_artifacts(args.cache) as art:
                res = run(args, resolve_served(art.model, art.prompt, art.mined))
        else:
            res = run(args, resolve_served(args.model, args.prompt, args.signatures))
    except LmsanError as exc:
        print(f"bench_serve: error: {exc}", file=sys.stderr)
        return 2
    print(render(res))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
