"""Endpoint throughput against the batched forward pass of the same backbone and prompt.

What the HTTP layer, Ray Serve's batching and the guard cost next to what the hardware does: on
one machine, in one run,

1. the forward pass in this process: the served prompt on the served backbone, batches of
   `--forward-batch` SST-2 sentences, guard off, torch on every core; inputs per second;
2. the endpoint on loopback (`lmsan serve`'s code, one replica) with the same prompt as task
   `sst2` (guard enforce, the signature file given) and `sst2-off` (guard off): for each request
   size (sentences per request) and client count, inputs per second and request p50;
3. one sentence on the idle endpoint, one request at a time, against one forward pass of one
   sentence in this process: p50 of each.

`endpoint_vs_forward` is the best guarded inputs-per-second over the curve divided by the forward
pass's. The forward pass runs first, before Ray starts, so the two never share the cores.

`--quick` serves the tiny backdoored BERT of bench/tiny_artifacts.py with its mined signatures, a
few requests per point: it checks that the script runs end to end.

Run `python bench/bench_endpoint.py --help`; see bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from lmsan_serve.backbone import load_backbone
from lmsan_serve.client import GuardClient, RetryPolicy
from lmsan_serve.data import clip_words, load_examples, shipped
from lmsan_serve.errors import LmsanError
from lmsan_serve.guard import Guard
from lmsan_serve.prompts import PromptClassifier
from lmsan_serve.serving import parse_config
from lmsan_serve.serving.run import free_port, start, stop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from served import command_line, resolve_model, resolve_prompt_dir, resolve_signatures, say  # noqa: E402
from tiny_artifacts import add_quick_options, check_quick_options, quick_artifacts  # noqa: E402

QUICK = {"sizes": "1,8", "clients": "2", "inputs": 16, "forward_seconds": 1.0}


def sentences(words: int) -> list[str]:
    return [clip_words(e.text, words) for e in load_examples(shipped("sst2/dev.jsonl"))]


def forward_rate(guard: Guard, texts: list[str], batch: int, seconds: float) -> float:
    """Inputs per second of `guard.classify` (mode off) on batches of `batch`, over at least `seconds`."""
    guard.classify(texts[:batch])  # warm-up
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for s in range(0, len(texts), batch):
            guard.classify(texts[s : s + batch])
            done += len(texts[s : s + batch])
    return done / (time.perf_counter() - t0)


def one_sentence_ms(call, texts: list[str], n: int) -> float:
    """p50 milliseconds of `call([text])`, one at a time."""
    call(texts[:1])
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        call([texts[i % len(texts)]])
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def drive(url: str, task: str, texts: list[str], size: int, clients: int, requests: int) -> dict:
    """`requests` requests of `size` sentences from `clients` keep-alive clients: inputs/s and p50."""
    lock = threading.Lock()
    todo = list(range(requests))
    lat: list[float] = []
    errors = 0

    def client() -> None:
        nonlocal errors
        with GuardClient(url, timeout=300.0, retries=RetryPolicy.none()) as c:
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop()
                batch = [texts[(i * size + k) % len(texts)] for k in range(size)]
                t0 = time.perf_counter()
                try:
                    c.classify(task, batch)
                except Exception:  # counted: a benchmark reports errors instead of dying on one
                    with lock:
                        errors += 1
                    continue
                with lock:
                    lat.append((time.perf_counter() - t0) * 1000)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"task": task, "size": size, "clients": clients, "requests": len(lat), "errors": errors,
            "inputs_per_s": round(len(lat) * size / wall, 2),
            "p50_ms": round(statistics.median(lat), 1) if lat else None}


def commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="backdoored model folder (default: the demo's, else bench's own)")
    ap.add_argument("--prompt", help="prompt folder (default: the demo's)")
    ap.add_argument("--signatures", help="signature file the endpoint guards with (default: the set mined for "
                    "the model, bench/served.py)")
    ap.add_argument("--sizes", default="1,8,32", help="sentences per request (default 1,8,32)")
    ap.add_argument("--clients", default="4,16", help="concurrent clients (default 4,16)")
    ap.add_argument("--inputs", type=int, default=640, help="sentences per point of the curve (default 640)")
    ap.add_argument("--words", type=int, default=32, help="clip sentences to this many words")
    ap.add_argument("--forward-batch", type=int, default=32)
    ap.add_argument("--forward-seconds", type=float, default=20.0)
    ap.add_argument("--replica-cpus", help="CPUs the replica asks for, or a comma list to measure each in turn "
                    "(default: all of this machine's, what `lmsan serve` gives one replica)")
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--json", help="also write the result here")
    add_quick_options(ap, "serves it with its mined signatures, a few requests per point")
    args = ap.parse_args(argv)
    check_quick_options(ap, args, {"--model": args.model, "--prompt": args.prompt, "--signatures": args.signatures})
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        with quick_artifacts(args.cache) as art:
            return measure(args, Path(art.model), Path(art.prompt), Path(art.mined))
    try:
        model = resolve_model(args.model)
        signatures = resolve_signatures(args.signatures, model)
        backbone = load_backbone(str(model), "cpu")
        prompt = resolve_prompt_dir(args.prompt, backbone)
    except LmsanError as exc:
        say(f"bench_endpoint: error: {exc}")
        return 2
    return measure(args, model, prompt, signatures, backbone)


def measure(args: argparse.Namespace, model: Path, prompt: Path, signatures: Path, backbone=None) -> int:
    """The three measurements of the module docstring, the endpoint part once per --replica-cpus
    value; prints (and with --json writes) the result. `backbone`: `model` loaded, when it already is."""
    backbone = backbone or load_backbone(str(model), "cpu")
    texts = sentences(args.words)
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    guard = Guard(backbone, PromptClassifier.load(prompt, backbone), None, mode="off")
    say(f"forward pass in process: batches of {args.forward_batch}, {cores} threads ...")
    forward = forward_rate(guard, texts, args.forward_batch, args.forward_seconds)
    forward_one = one_sentence_ms(guard.classify, texts, 10 if args.quick else 50)
    del guard, backbone
    config = parse_config({"model": str(model), "signatures": str(signatures), "device": "cpu",
                           "tasks": {"sst2": str(prompt), "sst2-off": {"prompt": str(prompt), "mode": "off"}},
                           "batching": {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": 0.005}})
    runs = {}
    for cpus in [int(x) for x in (args.replica_cpus or str(cores)).split(",")]:
        say(f"endpoint, replica asking for {cpus} CPU(s) ...")
        runs[cpus] = endpoint_run(args, config, texts, cores, cpus, forward)
        runs[cpus]["idle_vs_forward_one"] = round(runs[cpus]["idle_one_sentence_p50_ms"] / forward_one, 2)
    main_run = runs[max(runs)]
    result = {
        "command": command_line(), "commit": commit(), "machine": f"{cores}-core {platform.machine()}",
        "quick": args.quick, "model": str(model), "prompt": str(prompt), "signatures": str(signatures),
        "forward_inputs_per_s": round(forward, 2), "forward_one_sentence_p50_ms": round(forward_one, 1),
        **{k: main_run[k] for k in ("replica_cpus", "endpoint_vs_forward", "idle_vs_forward_one")},
        "runs": list(runs.values()),
    }
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def endpoint_run(args: argparse.Namespace, config, texts: list[str], cores: int, cpus: int, forward: float) -> dict:
    """One endpoint whose replica asks for `cpus` CPUs: the idle one-sentence p50 and the curve."""
    endpoint = start(config, port=free_port(), metrics_port=None, num_cpus=cores, replica_cpus=cpus)
    try:
        with GuardClient(endpoint.url, timeout=60.0) as c:
            idle_one = one_sentence_ms(lambda b: c.classify("sst2", b), texts, 10 if args.quick else 50)
        curve = []
        for size in [int(x) for x in args.sizes.split(",")]:
            for clients in [int(x) for x in args.clients.split(",")]:
                for task in ("sst2", "sst2-off"):
                    point = drive(endpoint.url, task, texts, size, clients, max(clients, args.inputs // size))
                    point["vs_forward"] = round(point["inputs_per_s"] / forward, 3)
                    say(json.dumps(point))
                    curve.append(point)
    finally:
        stop(endpoint)
    best = max((p for p in curve if p["task"] == "sst2"), key=lambda p: p["inputs_per_s"])
    return {"replica_cpus": cpus, "idle_one_sentence_p50_ms": round(idle_one, 1),
            "endpoint_vs_forward": best["vs_forward"], "best": {"size": best["size"], "clients": best["clients"]},
            "curve": curve}


if __name__ == "__main__":
    sys.exit(main())
