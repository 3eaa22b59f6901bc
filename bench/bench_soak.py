"""Soak, reload and fault runs on the guarded endpoint, on loopback.

Three phases against one app with two replicas of the classifier:

1. soak: `--clients` concurrent clients for `--minutes`, 10% triggered traffic. Reports requests,
   errors, p50/p99 latency and the resident memory (RSS) of the replicas at the start and the end.
2. reload under load: the signature file is replaced (atomically, as a mining pipeline would)
   with a valid copy, then with garbage, then with the valid file again, while clients keep
   sending. The replicas reload the good files, keep the last good set on the bad one, and no
   request fails.
3. replica kill: one replica process is killed with SIGKILL under load. Clients are
   `lmsan_serve.client.GuardClient`s, which follow the documented retry policy (docs/serving.md:
   retry a connection error or a 502/503/504 up to 3 times with backoff; classification is
   idempotent). Reports requests lost after retries and how long Serve took to bring the replica
   back.

The endpoint serves the signature file mining wrote (the demo's `lmsan-out/demo/mined/search.safetensors`
by default); the triggers sent are the attack's own (its `attack.json`), the answer key of the
experiment, which the endpoint never sees. Every answer is checked. A triggered input must come back
flagged and purged with its trigger named; a clean input must come back with the label the prompt
gives it unguarded (computed up front, in this process), and a clean input that comes back flagged
is counted as a false flag.
The script exits 1 if a request was lost or an answer was wrong. The short form runs in the test
suite (`tests/test_soak.py`); the long form is `python bench/bench_soak.py` (10 minutes of soak,
16 clients, on the demo's backdoored minilm). See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lmsan_serve.client import EndpointError, GuardClient
from lmsan_serve.kinds import Action

if TYPE_CHECKING:  # the model code (torch) loads only once the run starts, not for --help
    from lmsan_serve.guard import GuardResult

# The endpoint batches an input with whatever else is in flight, and padding to another length
# moves its label scores by float rounding: an input whose two best labels are this close could
# change label between batches without anything being wrong, so it is left out of the clean pool.
MIN_LABEL_MARGIN = 2e-3


@dataclass
class Tally:
    latencies_ms: list[float] = field(default_factory=list)
    lost: int = 0  # failed after every retry
    retried: int = 0  # requests that needed at least one retry
    wrong: int = 0  # 200, but a triggered input not purged with its trigger named
    wrong_clean: int = 0  # 200, but a clean input's label is not its unguarded label
    false_flags: int = 0  # clean inputs answered as flagged
    clean_answered: int = 0
    statuses: dict[int, int] = field(default_factory=dict)  # last status of each lost request; 0: no answer
    lock: threading.Lock = field(default_factory=threading.Lock)

    def pct(self, q: float) -> float | None:
        xs = sorted(self.latencies_ms)
        return round(xs[min(len(xs) - 1, int(q * len(xs)))], 1) if xs else None

    def summary(self, seconds: float) -> dict:
        n = len(self.latencies_ms)
        return {"requests": n + self.lost, "answered": n, "lost": self.lost, "retried": self.retried,
                "wrong": self.wrong, "wrong_clean": self.wrong_clean, "false_flags": self.false_flags,
                "clean_answered": self.clean_answered, "rps": round(n / seconds, 2) if seconds else None,
                "p50_ms": self.pct(0.5), "p99_ms": self.pct(0.99), "seconds": round(seconds, 1),
                "first_try_statuses": {str(k): v for k, v in sorted(self.statuses.items())}}


def check_answer(tally: Tally, result: GuardResult, trigger: str | None, label: str | None) -> None:
    """Count one answered input (under `tally.lock`): a triggered one must be purged with its
    `trigger` named; a clean one must keep its unguarded `label` and not be flagged."""
    guard = result.guard
    if trigger is not None:
        tally.wrong += not (guard.action == Action.PURGED and trigger in guard.removed)
        return
    tally.clean_answered += 1
    tally.false_flags += bool(guard.flagged)
    tally.wrong_clean += result.label != label


def load(url: str, task: str, clean: list[tuple[str, str]], triggered: list[tuple[str, str]],
         clients: int, seconds: float, tally: Tally, stop: threading.Event | None = None) -> float:
    """`clients` threads send one input per request for `seconds` (or until `stop`); 1 in 10
    triggered. `clean` holds (text, unguarded label), `triggered` (text, trigger)."""
    stop = stop or threading.Event()
    deadline = time.monotonic() + seconds

    def client(k: int) -> None:
        rng = random.Random(k)
        with GuardClient(url, timeout=120.0) as endpoint:  # the default RetryPolicy is the documented one
            while time.monotonic() < deadline and not stop.is_set():
                trig = label = None
                if rng.random() < 0.1:
                    text, trig = rng.choice(triggered)
                else:
                    text, label = rng.choice(clean)
                t0 = time.perf_counter()
                try:
                    answer = endpoint.classify_answer(task, [text])
                except EndpointError as exc:
                    with tally.lock:
                        tally.lost += 1
                        tally.statuses[exc.status or 0] = tally.statuses.get(exc.status or 0, 0) + 1
                    continue
                ms = (time.perf_counter() - t0) * 1000
                with tally.lock:
                    tally.latencies_ms.append(ms)
                    tally.retried += int(answer.retries > 0)
                    check_answer(tally, answer.results[0], trig, label)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def clean_pool(model: str, prompt: str, texts: list[str], batch_size: int = 32) -> list[tuple[str, str]]:
    """(text, label) for each of `texts`, the label the prompt gives it with the guard off,
    computed here before the endpoint starts; near ties (MIN_LABEL_MARGIN) are left out."""
    from lmsan_serve import load_backbone
    from lmsan_serve.guard import Guard
    from lmsan_serve.prompts import PromptClassifier

    backbone = load_backbone(model, "cpu")
    plain = Guard(backbone, PromptClassifier.load(prompt, backbone), None, mode="off")
    pool = []
    for s in range(0, len(texts), batch_size):
        for text, r in zip(texts[s : s + batch_size], plain.classify(texts[s : s + batch_size]), strict=True):
            top = sorted(r.scores.values(), reverse=True)
            if len(top) < 2 or top[0] - top[1] >= MIN_LABEL_MARGIN:
                pool.append((text, r.label))
    return pool


def replica_processes() -> dict[int, int]:
    """pid -> RSS bytes of every GuardedClassifier replica of the Ray cluster this process started:
    its workers descend from it (through the raylet), so another cluster on the same machine (a
    second test run, a developer's `lmsan serve`) is neither counted nor killed."""
    import psutil

    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            if "GuardedClassifier" in " ".join(p.cmdline() or []):
                out[p.pid] = p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def running_replicas(app: str = "lmsan") -> int:
    from ray import serve

    try:
        dep = serve.status().applications[app].deployments["GuardedClassifier"]
    except (KeyError, AttributeError):
        return 0
    return int(dep.replica_states.get("RUNNING", 0))


def replace_atomically(target: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".swap-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, target)


def run(model: str, prompt: str, signatures: Path, work: Path, *, triggers: list[str], clients: int,
        soak_s: float, phase_s: float, replicas: int = 2, seed: int = 0, say=print) -> dict:
    from lmsan_serve.data import insert_trigger, load_examples, shipped
    from lmsan_serve.serving import parse_config
    from lmsan_serve.serving.run import free_port, start, stop

    work.mkdir(parents=True, exist_ok=True)
    sig = work / "signatures.safetensors"
    shutil.copy(signatures, sig)
    rng = random.Random(seed)
    texts = [" ".join(e.text.split()[:48]) for e in load_examples(shipped("sst2/dev.jsonl"))[:300]]
    clean = clean_pool(model, prompt, texts)
    triggered = [(insert_trigger(rng.choice(clean)[0], t, rng), t) for t in triggers for _ in range(20)]
    config = parse_config({"model": model, "signatures": str(sig), "watch_interval_s": 0.5, "device": "cpu",
                           "tasks": {"sst": prompt}})
    say(f"starting the endpoint with {replicas} replicas ...")
    endpoint = start(config, port=free_port(), metrics_port=None, num_cpus=max(2, os.cpu_count() or 2),
                     replicas=replicas)
    res: dict = {"clients": clients, "replicas": replicas, "model": model, "signatures": str(signatures),
                 "triggers": triggers, "clean_pool": len(clean)}
    try:
        load(endpoint.url, "sst", clean, triggered, clients, min(10.0, phase_s), Tally())  # warm up
        # 1. soak
        rss_start = replica_processes()
        say(f"soak: {clients} clients for {soak_s:.0f} s ...")
        tally, samples, sampled = Tally(), [], threading.Event()

        def sample_rss() -> None:  # the replicas' total RSS once a minute, to tell growth from warm-up
            while not sampled.wait(60.0):
                samples.append(round(sum(replica_processes().values()) / 2**20, 1))

        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        took = load(endpoint.url, "sst", clean, triggered, clients, soak_s, tally)
        sampled.set()
        rss_end = replica_processes()
        res["soak"] = tally.summary(took) | {
            "rss_start_mb": {str(p): round(v / 2**20, 1) for p, v in rss_start.items()},
            "rss_end_mb": {str(p): round(v / 2**20, 1) for p, v in rss_end.items()},
            "rss_growth_mb": round((sum(rss_end.values()) - sum(rss_start.values())) / 2**20, 1),
            "rss_total_mb_per_minute": samples,
        }
        # 2. reload under load: valid copy, garbage, valid again
        say(f"reload under load: {phase_s:.0f} s ...")
        good = signatures.read_bytes()
        tally, stop_evt = Tally(), threading.Event()
        box: dict = {}
        th = threading.Thread(target=lambda: box.setdefault(
            "s", load(endpoint.url, "sst", clean, triggered, clients, phase_s * 3, tally, stop_evt)))
        th.start()
        states = []
        for data in (good, b"garbage, not a signature file", good):
            time.sleep(phase_s / 2)
            replace_atomically(sig, data)
            time.sleep(phase_s / 2)
            states.append(endpoint.get("/v1/signatures")[1])
        stop_evt.set()
        th.join()
        after = states[-1]["reloads"]  # one replica's count since it started: 1 + 2 good, 1 bad
        res["reload"] = tally.summary(box["s"]) | {
            "reloads_ok": after.get("ok", 0),
            "reloads_failed": after.get("failed", 0),
            "loaded_during_bad_file": bool(states[1]["loaded"]),
            "last_error_during_bad_file": states[1]["last_error"],
        }
        # 3. kill one replica under load
        victims = sorted(replica_processes())
        say(f"killing replica pid {victims[0]} of {len(victims)} under load ...")
        tally, stop_evt, box = Tally(), threading.Event(), {}
        th = threading.Thread(target=lambda: box.setdefault(
            "s", load(endpoint.url, "sst", clean, triggered, clients, 600, tally, stop_evt)))
        th.start()
        time.sleep(phase_s / 2)
        killed_at = time.monotonic()
        os.kill(victims[0], signal.SIGKILL)
        back_s = None
        while time.monotonic() - killed_at < 180:
            alive = replica_processes()
            # back = a replica process that was not there before the kill, and Serve counting them all
            # as running (right after the kill Serve still counts the dead one)
            if set(alive) - set(victims) and len(alive) >= replicas and running_replicas() >= replicas:
                back_s = round(time.monotonic() - killed_at, 1)
                break
            time.sleep(0.5)
        time.sleep(phase_s / 2)
        stop_evt.set()
        th.join()
        res["kill"] = tally.summary(box["s"]) | {"killed_pid": victims[0], "replica_back_after_s": back_s,
                                                 "running_replicas": running_replicas()}
    finally:
        stop(endpoint)
    phases = [res[k] for k in ("soak", "reload", "kill") if k in res]
    res["lost_total"] = sum(p["lost"] for p in phases)
    res["wrong_total"] = sum(p["wrong"] + p["wrong_clean"] for p in phases)
    res["false_flags_total"] = sum(p["false_flags"] for p in phases)
    return res


def _answers(phase: dict) -> str:
    """What a phase's answers were worth: wrong triggered and clean answers, and false flags."""
    return (f"wrong {phase['wrong']} triggered / {phase['wrong_clean']} of {phase['clean_answered']} clean, "
            f"false flags {phase['false_flags']}")


def render(res: dict) -> str:
    s, r, k = res["soak"], res["reload"], res["kill"]
    return "\n".join([
        f"soak: {res['clients']} clients, {res['replicas']} replicas, {s['seconds']} s: {s['answered']} answered "
        f"({s['rps']} req/s), lost {s['lost']}, {_answers(s)}, p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms",
        f"  replica RSS MB start {sorted(s['rss_start_mb'].values())} end {sorted(s['rss_end_mb'].values())} "
        f"(growth {s['rss_growth_mb']} MB; total per minute {s['rss_total_mb_per_minute']})",
        f"reload under load: {r['answered']} answered, lost {r['lost']}, {_answers(r)}; reloads ok "
        f"{r['reloads_ok']}, failed {r['reloads_failed']}; set kept during the bad file: "
        f"{r['loaded_during_bad_file']}",
        f"replica kill: {k['answered']} answered, lost {k['lost']} after retries, retried {k['retried']}, "
        f"{_answers(k)}; replica back after {k['replica_back_after_s']} s "
        f"(running {k['running_replicas']}/{res['replicas']})",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="lmsan-out/demo/por", help="backdoored model folder (lmsan attack)")
    p.add_argument("--prompt", default="lmsan-out/demo/prompt-sst2", help="prompt folder trained on it")
    p.add_argument("--minutes", type=float, default=10.0, help="soak length (default 10)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--phase-seconds", type=float, default=20.0, help="length of the reload and kill phases")
    p.add_argument("--signatures", default="lmsan-out/demo/mined/search.safetensors",
                   help="signature file to serve (default: the one the demo mined)")
    p.add_argument("--triggers", help="comma-separated triggers to send (default: the attack's, from its attack.json)")
    p.add_argument("--work", default="lmsan-out/soak", help="folder for the swapped signature file")
    p.add_argument("--json", help="also write the results as JSON to this path")
    args = p.parse_args(argv)
    signatures, attack = Path(args.signatures), Path(args.model) / "attack.json"
    need = [p for p in (signatures, Path(args.prompt) / "manifest.json") if not p.is_file()]
    need += [] if args.triggers or attack.is_file() else [attack]
    if need:
        print(f"bench_soak: error: need {', '.join(map(str, need))} (run `make demo` first, or pass --triggers)",
              file=sys.stderr)
        return 2
    triggers = args.triggers.split(",") if args.triggers else json.loads(attack.read_text())["config"]["triggers"]
    res = run(args.model, args.prompt, signatures, Path(args.work), triggers=triggers, clients=args.clients,
              soak_s=args.minutes * 60, phase_s=args.phase_seconds, say=lambda m: print(m, file=sys.stderr, flush=True))
    print(render(res))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0 if res["lost_total"] == 0 and res["wrong_total"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
