"""The held-out zoo's report: per design (and per attack, trigger kind, text, weak or not) the
detection rate, the share of members whose every planted PV was recovered and the time to verdict,
for the `report` half with the `fit` half's figures beside; the clean controls' false positives;
and the thresholds fitted on the fit half (`zoo_fit`). Written as `heldout.md` and `heldout.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .zoo_fit import fit_and_judge
from .zoo_heldout import RECOVERY_AGREEMENT
from .zoo_plan import Half

GROUPS = ("design", "attack", "trigger_kind", "text", "weak")


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 2) if xs else None


def figures(rows: list[dict]) -> dict:
    """Detection, PV recovery and time to verdict of backdoored `rows`; false positives of clean ones."""
    bad = [r for r in rows if not r["clean"]]
    clean = [r for r in rows if r["clean"]]
    times = [r["time_to_verdict"] for r in bad if r["verdict"] == "backdoored"]
    return {
        "models": len(bad), "detected": sum(r["verdict"] == "backdoored" for r in bad),
        "all_pvs_recovered": sum(r["all_recovered"] for r in bad),
        "pvs_recovered": sum(r["pvs_recovered"] for r in bad), "pvs_planted": sum(r["pvs_planted"] for r in bad),
        "time_to_verdict_mean": _mean(times), "time_to_verdict_max": max(times, default=None),
        "controls": len(clean), "false_positives": sum(r["verdict"] == "backdoored" for r in clean),
        "control_time_mean": _mean([r["time_to_verdict"] for r in clean]),
    }


def _key(row: dict, group: str) -> str:
    return ("weak" if row["weak"] else "strong") if group == "weak" else str(row[group])


def summarize_heldout(rows: list[dict], planned: int | None = None) -> dict:
    """Per half: overall figures and per level of every group of GROUPS; the threshold fit."""
    halves = {h.value: [r for r in rows if r["half"] == h.value] for h in Half}
    out: dict = {"models": len(rows), "planned": max(planned or 0, len(rows)),
                 "recovery_agreement": RECOVERY_AGREEMENT, "halves": {}}
    for half, rs in halves.items():
        bad = [r for r in rs if not r["clean"]]
        per = {g: {level: figures([r for r in bad if _key(r, g) == level])
                   for level in sorted({_key(r, g) for r in bad})} for g in GROUPS}
        out["halves"][half] = {"all": figures(rs), **per}
    out["fit"] = fit_and_judge(halves[Half.FIT.value], halves[Half.REPORT.value])
    return out


def _rate(hits: int, total: int) -> str:
    return f"{hits}/{total}" if total else "-"


def _cell(f: dict | None) -> str:
    """detected | all PVs recovered | time to verdict, for one group and half."""
    if not f or not f["models"]:
        return "- | - | -"
    mean, top = f["time_to_verdict_mean"], f["time_to_verdict_max"]
    t = "-" if mean is None else f"{mean:.1f} / {top:.1f}"
    return f"{_rate(f['detected'], f['models'])} | {_rate(f['all_pvs_recovered'], f['models'])} | {t}"


def _group_table(summary: dict, group: str) -> list[str]:
    report, fit = summary["halves"][Half.REPORT.value], summary["halves"][Half.FIT.value]
    levels = sorted(set(report[group]) | set(fit[group]))
    lines = [f"### Per {group.replace('_', ' ')}", "",
             f"| {group} | report: detected | report: every PV recovered | report: time to verdict mean / max (s) | "
             "fit: detected | fit: every PV recovered | fit: time to verdict mean / max (s) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {lv} | {_cell(report[group].get(lv))} | {_cell(fit[group].get(lv))} |" for lv in levels]
    return lines + [""]


def _fit_section(fit: dict) -> list[str]:
    lines = ["## Thresholds fitted on the fit half", "",
             "Each threshold sits between the worst round that found a planted PV and the best round that "
             "did not (spurious PVs, every round of a clean control); margin: how many times apart (spread "
             "ratios) or how far apart (agreement). Rounds the defaults rejected have no PV to score and are left "
             "out where the model is backdoored.", "",
             "| threshold | default | fitted | separated | margin | errors | real rounds | negative rounds |",
             "|---|---|---|---|---|---|---|---|"]
    for name, f in fit["thresholds"].items():
        if not f["fitted"]:
            lines.append(f"| {name} | {fit['defaults'][name]} | not fitted ({f['why']}) | - | - | - | "
                         f"{f['positives']} | {f['negatives']} |")
            continue
        lines.append(f"| {name} | {fit['defaults'][name]} | {f['value']} | {'yes' if f['separated'] else 'NO'} | "
                     f"{f['margin']} | {f['errors']} | {f['positives']} | {f['negatives']} |")
    lines += ["", "Recorded rounds judged again at each set of values (an estimate: a round the defaults "
              "stopped early has unknown later statistics, and a search's later rounds depend on what it "
              "kept). The exact check mines the report half again with `" + " ".join(fit["mine_set"]) + "`.", "",
              "| half | values | detected | by a real PV | false positives | undetermined |",
              "|---|---|---|---|---|---|"]
    for half in (Half.REPORT.value, Half.FIT.value):
        for which in ("defaults", "fitted"):
            j = fit[half][which]
            lines.append(f"| {half} | {which} | {_rate(j['detected'], j['backdoored'])} | "
                         f"{_rate(j['detected_by_real_pv'], j['backdoored'])} | "
                         f"{_rate(j['false_positives'], j['clean'])} | {j['undetermined']} |")
    return lines + [""]


def render_heldout(rows: list[dict], summary: dict, base_model: str, command: str) -> str:
    halves = summary["halves"]
    lines = [f"# lmsan eval: held-out zoo on {base_model}", "", f"Command: `{command}`", "",
             "Backdoored copies over attack x PV design x trigger kind x attack text (a balanced fraction), weak "
             "copies among them, and clean controls trained further with a contrastive objective on other text; "
             "each mined in search mode to its stopping rule at every position, the position never told. "
             "Thresholds are fitted on the `fit` half and reported on the `report` half. A planted PV is "
             f"recovered when a mined PV agrees with it in sign on at least {RECOVERY_AGREEMENT:.0%} of "
             "its entries. Time to verdict: the seconds to the first kept PV (backdoored verdicts).", ""]
    if summary["planned"] > summary["models"]:
        lines += [f"**Partial: {summary['models']} of the {summary['planned']} planned models are done** (the same "
                  "command resumes).", ""]
    lines += ["| half | backdoored detected | every PV recovered | PVs recovered | clean controls called backdoored |",
              "|---|---|---|---|---|"]
    for half in (Half.REPORT.value, Half.FIT.value):
        a = halves[half]["all"]
        lines.append(f"| {half} | {_rate(a['detected'], a['models'])} | {_rate(a['all_pvs_recovered'], a['models'])} | "
                     f"{_rate(a['pvs_recovered'], a['pvs_planted'])} | {_rate(a['false_positives'], a['controls'])} |")
    lines += ["", "## Per factor", ""]
    for group in summary["halves"][Half.REPORT.value]:
        if group != "all":
            lines += _group_table(summary, group)
    lines += _fit_section(summary["fit"])
    lines += ["## Per model", "", "Planted: the attack's held-out sign agreement of its weakest trigger with its PV.",
              "", "| model | half | planted | truth | verdict | PVs kept by position | recovered | time to verdict s | "
              "mining s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        where = ", ".join(f"{p} {n}" for p, n in r["pvs_by_position"].items()) or "-"
        rec = f"{r['pvs_recovered']}/{r['pvs_planted']}" if not r["clean"] else "-"
        planted = "-" if r.get("attack_agreement") is None else f"{r['attack_agreement']:.3f}"
        lines.append(f"| {r['name']} | {r['half']} | {planted} | {r['truth']} | {r['verdict']} | {where} | {rec} | "
                     f"{r['time_to_verdict']:.1f} | {r['mining_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def write_heldout_report(rows: list[dict], summary: dict, out_dir: str | Path, base_model: str, command: str) -> Path:
    """Write `heldout.md` and `heldout.json` to `out_dir`; the Markdown's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "heldout.json").write_text(json.dumps({"command": command, "base_model": base_model, "summary": summary,
                                                  "rows": rows}, indent=2))
    report = out / "heldout.md"
    report.write_text(render_heldout(rows, summary, base_model, command))
    return report


__all__ = ["figures", "render_heldout", "summarize_heldout", "write_heldout_report"]
