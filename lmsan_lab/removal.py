"""`lmsan eval removal`: the paper's removal experiment on several tasks at once, measured over HTTP.

One backdoored backbone, one soft prompt per task (trained here on the frozen backbone, cached),
all served by one guarded Ray Serve endpoint on loopback, each task also served unguarded. For every
task: clean accuracy and attack success with the guard off and on (the label the endpoint returns),
the reference's Type I / Type II counts, the monitor's precision and recall, false flags on clean
inputs. Output: `removal.md`, `removal.json`, `removal.png` in the output folder.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from lmsan_serve.backbone import Backbone, load_backbone
from lmsan_serve.data import Example, comma_list, load_examples, shipped, text_pairs
from lmsan_serve.errors import LmsanError
from lmsan_serve.prompts import PromptClassifier, PromptConfig, train_prompt

from .adaptive import PAIR_ONLY, VARIANTS
from .evaluation import GuardEvaluation, evaluate_guard, http_runner, run_clean
from .report import PAPER

VALIDATION = 500  # last training rows, held out to pick the best prompt checkpoint
TEST_SHARE = 0.2  # of a task shipped as one file


@dataclass(frozen=True)
class Task:
    """A shipped labelled data set: `train` and `test` files, or one `both` file split here."""

    title: str
    train: str | None = None
    test: str | None = None
    both: str | None = None

    def load(self, seed: int = 0) -> tuple[list[Example], list[Example]]:
        if self.both is None:
            return load_examples(shipped(self.train)), load_examples(shipped(self.test))
        rows = load_examples(shipped(self.both))
        random.Random(seed).shuffle(rows)  # the shipped file is in source order; split it at random
        cut = int(len(rows) * (1 - TEST_SHARE))
        return rows[:cut], rows[cut:]


TASKS = {
    "sst2": Task("SST-2 (sentiment, 2 classes)", "sst2/train.jsonl", "sst2/dev.jsonl"),
    "sms_spam": Task("SMS spam (2 classes)", both="sms_spam/all.jsonl"),
    "ag_news": Task("AG News (topic, 4 classes)", both="ag_news/test.jsonl"),
    "rte": Task("RTE (entailment, sentence pairs)", "rte/train.jsonl", "rte/dev.jsonl"),
}
PROMPT = PromptConfig(method="prefix", epochs=1.0, eval_every=60)
# what a task's row keeps of each adaptive variant's evaluation (its clean runs are the plain one's)
ADAPTIVE_KEYS = ("asr_off", "asr_on", "attacked", "triggered_flag_rate")


def removal_prompt(position: str) -> PromptConfig:
    """The removal experiment's prompt reading `position`: a victim's prompt reads the output its
    backdoor targets ([MASK] for BToP), else the attack has nothing to act on."""
    return PromptConfig(**PROMPT.model_dump(exclude={"position", "template"}), position=position)


def parse_tasks(spec: str) -> list[str]:
    names = comma_list(spec)
    if spec.strip() == "all":
        return list(TASKS)
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise LmsanError(f"unknown task(s) {', '.join(unknown) or '(none)'}: choose from {', '.join(TASKS)}, or all")
    return names


def _prompt(backbone, task: str, train: list[Example], folder: Path, config: PromptConfig, progress: bool,
            say: Callable[[str], None]) -> float:
    """Train (or reuse) the task's prompt in `folder`; the seconds spent training."""
    if (folder / "manifest.json").is_file():
        try:
            if PromptClassifier.load(folder, backbone).config == config:
                say(f"[{task}] reusing the prompt in {folder}")
                return 0.0
        except LmsanError as exc:
            say(f"[{task}] cached prompt unusable ({exc}); training again")
    say(f"[{task}] prompt-tuning on {len(train) - VALIDATION} examples (frozen backbone) ...")
    started = time.time()
    train_prompt(backbone, config, train[:-VALIDATION], train[-VALIDATION:], progress=progress).save(folder)
    return time.time() - started


def calibration_file(task: str, train: list[Example], folder: Path, lines: int) -> Path:
    """The task's clean calibration inputs as JSONL: the last `lines` training rows, which the
    prompt never trains on (they pick its checkpoint) and the test split never holds."""
    rows = train[-min(lines, VALIDATION):]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{task}.jsonl"
    path.write_text("".join(json.dumps({"text": e.text} | ({"text_pair": e.text_pair} if e.text_pair else {})) + "\n"
                            for e in rows), encoding="utf-8")
    return path


def parse_variants(spec: str | None) -> list[str]:
    """--variants: adaptive variants (`adaptive.VARIANTS`) measured beside the plain protocol."""
    if not spec:
        return []
    names = [v for v in VARIANTS if v != "plain"] if spec.strip() == "all" else comma_list(spec)
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise LmsanError(f"unknown adaptive variant(s) {', '.join(unknown) or '(none)'}: choose from "
                         f"{', '.join(VARIANTS)}, or all")
    return [v for v in names if v != "plain"]


def measure_task(runner, test: list[Example], triggers: list[str], variants: list[str], *, seed: int,
                 progress: bool) -> dict:
    """One task's row: the plain protocol, then each adaptive variant on the same inputs and clean
    runs (a pair-only variant on sentence-pair tasks only)."""
    clean = run_clean(runner, test, progress=progress)
    row = removal_row(evaluate_guard(runner, test, triggers, seed=seed, progress=progress, clean=clean))
    paired = all(e.text_pair for e in test)
    for v in [v for v in variants if paired or v not in PAIR_ONLY]:
        ev = evaluate_guard(runner, test, triggers, variant=v, seed=seed, progress=progress, clean=clean)
        row.setdefault("adaptive", {})[v] = {k: round(getattr(ev, k), 4) for k in ADAPTIVE_KEYS}
    return row


def _measure_locally(backbone: Backbone, signatures: str, tasks: list[str], prompts: dict[str, Path],
                     calib: dict[str, Path], measure: Callable[[str, object], None], rows: dict[str, dict]) -> None:
    """Each task through a local Guard, calibrated on its file first as a served task would be."""
    from lmsan_serve.guard import Guard
    from lmsan_serve.signatures import SignatureSet

    sig = SignatureSet.load(signatures, hidden_size=backbone.hidden_size, fingerprint=backbone.fingerprint)
    for t in tasks:
        guard = Guard(backbone, PromptClassifier.load(prompts[t], backbone), sig, mode="enforce")
        done = None
        if t in calib:
            rows_in = load_examples(calib[t], require_label=False)
            done = guard.calibrate([e.text for e in rows_in], text_pairs(rows_in))
        measure(t, guard)
        if done is not None:
            rows[t]["calibration"] = done.to_dict()


def _measure_over_http(model: str, signatures: str, device: str, tasks: list[str], prompts: dict[str, Path],
                       calib: dict[str, Path], measure: Callable[[str, object], None], rows: dict[str, dict],
                       say: Callable[[str], None]) -> None:
    """One endpoint on loopback serving every task guarded and unguarded; each task measured over
    HTTP, then what its calibration did on the replica (`GET /v1/tasks`) added to its row."""
    from lmsan_serve.serving import parse_config
    from lmsan_serve.serving.run import free_port, start, stop

    app: dict = {"model": model, "signatures": signatures, "device": device, "tasks": {}}
    for t in tasks:
        app["tasks"][t] = {"prompt": str(prompts[t])} | ({"calibration": str(calib[t])} if t in calib else {})
        app["tasks"][f"{t}-off"] = {"prompt": str(prompts[t]), "mode": "off"}
    say(f"starting one guarded endpoint for {len(tasks)} tasks on 127.0.0.1 ...")
    endpoint = start(parse_config(app), port=free_port(), metrics_port=free_port(),
                     num_cpus=max(2, os.cpu_count() or 2))
    try:
        for t in tasks:
            measure(t, http_runner(endpoint, {"off": f"{t}-off", "enforce": t}))
        status, body = endpoint.get("/v1/tasks")
        served = {d["name"]: d.get("calibration") for d in body.get("tasks", [])} if status == 200 else {}
        for t in tasks:
            if served.get(t):
                rows[t]["calibration"] = served[t]
    finally:
        stop(endpoint)


def run_removal(model: str, signatures: str, triggers: list[str], tasks: list[str], out: Path, *,
                size: int = 200, device: str = "auto", seed: int = 0, serve: bool = True, calibrate: int = VALIDATION,
                prompt: PromptConfig = PROMPT, variants: list[str] | None = None, progress: bool = True,
                say: Callable[[str], None] = print) -> dict:
    """Train or reuse a prompt per task, then measure each task through one guarded endpoint
    (`serve=False`: through a local Guard per task, the same code without Ray and HTTP).

    `calibrate` > 0: each task's guard first raises its thresholds on that many clean inputs of the
    task (`calibration_file`), as a served task with `calibration` does; 0 keeps the signature
    file's thresholds, calibrated on generic text at mining time. `variants`: adaptive variants
    measured beside the plain protocol (`measure_task`; a task's row `adaptive`)."""
    if size < 1:
        raise LmsanError("--size must be at least 1")
    if not 0 <= calibrate <= VALIDATION:
        raise LmsanError(f"--calibrate must be between 0 (off) and {VALIDATION} clean inputs per task")
    if not triggers:
        raise LmsanError("no trigger words to attack with: pass --triggers w1,w2")
    if not Path(signatures).is_file():
        raise LmsanError(f"signature file not found: {signatures}")
    backbone = load_backbone(model, device)
    splits = {t: TASKS[t].load() for t in tasks}  # (train, test), read and split once per task
    prompts = {t: out / "prompts" / t for t in tasks}
    train_s = {t: round(_prompt(backbone, t, splits[t][0], prompts[t], prompt, progress, say), 1) for t in tasks}
    calib = {t: calibration_file(t, splits[t][0], out / "calibration", calibrate) for t in tasks} if calibrate else {}
    rows: dict[str, dict] = {}

    def measure(task: str, runner) -> None:
        test = splits[task][1][:size]
        say(f"[{task}] {len(test)} clean inputs, then each with each of {len(triggers)} triggers"
            + (f", then {len(variants)} adaptive variants" if variants else "") + " ...")
        rows[task] = measure_task(runner, test, triggers, list(variants or []), seed=seed, progress=progress) | {
            "prompt_train_seconds": train_s[task], "title": TASKS[task].title}

    if serve:
        del backbone  # the replica loads its own copy
        _measure_over_http(model, signatures, device, tasks, prompts, calib, measure, rows, say)
    else:
        _measure_locally(backbone, signatures, tasks, prompts, calib, measure, rows)
    return {"model": model, "signatures": signatures, "triggers": triggers, "size": size,
            "over_http": serve, "calibration_lines": calibrate, "variants": list(variants or []), "tasks": rows}


def removal_row(ev: GuardEvaluation) -> dict:
    """The figures of one task, with the monitor's precision and recall over all inputs sent."""
    d = asdict(ev)
    clean_flags = round(ev.false_flag_rate * ev.inputs)
    row = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}
    row["reference_asr"] = round((ev.type1 + ev.type2) / max(1, ev.attacked), 4)
    row["precision"] = round(ev.detections / max(1, ev.detections + clean_flags), 4)
    row["recall"] = round(ev.triggered_flag_rate, 4)
    return row


def render_markdown(res: dict, command: str) -> str:
    lines = [
        "# Removal: guard off vs on, per task, over HTTP", "", f"Command: `{command}`", "",
        f"Backbone `{res['model']}`, signatures `{res['signatures']}`, triggers {', '.join(res['triggers'])}; "
        f"up to {res['size']} test inputs per task. ASR: clean inputs classified right without the guard, "
        "each trigger inserted separately at a random word; an input counts once if any trigger changes the "
        "label the endpoint returns (a blocked input gets no label and does not count). Reference ASR: the "
        "paper's Type I + Type II count over every (input, trigger) pair. " + (
            f"Thresholds calibrated per task on {res['calibration_lines']} clean training inputs of the task "
            "(`--calibrate`)." if res.get("calibration_lines") else
            "Thresholds as mined (calibrated on WikiText, no per-task calibration)."), "",
        "| task | clean acc off | clean acc on | ASR off | ASR on | reference ASR on | type I | type II | "
        "false flags | clean inputs holding a trigger | monitor precision | monitor recall | purged | blocked |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["tasks"].values():
        lines.append(f"| {r['title']} | {r['cacc_off']:.3f} | {r['cacc_on']:.3f} | {r['asr_off']:.3f} | "
                     f"{r['asr_on']:.3f} | {r['reference_asr']:.3f} | {r['type1']} | {r['type2']} | "
                     f"{r['false_flag_rate']:.3f} | {r.get('holding_trigger', '-')} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['purged']} | "
                     f"{r['blocked']} |")
    calibrated = {r["title"]: r["calibration"] for r in res["tasks"].values() if r.get("calibration")}
    if calibrated:
        lines += ["", "Per-task calibration (on the task's clean calibration inputs):", "",
                  "| task | inputs | flagged before | flagged after | PV thresholds raised | combinations off | "
                  "held-out margin (1/sqrt dims) | bound on unseen false flags | left flagged: a word fires alone |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for title, c in calibrated.items():
            # None: a PV at an output this task's prompt does not read, which cannot flag
            pairs = [(a, b) for a, b in zip(c["thresholds_after"], c["thresholds_before"], strict=True)
                     if a is not None and b is not None]
            raised = sum(a > b + 1e-9 for a, b in pairs)
            bound = c.get("fpr_bound")
            lines.append(f"| {title} | {c['lines']} | {c['flag_rate_before']:.3f} | {c['flag_rate_after']:.3f} | "
                         f"{raised} of {len(pairs)} | {c.get('combinations_off', '-')} | "
                         f"{c.get('margin', 0.0):.2f} | {'-' if bound is None else f'{bound:.4f}'} | "
                         f"{c.get('activations', '-')} |")
    lines += _adaptive_lines(res)
    lines += ["", f"Paper: {PAPER}.", "", "![ASR and clean accuracy per task](removal.png)", ""]
    return "\n".join(lines)


def _adaptive_lines(res: dict) -> list[str]:
    """The adaptive variants' ASR off -> on per task (the same inputs and clean runs as the plain row)."""
    variants = res.get("variants") or []
    if not variants:
        return []
    lines = ["", "Adaptive variants (`lmsan_lab.adaptive`: the trigger dressed up, or two and three different "
             "triggers in one input), ASR guard off -> on:", "",
             "| task | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for r in res["tasks"].values():
        got = r.get("adaptive", {})
        cells = [f"{got[v]['asr_off']:.3f} -> **{got[v]['asr_on']:.3f}**" if v in got else "-" for v in variants]
        lines.append(f"| {r['title']} | " + " | ".join(cells) + " |")
    return lines


def plot_removal(res: dict, path: Path) -> None:
    from .plots import pyplot

    plt = pyplot()

    names = list(res["tasks"])
    rows = list(res["tasks"].values())
    x = range(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(names)), 3.6))
    for ax, key, title in ((axes[0], "asr", "attack success rate"), (axes[1], "cacc", "clean accuracy")):
        ax.bar([i - 0.2 for i in x], [r[f"{key}_off"] for r in rows], 0.4, label="guard off", color="#c0504d")
        ax.bar([i + 0.2 for i in x], [r[f"{key}_on"] for r in rows], 0.4, label="guard on", color="#4f81bd")
        ax.set_xticks(list(x), names)
        ax.set_ylim(0, 1.05)
        ax.set_title(title)
    axes[0].axhline(0.01, color="black", lw=0.8, ls="--", label="1% target")
    axes[0].legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_removal(res: dict, out: Path, command: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "removal.json").write_text(json.dumps(res | {"command": command}, indent=2))
    plot_removal(res, out / "removal.png")
    report = out / "removal.md"
    report.write_text(render_markdown(res, command))
    return report
