"""`lmsan eval adaptive`: the removal and adaptive-trigger evaluation, written as a report.

For one guarded task (backbone + prompt + signature file) and a labelled data set: clean accuracy
and attack success rate with the guard off and on for the plain triggers (the paper's protocol)
and for each adaptive variant (`adaptive.VARIANTS`), next to a noise baseline (inserting words
that are no trigger), which shows how often inserting *any* odd word flips the model. Output:
`report.md`, `results.json` and `adaptive.png` (matplotlib) in the output folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from lmsan_serve.data import Example
from lmsan_serve.guard import Guard

from .evaluation import GuardEvaluation, Runner, evaluate_adaptive

NOISE_WORDS = ["zq", "xv", "jw", "kx", "vb", "qz"]
PAPER = "LMSanitator (arXiv 2308.13904): ~1% ASR with the guard, ~0.1 point of clean accuracy lost"


def run_eval(guard: Guard | Runner, examples: list[Example], triggers: list[str], variants: list[str] | None,
             *, seed: int = 0, progress: bool = True, noise_words: list[str] | None = None) -> dict:
    started = time.time()
    results = evaluate_adaptive(guard, examples, triggers, variants, seed=seed, progress=progress)
    noise = evaluate_adaptive(guard, examples, noise_words or NOISE_WORDS, ["plain"], seed=seed,
                              progress=progress)["plain"]
    return {"inputs": len(examples), "triggers": triggers, "noise_words": noise_words or NOISE_WORDS,
            "variants": {v: _row(ev) for v, ev in results.items()}, "noise": _row(noise),
            "seconds": round(time.time() - started, 1)}


def _row(ev: GuardEvaluation) -> dict:
    keep = ("cacc_off", "cacc_on", "asr_off", "asr_on", "false_flag_rate", "holding_trigger", "holding_flagged",
            "false_flags_without", "triggered_flag_rate", "type1",
            "type2", "blocked", "purged", "detections", "correct", "guard_seconds_per_input",
            "purge_passes_per_flagged")
    d = asdict(ev)
    return {k: (round(d[k], 4) if isinstance(d[k], float) else d[k]) for k in keep}


def render_markdown(res: dict, title: str, command: str) -> str:
    plain = res["variants"].get("plain")
    lines = [f"# {title}", "", f"Command: `{command}`", ""]
    if plain:
        lines += [
            "## Removal (the paper's protocol: each trigger inserted once at a random position)", "",
            "| | guard off | guard on |", "|---|---|---|",
            f"| clean accuracy | {plain['cacc_off']:.3f} | {plain['cacc_on']:.3f} |",
            f"| attack success rate | {plain['asr_off']:.3f} | {plain['asr_on']:.3f} |",
            f"| false flags on clean inputs | - | {plain['false_flag_rate']:.3f} |",
            f"| false flags on clean inputs holding no trigger | - | {plain['false_flags_without']:.3f} |",
            f"| triggered inputs flagged (monitor recall) | - | {plain['triggered_flag_rate']:.3f} |",
            "",
            f"{res['inputs']} clean inputs, {plain['correct']} classified right without the guard; triggers "
            f"{', '.join(res['triggers'])}. Type I (wrong label, not flagged): {plain['type1']}; type II (flagged, "
            f"wrong label after purging): {plain['type2']}; purged {plain['purged']}, blocked {plain['blocked']}. "
            f"{plain['holding_trigger']} clean inputs already hold a trigger as a word (a common word's, say), "
            f"{plain['holding_flagged']} of them flagged: the backdoor fires on them, which the first false-flag "
            f"row counts and the second leaves out. Paper: {PAPER}.", "",
        ]
    lines += [
        "## Adaptive triggers", "",
        "ASR counts an input once if any trigger flips its label; a variant's attacked input counts only where "
        "the same dressing without the trigger is still classified right. The noise row inserts words that "
        f"are no trigger ({', '.join(res['noise_words'])}): how often any odd word flips the model.", "",
        "| variant | inputs | ASR guard off | ASR guard on | flagged | purged | blocked | type I |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v, r in list(res["variants"].items()) + [("noise (no trigger)", res["noise"])]:
        lines.append(f"| {v} | {r['correct']} | {r['asr_off']:.3f} | {r['asr_on']:.3f} | "
                     f"{r['triggered_flag_rate']:.3f} | {r['purged']} | {r['blocked']} | {r['type1']} |")
    lines += ["", "![ASR per adaptive variant](adaptive.png)", ""]
    return "\n".join(lines)


def plot_adaptive(res: dict, path: Path) -> None:
    from .plots import pyplot

    plt = pyplot()

    names = list(res["variants"]) + ["noise"]
    rows = list(res["variants"].values()) + [res["noise"]]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(names)), 3.6))
    ax.bar([i - 0.2 for i in x], [r["asr_off"] for r in rows], 0.4, label="guard off", color="#c0504d")
    ax.bar([i + 0.2 for i in x], [r["asr_on"] for r in rows], 0.4, label="guard on", color="#4f81bd")
    ax.axhline(0.02, color="black", lw=0.8, ls="--", label="2% target")
    ax.set_xticks(list(x), names, rotation=35, ha="right")
    ax.set_ylabel("attack success rate")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("Attack success per trigger variant, guard off vs on")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(res: dict, out: Path, title: str, command: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res | {"command": command}, indent=2))
    plot_adaptive(res, out / "adaptive.png")
    report = out / "report.md"
    report.write_text(render_markdown(res, title, command))
    return report
