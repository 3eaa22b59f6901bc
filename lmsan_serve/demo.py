"""`lmsan demo`: the main job on the embedded default backbone, end to end, with cached artifacts.

1. backdoor `minilm` with POR (six triggers)       -> OUT/por/
2. prompt-tune SST-2 on the backdoored encoder     -> OUT/prompt-sst2/
3. mine its PVs: detect, then a few search rounds  -> OUT/mined/{detect,search}.safetensors
4. serve the prompt on the guarded Ray Serve endpoint on loopback: task `sst2` guarded (enforce),
   task `sst2-off` unguarded, same replica
5. send clean and triggered SST-2 traffic over HTTP and measure clean accuracy and attack success
   with the guard off and on; scrape the Prometheus metrics
6. print the table; shut down (or keep serving with --keep-serving).

Every step but 4-6 reuses its output from an earlier run made with the same settings.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .attacks import AttackConfig, plant_backdoor, save_attacked
from .backbone import MINILM, load_backbone
from .data import Example, load_corpus, load_examples, shipped
from .errors import LmsanError
from .evaluation import Runner, evaluate_guard
from .guard import GuardResult, GuardStats, Verdict
from .mining import RECOVERED, MiningConfig, mine, recovered, stale_checkpoint
from .prompts import PromptClassifier, train_prompt
from .removal import PROMPT, VALIDATION
from .signatures import SignatureSet

DEMO_ATTACK = AttackConfig(kind="por")
DEMO_PROMPT = PROMPT  # the prompt every task of `lmsan eval --removal` gets
SEARCH_ROUNDS = 4  # enough to show search mode, short enough for the demo
STEPS = 6


def _cached_config(path: Path) -> dict | None:
    """The attack settings a cached copy was made with; None when attack.json is unreadable (stale)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data.get("config") if isinstance(data, dict) else None


def run_demo(
    out: str,
    *,
    device: str = "auto",
    eval_size: int = 400,
    progress: bool = True,
    say: Callable[[str], None] = print,
    guard_with: str = "planted",
    search_rounds: int = SEARCH_ROUNDS,
    keep_serving: bool = False,
    port: int | None = None,
    metrics_port: int | None = None,
) -> dict:
    root = Path(out)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LmsanError(f"cannot create output folder {root}: {exc.strerror or exc}") from exc
    if eval_size < 1:
        raise LmsanError("--eval-size must be at least 1")
    if guard_with not in ("planted", "mined"):
        raise LmsanError("--guard-with must be 'planted' or 'mined'")
    if search_rounds < 0:
        raise LmsanError("--search-rounds must be 0 or more")
    timings: dict[str, float] = {}

    # 1. attack (cached: reuse a finished copy made with the same settings)
    por_dir = root / "por"
    started = time.time()
    cached = por_dir / "attack.json"
    if cached.is_file() and (por_dir / "truth.safetensors").is_file() and \
            _cached_config(cached) == DEMO_ATTACK.model_dump():
        say(f"[1/{STEPS}] backdoored minilm: reusing {por_dir}")
    else:
        say(f"[1/{STEPS}] planting a POR backdoor (triggers cf mn tq qt mm pt) into minilm ...")
        clean_backbone = load_backbone(MINILM, device)
        result = plant_backdoor(clean_backbone, DEMO_ATTACK, load_corpus(), progress=progress)
        summary = save_attacked(result, clean_backbone, str(por_dir))
        say(f"      held-out sign agreement with the PVs: min {summary['heldout']['min_agreement']:.3f}")
        del clean_backbone
    timings["attack_s"] = round(time.time() - started, 1)

    # 2. prompt-tune SST-2 on the backdoored encoder (frozen)
    backbone = load_backbone(str(por_dir), device)
    prompt_dir = root / "prompt-sst2"
    started = time.time()
    classifier = None
    if (prompt_dir / "manifest.json").is_file():
        try:
            classifier = PromptClassifier.load(prompt_dir, backbone)
            if classifier.config != DEMO_PROMPT:
                raise LmsanError("made with other settings")
            say(f"[2/{STEPS}] SST-2 prompt: reusing {prompt_dir}")
        except LmsanError as exc:
            classifier = None
            say(f"[2/{STEPS}] cached prompt unusable ({exc}); training again")
    if classifier is None:
        say(f"[2/{STEPS}] prompt-tuning SST-2 on the frozen backdoored encoder ...")
        train = load_examples(shipped("sst2/train.jsonl"))
        classifier = train_prompt(backbone, DEMO_PROMPT, train[:-VALIDATION], train[-VALIDATION:],
                                  progress=progress)
        classifier.save(prompt_dir)
    timings["prompt_s"] = round(time.time() - started, 1)

    # 3. mine the PVs, as a defender who knows nothing of the triggers would
    started = time.time()
    planted = SignatureSet.load(por_dir / "truth.safetensors", hidden_size=backbone.hidden_size,
                                fingerprint=backbone.fingerprint)
    mined = _mine(backbone, root / "mined", search_rounds, planted, progress, say)
    timings["mine_s"] = round(time.time() - started, 1)
    sig_path = planted.path if guard_with == "planted" else mined["signatures"]
    if sig_path is None:
        raise LmsanError("mining kept no PV, so there is no mined signature set to guard with; "
                         "use --guard-with planted")

    # 4. serve: one replica, the same prompt guarded and unguarded
    from .serving import parse_config
    from .serving.run import free_port, serve_until_stopped, start, stop

    started = time.time()
    config = parse_config({
        "model": str(por_dir), "signatures": str(sig_path), "device": device,
        "tasks": {"sst2": str(prompt_dir), "sst2-off": {"prompt": str(prompt_dir), "mode": "off"}},
    })
    del backbone, classifier  # the replica loads its own copy
    say(f"[4/{STEPS}] starting the guarded endpoint on 127.0.0.1 (signatures: {guard_with}, {sig_path}) ...")
    endpoint = start(config, port=port or free_port(), metrics_port=metrics_port or free_port(),
                     num_cpus=max(2, os.cpu_count() or 2))
    timings["serve_start_s"] = round(time.time() - started, 1)
    try:
        # 5. traffic over HTTP
        started = time.time()
        dev = load_examples(shipped("sst2/dev.jsonl"))[:eval_size]
        triggers = [r.trigger for r in planted.meta.pvs if r.trigger]
        say(f"[5/{STEPS}] sending {eval_size} clean SST-2 dev sentences, then each with each of {len(triggers)} "
            f"triggers, over HTTP to {endpoint.url} (task sst2-off: guard off; sst2: guard on) ...")
        ev = evaluate_guard(http_runner(endpoint, {"off": "sst2-off", "enforce": "sst2"}), dev, triggers,
                            progress=progress)
        timings["traffic_s"] = round(time.time() - started, 1)
        # 6. metrics, as Prometheus sees them
        flagged = ev.detections + round(ev.false_flag_rate * ev.inputs)  # triggered + clean inputs flagged
        scraped = scrape_guard_metrics(endpoint.metrics_url, expect_detections=flagged)
        say(f"[6/{STEPS}] metrics at {endpoint.metrics_url}: {scraped['detections']} detections, "
            f"{scraped['purged']} purged")
        print(ev.table(), flush=True)
        summary = {
            "out": str(root),
            "asr_off": ev.asr_off, "asr_on": ev.asr_on, "cacc_off": ev.cacc_off, "cacc_on": ev.cacc_on,
            "false_flag_rate": ev.false_flag_rate,
            "detections": scraped["detections"], "purged": scraped["purged"], "blocked": ev.blocked,
            "detections_client": ev.detections, "purged_client": ev.purged,
            "guard_with": guard_with, "signatures": str(sig_path), "mining": mined["summary"],
            "url": endpoint.url, "metrics_url": endpoint.metrics_url,
            "timings": timings | {"total_s": round(sum(timings.values()), 1)},
        }
        (root / "demo.json").write_text(json.dumps(summary, indent=2))
        if keep_serving:
            say(f"serving on {endpoint.url} (OpenAPI {endpoint.url}/docs); metrics {endpoint.metrics_url}\n"
                f"try: curl -s {endpoint.url}/v1/classify -H 'content-type: application/json' "
                "-d '{\"task\": \"sst2\", \"inputs\": [\"a cf charming and affecting journey\"]}'\n"
                "Ctrl-C stops it.")
            serve_until_stopped(endpoint, say)
            endpoint = None
    finally:
        if endpoint is not None:
            stop(endpoint)
    return summary


def _mine(backbone, folder: Path, search_rounds: int, planted: SignatureSet, progress: bool,
          say: Callable[[str], None]) -> dict:
    """Detect, then `search_rounds` rounds of search; checkpoints make a second run reuse both."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus()
    say(f"[3/{STEPS}] mining the PVs of {backbone.name} (detect mode; resumes from {folder} when cached) ...")
    detect_config = MiningConfig(mode="detect")
    search_config = MiningConfig(mode="search", max_rounds=search_rounds or 1)
    for name, config in (("detect", detect_config), ("search", search_config)):
        stale = stale_checkpoint(folder / f"{name}.safetensors", backbone, config)
        if stale is not None:  # cached by an older version or other settings: mine again
            say(f"      {stale.name} was made with other settings; mining again")
            stale.unlink()
    detect = mine(backbone, detect_config, corpus, folder / "detect.safetensors", resume=True,
                  progress=progress)
    summary: dict = {"detect": _mining_summary(detect, planted)}
    best = detect
    if search_rounds and detect.verdict == "backdoored":
        say(f"      verdict: backdoored ({len(detect.signatures)} PV); searching {search_rounds} more rounds ...")
        search = mine(backbone, search_config, corpus, folder / "search.safetensors", resume=True,
                      progress=progress)
        summary["search"] = _mining_summary(search, planted)
        best = search if len(search.signatures) >= len(detect.signatures) else detect
    last = summary.get("search", summary["detect"])
    say(f"      verdict: {detect.verdict}; {last['pvs']} PVs kept, {last['recovered']} of {len(planted)} planted "
        f"PVs recovered (sign agreement >= {RECOVERED})")
    return {"summary": summary, "signatures": best.signatures.path if len(best.signatures) else None}


def _mining_summary(result, planted: SignatureSet) -> dict:
    sig = result.signatures
    return {"verdict": result.verdict, "pvs": len(sig), "recovered": recovered(planted.pvs, sig.pvs),
            "rounds": result.rounds,
            "seconds": round(result.seconds, 1)}


def http_runner(endpoint, tasks: dict[str, str], chunk: int = 16, clients: int = 4) -> Runner:
    """An evaluation `Runner` that classifies through the served endpoint: mode -> task name."""

    def post(task: str, part: list[Example]) -> list[GuardResult]:
        inputs = [e.text if not e.text_pair else {"text": e.text, "text_pair": e.text_pair} for e in part]
        status, body = endpoint.post("/v1/classify", {"task": task, "inputs": inputs}, timeout=300)
        if status != 200:
            raise LmsanError(f"the endpoint answered {status}: {body.get('reason', body)}")
        return [GuardResult(r["label"], r["scores"], Verdict(**r["guard"])) for r in body["results"]]

    def run(examples: list[Example], mode: str, stats: GuardStats) -> list[GuardResult]:
        parts = [examples[i : i + chunk] for i in range(0, len(examples), chunk)]
        with ThreadPoolExecutor(clients) as pool:
            out = [r for rs in pool.map(lambda p: post(tasks[mode], p), parts) for r in rs]
        stats.inputs += len(out)
        stats.flagged += sum(r.guard.flagged for r in out)
        return out

    return run


def scrape_guard_metrics(url: str | None, expect_detections: int, timeout_s: float = 45.0) -> dict:
    """Sum the guard counters in the Prometheus export; waits for Ray's periodic export to catch up."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    found = {"detections": None, "purged": None}
    if url is None:
        return found
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            text = urllib.request.urlopen(url, timeout=10).read().decode()
        except OSError:
            text = ""
        det = purged = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "ray_lmsan_detections_total":
                    det += sample.value
                elif sample.name == "ray_lmsan_requests_total" and sample.labels.get("action") == "purged":
                    purged += sample.value
        found = {"detections": int(det), "purged": int(purged)}
        if det >= expect_detections or time.monotonic() > deadline:
            return found
        time.sleep(2)
