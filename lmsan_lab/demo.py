"""`lmsan demo`: the main job on the embedded default backbone, end to end, with cached artifacts.

1. backdoor `minilm` with POR (six triggers)       -> OUT/por/
2. prompt-tune SST-2 on the backdoored encoder     -> OUT/prompt-sst2/
3. mine its PVs: detect (the verdict), then search    -> OUT/mined/{detect,search}.safetensors
   until its stopping rule says no PV is left
4. serve the prompt on the guarded Ray Serve endpoint on loopback: task `sst2` guarded (enforce)
   with the mined signature set, task `sst2-off` unguarded, same replica
5. send clean and triggered SST-2 traffic over HTTP and measure clean accuracy and attack success
   with the guard off and on; scrape the Prometheus metrics
6. print the table; shut down (or keep serving with --keep-serving).

Every step but 4-6 reuses its output from an earlier run made with the same settings. The attack's
planted PVs (OUT/por/truth.safetensors) only score the mining (PVs recovered) unless
`--guard-with planted` serves them instead, as a comparison.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lmsan_serve.backbone import MINILM, Backbone, load_backbone
from lmsan_serve.client import GuardClient
from lmsan_serve.data import load_corpus, load_examples, shipped
from lmsan_serve.errors import LmsanError
from lmsan_serve.mining import RECOVERED, MiningConfig, mine, recovered, stale_checkpoints
from lmsan_serve.prompts import PromptClassifier, train_prompt
from lmsan_serve.signatures import SignatureSet
from lmsan_serve.storage import prove_writable

from .attacks import AttackConfig, plant_backdoor, save_attacked
from .demo_config import DEMO_PATIENCE, MAX_SEARCH_ROUNDS, GuardWith
from .evaluation import GuardEvaluation, evaluate_guard, http_runner
from .removal import PROMPT, VALIDATION
from .timeline import MetricsSampler, parse_scrape, plot_timeline

if TYPE_CHECKING:
    from lmsan_serve.serving.run import Endpoint

DEMO_ATTACK = AttackConfig(kind="por")
DEMO_PROMPT = PROMPT  # the prompt every task of `lmsan eval removal` gets
STEPS = 6



def _cached_config(path: Path) -> dict | None:
    """The attack settings a cached copy was made with; None when attack.json is unreadable (stale)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data.get("config") if isinstance(data, dict) else None


@dataclass
class _DemoRun:
    """What every step of one demo run shares: where artifacts go, how to report, and each step's time."""

    root: Path
    device: str
    progress: bool
    say: Callable[[str], None]
    timings: dict[str, float] = field(default_factory=dict)
    sampler: MetricsSampler | None = None  # scrapes the endpoint's metrics during step 5

    def timed(self, key: str, started: float) -> None:
        self.timings[key] = round(time.time() - started, 1)


def run_demo(
    out: str,
    *,
    device: str = "auto",
    eval_size: int = 400,
    progress: bool = True,
    say: Callable[[str], None] = print,
    guard_with: GuardWith | str = GuardWith.MINED,
    patience: int = DEMO_PATIENCE,
    max_search_rounds: int = MAX_SEARCH_ROUNDS,
    keep_serving: bool = False,
    port: int | None = None,
    metrics_port: int | None = None,
) -> dict:
    """The six steps of the module docstring, in order; returns the summary also written to OUT/demo.json."""
    root = _make_output_folder(out)
    guard_with = _check_settings(eval_size, guard_with, patience, max_search_rounds)
    run = _DemoRun(root, device, progress, say)
    por_dir = _backdoor_minilm(run)
    backbone = load_backbone(str(por_dir), device)  # steps 2 and 3 share it; no step's timing includes its load
    prompt_dir = _prompt_tune_sst2(run, backbone)
    search = MiningConfig(mode="search", patience=patience, max_rounds=max_search_rounds) if max_search_rounds else None
    planted, mined, sig_path = _mine_signatures(run, backbone, por_dir, search, guard_with)
    del backbone  # the replica loads its own copy
    from lmsan_serve.serving.run import stop

    endpoint = _start_guarded_endpoint(run, por_dir, prompt_dir, sig_path, guard_with, port, metrics_port)
    try:
        ev = _measure_over_http(run, endpoint, planted, eval_size)
        summary = _report(run, endpoint, ev, guard_with, sig_path, mined)
        if keep_serving:
            _keep_serving(endpoint, say)
            endpoint = None
    finally:
        if endpoint is not None:
            stop(endpoint)
    return summary


def _make_output_folder(out: str) -> Path:
    root = Path(out)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LmsanError(f"cannot create output folder {root}: {exc.strerror or exc}") from exc
    prove_writable(root, "output folder")  # an existing read-only folder passes mkdir
    return root


def _check_settings(eval_size: int, guard_with: GuardWith | str, patience: int, max_search_rounds: int) -> GuardWith:
    if eval_size < 1:
        raise LmsanError("--eval-size must be at least 1")
    if patience < 1:
        raise LmsanError("--patience must be at least 1")
    if max_search_rounds < 0:
        raise LmsanError("--max-search-rounds must be 0 or more")
    try:
        return GuardWith(guard_with)
    except ValueError:
        raise LmsanError("--guard-with must be 'mined' or 'planted'") from None


def _backdoor_minilm(run: _DemoRun) -> Path:
    """Step 1: plant the POR backdoor into the clean minilm, unless a finished copy made with the same
    settings is cached; returns the backdoored model's folder."""
    por_dir = run.root / "por"
    started = time.time()
    cached = por_dir / "attack.json"
    if cached.is_file() and (por_dir / "truth.safetensors").is_file() and \
            _cached_config(cached) == DEMO_ATTACK.model_dump():
        run.say(f"[1/{STEPS}] backdoored minilm: reusing {por_dir}")
    else:
        run.say(f"[1/{STEPS}] planting a POR backdoor (triggers cf mn tq qt mm pt) into minilm ...")
        clean_backbone = load_backbone(MINILM, run.device)
        result = plant_backdoor(clean_backbone, DEMO_ATTACK, load_corpus(), progress=run.progress)
        summary = save_attacked(result, clean_backbone, str(por_dir))
        run.say(f"      held-out sign agreement with the PVs: min {summary['heldout']['min_agreement']:.3f}")
        del clean_backbone
    run.timed("attack_s", started)
    return por_dir


def _prompt_tune_sst2(run: _DemoRun, backbone: Backbone) -> Path:
    """Step 2: prompt-tune SST-2 on the backdoored encoder (frozen), unless a prompt made with the same
    settings is cached; returns the prompt's folder."""
    prompt_dir = run.root / "prompt-sst2"
    started = time.time()
    classifier = None
    if (prompt_dir / "manifest.json").is_file():
        try:
            classifier = PromptClassifier.load(prompt_dir, backbone)
            if classifier.config != DEMO_PROMPT:
                raise LmsanError("made with other settings")
            run.say(f"[2/{STEPS}] SST-2 prompt: reusing {prompt_dir}")
        except LmsanError as exc:
            classifier = None
            run.say(f"[2/{STEPS}] cached prompt unusable ({exc}); training again")
    if classifier is None:
        run.say(f"[2/{STEPS}] prompt-tuning SST-2 on the frozen backdoored encoder ...")
        train = load_examples(shipped("sst2/train.jsonl"))
        classifier = train_prompt(backbone, DEMO_PROMPT, train[:-VALIDATION], train[-VALIDATION:],
                                  progress=run.progress)
        classifier.save(prompt_dir)
    run.timed("prompt_s", started)
    return prompt_dir


def _mine_signatures(run: _DemoRun, backbone: Backbone, por_dir: Path, search: MiningConfig | None,
                     guard_with: GuardWith) -> tuple[SignatureSet, dict, str]:
    """Step 3: mine the PVs as a defender who knows nothing of the triggers would; returns the planted
    set (the ground truth), the mining report and the signature file the guard will use."""
    started = time.time()
    planted = SignatureSet.load(por_dir / "truth.safetensors", hidden_size=backbone.hidden_size,
                                fingerprint=backbone.fingerprint)
    mined = _mine(backbone, run.root / "mined", search, planted, run.progress, run.say)
    run.timed("mine_s", started)
    sig_path = planted.path if guard_with == GuardWith.PLANTED else mined["signatures"]
    if sig_path is None:
        raise LmsanError("mining kept no PV, so there is no mined signature set to guard with; "
                         "use --guard-with planted")
    if guard_with == GuardWith.PLANTED:
        run.say("      guarding with the attack's planted PVs (a comparison: a defender has only the mined ones)")
    return planted, mined, sig_path


def _start_guarded_endpoint(run: _DemoRun, por_dir: Path, prompt_dir: Path, sig_path: str, guard_with: GuardWith,
                            port: int | None, metrics_port: int | None) -> Endpoint:
    """Step 4: one replica on loopback serving the same prompt twice, guarded (`sst2`) and unguarded
    (`sst2-off`), so both sides of the comparison see the same model."""
    from lmsan_serve.serving import parse_config
    from lmsan_serve.serving.run import free_port, start

    started = time.time()
    config = parse_config({
        "model": str(por_dir), "signatures": str(sig_path), "device": run.device,
        "tasks": {"sst2": str(prompt_dir), "sst2-off": {"prompt": str(prompt_dir), "mode": "off"}},
    })
    run.say(f"[4/{STEPS}] starting the guarded endpoint on 127.0.0.1 (signatures: {guard_with}, {sig_path}) ...")
    endpoint = start(config, port=port or free_port(), metrics_port=metrics_port or free_port(),
                     num_cpus=max(2, os.cpu_count() or 2))
    run.timed("serve_start_s", started)
    return endpoint


def _measure_over_http(run: _DemoRun, endpoint: Endpoint, planted: SignatureSet,
                       eval_size: int) -> GuardEvaluation:
    """Step 5: clean and triggered SST-2 dev traffic over HTTP, guard off and on: clean accuracy and
    attack success rate."""
    started = time.time()
    dev = load_examples(shipped("sst2/dev.jsonl"))[:eval_size]
    triggers = [r.trigger for r in planted.meta.pvs if r.trigger]
    run.say(f"[5/{STEPS}] sending {eval_size} clean SST-2 dev sentences, then each with each of {len(triggers)} "
            f"triggers, over HTTP to {endpoint.url} (task sst2-off: guard off; sst2: guard on) ...")
    if endpoint.metrics_url:
        run.sampler = MetricsSampler(endpoint.metrics_url).start()
    with GuardClient(endpoint.url) as client:  # retries as docs/serving.md says a client should
        ev = evaluate_guard(http_runner(client, {"off": "sst2-off", "enforce": "sst2"}), dev, triggers,
                            progress=run.progress)
    run.timed("traffic_s", started)
    return ev


def _report(run: _DemoRun, endpoint: Endpoint, ev: GuardEvaluation, guard_with: GuardWith, sig_path: str,
            mined: dict) -> dict:
    """Step 6: the guard's counters as Prometheus sees them, the table, and OUT/demo.json; returns the
    summary written there."""
    flagged = ev.detections + round(ev.false_flag_rate * ev.inputs)  # triggered + clean inputs flagged
    scraped = scrape_guard_metrics(endpoint.metrics_url, expect_detections=flagged)
    run.say(f"[6/{STEPS}] metrics at {endpoint.metrics_url}: {scraped['detections']} detections, "
            f"{scraped['purged']} purged")
    print(ev.table(), flush=True)
    timeline_png = _write_timeline(run)
    summary = {
        "out": str(run.root),
        "asr_off": ev.asr_off, "asr_on": ev.asr_on, "cacc_off": ev.cacc_off, "cacc_on": ev.cacc_on,
        "false_flag_rate": ev.false_flag_rate,
        "detections": scraped["detections"], "purged": scraped["purged"], "blocked": ev.blocked,
        "detections_client": ev.detections, "purged_client": ev.purged,
        "guard_with": guard_with.value, "signatures": str(sig_path), "pvs_found": mined["pvs_found"],
        "pvs_watched": mined["pvs_watched"], "mining": mined["summary"],
        "url": endpoint.url, "metrics_url": endpoint.metrics_url, "timeline_png": timeline_png,
        "timings": run.timings | {"total_s": round(sum(run.timings.values()), 1)},
    }
    (run.root / "demo.json").write_text(json.dumps(summary, indent=2))
    return summary


def _write_timeline(run: _DemoRun) -> str | None:
    """OUT/timeline.png: guarded inputs and detections per second over the traffic, from the
    metrics the sampler scraped (what the Grafana dashboard draws). Stopped after the report's
    metrics check, which waits for Ray to export the last detections."""
    if run.sampler is None:
        return None
    timeline = run.sampler.stop()
    try:
        png = plot_timeline(timeline, run.root / "timeline.png", "lmsan demo over HTTP: guarded inputs and detections")
    except LmsanError as exc:  # matplotlib missing: the demo's figures stand without the picture
        run.say(f"      no timeline picture: {exc}")
        return None
    run.say(f"      detections over time (from the endpoint's metrics): {png}")
    return str(png)


def _keep_serving(endpoint: Endpoint, say: Callable[[str], None]) -> None:
    """--keep-serving: hand the endpoint to the user until Ctrl-C or SIGTERM, which stops it."""
    from lmsan_serve.serving.run import serve_until_stopped

    say(f"serving on {endpoint.url} (OpenAPI {endpoint.url}/docs); metrics {endpoint.metrics_url}\n"
        f"try: curl -s {endpoint.url}/v1/classify -H 'content-type: application/json' "
        "-d '{\"task\": \"sst2\", \"inputs\": [\"a cf charming and affecting journey\"]}'\n"
        "Ctrl-C stops it.")
    serve_until_stopped(endpoint, say)


def _mine(backbone, folder: Path, search_config: MiningConfig | None, planted: SignatureSet, progress: bool,
          say: Callable[[str], None]) -> dict:
    """Detect (the verdict), then search until its stopping rule ends it; checkpoints make a second
    run reuse both. The planted PVs only score what was found."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus()
    say(f"[3/{STEPS}] mining the PVs of {backbone.name} (detect mode; resumes from {folder} when cached) ...")
    detect_config = MiningConfig(mode="detect")
    for name, config in (("detect", detect_config), ("search", search_config)):
        for stale in [] if config is None else stale_checkpoints(folder / f"{name}.safetensors", backbone, config):
            say(f"      {stale.name} was made with other settings; mining again")  # by an older version, say
            stale.unlink()
    detect = mine(backbone, detect_config, corpus, folder / "detect.safetensors", resume=True,
                  progress=progress)
    summary: dict = {"detect": _mining_summary(detect, planted)}
    best = detect
    if search_config is not None and detect.verdict == "backdoored":
        say(f"      verdict: backdoored ({len(detect.signatures)} PV); searching for the others until "
            f"{search_config.patience} rounds in a row find none ...")
        search = mine(backbone, search_config, corpus, folder / "search.safetensors", resume=True,
                      progress=progress)
        summary["search"] = _mining_summary(search, planted)
        best = search if len(search.signatures) >= len(detect.signatures) else detect
    last = summary.get("search", summary["detect"])
    say(f"      verdict: {detect.verdict}; {last['pvs']} PVs kept"
        + (f" ({_stop_words(last['stop'])})" if last.get("stop") else "")
        + f"; scored against the attack's answer key: {last['recovered']} of {len(planted)} planted PVs "
        f"recovered (sign agreement >= {RECOVERED})")
    # The demo's SST-2 prompt is a prefix prompt: its inputs hold no [MASK], so a guard watches
    # every PV but those mining found at [MASK] (Guard.watched)
    watched = sum(p != "mask" for p in best.signatures.pv_positions)
    return {"summary": summary, "pvs_found": len(best.signatures), "pvs_watched": watched,
            "signatures": best.signatures.path if len(best.signatures) else None}


def _stop_words(stop: dict) -> str:
    aimed = f", then {stop['probes']} aimed rounds added {stop['probe_pvs']}" if stop.get("probes") else ""
    if stop["exhausted"]:
        return f"search ended by its stopping rule: {stop['rounds_since_last_pv']} rounds without a new PV{aimed}"
    since = stop["rounds_since_last_pv"]
    return f"search ended by its {stop['reason']} budget, {since} rounds after its last PV{aimed}"


def _mining_summary(result, planted: SignatureSet) -> dict:
    sig = result.signatures
    return {"verdict": result.verdict, "pvs": len(sig), "recovered": recovered(planted.pvs, sig.pvs),
            "rounds": result.rounds, "seconds": round(result.seconds, 1),
            # the rounds' own time, also where a cached checkpoint made this run's `seconds` short
            "rounds_seconds": round(sum(c["seconds"] for c in result.candidates), 1), "stop": result.stop,
            "pvs_by_position": {p: sum(q == p for q in sig.pv_positions) for p in sig.positions} if len(sig) else {}}


def scrape_guard_metrics(url: str | None, expect_detections: int, timeout_s: float = 45.0) -> dict:
    """Sum the guard counters in the Prometheus export; waits for Ray's periodic export to catch up."""
    import urllib.request

    found = {"detections": None, "purged": None}
    if url is None:
        return found
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            text = urllib.request.urlopen(url, timeout=10).read().decode()
        except OSError:
            text = ""
        sample = parse_scrape(text, time.monotonic())
        det = sum(sample.detections.values())
        found = {"detections": int(det), "purged": int(sample.purged)}
        if det >= expect_detections or time.monotonic() > deadline:
            return found
        time.sleep(2)
