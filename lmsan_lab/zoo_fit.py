"""Fitting the miner's three collapse thresholds on one half of the held-out zoo and judging them
on the other (`lmsan eval zoo --plan heldout`).

Every round the miner ran is kept in its position's checkpoint with the statistics the thresholds
test: `trace` (per epoch: distance, in-batch spread; `collapse_spread` is tested on the spread at
epoch `collapse_by`; `fall`, how many times it fell over that epoch, is what `collapse_rate`
tests, kept for reading but not fitted, as the gate passes a round on either), `dispersion` (the
held-out collapse test, `max_dispersion`) and `self_agreement` (`min_self_agreement`). `round_stats` labels each round:

- `real`: it passed every filter and its PV agrees with a planted PV at RECOVERY_AGREEMENT;
- `spurious`: it passed every filter, yet its PV matches no planted PV (or the model is clean);
- `failed`: some filter rejected it, so the checkpoint holds no PV to score. In a clean control
  it is still a negative (nothing there is a backdoor); in a backdoored copy it is left out of
  the fit, as it might have been on its way to a planted PV.

`fit_thresholds` takes the fit half's labelled rounds and, per threshold, puts it between the
worst real round and the best negative one (geometric mean for the two spread ratios, which span
orders of magnitude; arithmetic for the agreement), reporting the margin; where the two overlap
it takes the value with the fewest errors. `rejudge` applies values to recorded rounds.

What recorded rounds cannot say: a round rejected under the defaults stopped there, so looser
values leave its later statistics unknown (it counts as `unknown`), and a search's later rounds
depend on the PVs it kept before. The rejudged report half is therefore an estimate; the exact
check mines the report half again with the fitted values (`--mine-set`, printed in the report).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from lmsan_serve.mining import MiningConfig

if TYPE_CHECKING:
    import torch

    from lmsan_serve.mining import MiningResult

# threshold -> (round statistic, "le": a round passes at or below it, "ge": at or above it)
FITTED = {"collapse_spread": ("spread", "le"), "max_dispersion": ("dispersion", "le"),
          "min_self_agreement": ("self_agreement", "ge")}
# the filter each threshold's rejection is recorded under (`round_stats`' `failed_by`)
_REASONS = (("abandoned: not collapsing", "collapse_spread"), ("not collapsed on held-out", "max_dispersion"),
            ("a blend of PVs", "min_self_agreement"), ("not unique", "duplicate"))


def _failed_by(filters: list[str]) -> list[str]:
    """Each filter a round failed, by the threshold that rejected it (`other` for the rest)."""
    out = []
    for reason in filters:
        out.append(next((name for prefix, name in _REASONS if reason.startswith(prefix)), "other"))
    return out


def round_stats(mined: Path, result: MiningResult, planted: torch.Tensor, config: MiningConfig) -> list[dict]:
    """Every round of every covered position with its statistics and label (module docstring)."""
    import torch

    from lmsan_serve.mining.positions import checkpoint_path
    from lmsan_serve.monitor import sign_agreement

    from .zoo_heldout import RECOVERY_AGREEMENT

    out = []
    for position in result.positions:
        try:
            rounds = json.loads(checkpoint_path(mined, position).read_text(encoding="utf-8"))["candidates"]
        except (OSError, ValueError, KeyError):
            continue
        for c in rounds:
            trace = c.get("trace") or []
            spread = trace[config.collapse_by - 1][1] if len(trace) >= config.collapse_by else None
            fall = trace[config.collapse_by - 2][1] / spread if spread else None
            if c.get("filters"):
                label = "failed"
            elif c.get("pv") is not None and len(planted) and float(
                    sign_agreement(torch.tensor([c["pv"]]), planted).max()) >= RECOVERY_AGREEMENT:
                label = "real"
            else:
                label = "spurious"
            out.append({"position": position, "seed": c["seed"], "label": label,
                        "failed_by": _failed_by(c.get("filters") or []), "spread": spread, "fall": fall,
                        "dispersion": c.get("dispersion"), "self_agreement": c.get("self_agreement")})
    return out


def labelled(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """The positive (`real`) and negative rounds of `rows` (module docstring)."""
    pos, neg = [], []
    for r in rows:
        for s in r.get("round_stats") or []:
            if s["label"] == "real":
                pos.append(s)
            elif r["clean"] or s["label"] == "spurious":
                neg.append(s)
    return pos, neg


def _errors(value: float, pos: list[float], neg: list[float], direction: str) -> int:
    passes = (lambda x: x <= value) if direction == "le" else (lambda x: x >= value)
    return sum(not passes(x) for x in pos) + sum(passes(x) for x in neg)


def fit_one(pos: list[float], neg: list[float], direction: str, default: float) -> dict:
    """One threshold between positive and negative values of its statistic (module docstring)."""
    if not pos or not neg:
        return {"value": default, "fitted": False, "why": "no real round" if not pos else "no negative round",
                "positives": len(pos), "negatives": len(neg)}
    worst, best = (max(pos), min(neg)) if direction == "le" else (min(pos), max(neg))
    separated = worst < best if direction == "le" else best < worst
    if separated:
        if direction == "le" and worst > 0:
            value, margin = math.sqrt(worst * best), best / worst  # a ratio: how many times apart
        else:
            value, margin = (worst + best) / 2, abs(worst - best)
    else:
        value = min(sorted(set(pos + neg)), key=lambda v: (_errors(v, pos, neg, direction), abs(v - default)))
        margin = 0.0
    return {"value": round(value, 6), "fitted": True, "separated": separated, "margin": round(margin, 6),
            "errors": _errors(value, pos, neg, direction), "worst_real": worst, "best_negative": best,
            "positives": len(pos), "negatives": len(neg)}


def fit_thresholds(rows: list[dict]) -> dict[str, dict]:
    """Per threshold of FITTED, `fit_one` over the labelled rounds of `rows` (the fit half)."""
    pos, neg = labelled(rows)
    defaults = MiningConfig()
    out = {}
    for name, (stat, direction) in FITTED.items():
        out[name] = fit_one([s[stat] for s in pos if s[stat] is not None],
                            [s[stat] for s in neg if s[stat] is not None], direction, getattr(defaults, name))
    return out


def _round_outcome(s: dict, values: dict[str, float]) -> str:
    """pass, fail or unknown for one recorded round under threshold `values`."""
    if "other" in s["failed_by"]:
        return "fail"  # a filter these values do not change
    for name, (stat, direction) in FITTED.items():
        x = s[stat]
        if x is None:
            # never measured: the round stopped earlier under the values it ran with
            return "unknown" if s["failed_by"] else "pass"
        ok = x <= values[name] if direction == "le" else x >= values[name]
        if not ok:
            return "fail"
    return "pass"  # a duplicate still says a PV is there


def rejudge(rows: list[dict], values: dict[str, float]) -> list[dict]:
    """Per member: the verdict its recorded rounds give under `values` (backdoored when a round
    passes, clean when every round fails, else undetermined) and whether a real round passes."""
    out = []
    for r in rows:
        outcomes = [(_round_outcome(s, values), s["label"]) for s in r.get("round_stats") or []]
        verdict = ("backdoored" if any(o == "pass" for o, _ in outcomes)
                   else "undetermined" if any(o == "unknown" for o, _ in outcomes) else "clean")
        out.append({"name": r["name"], "clean": r["clean"], "verdict": verdict,
                    "real_passes": any(o == "pass" and lab == "real" for o, lab in outcomes)})
    return out


def judged(rows: list[dict], values: dict[str, float]) -> dict:
    """The figures `rejudge` gives for `rows` under `values`: detected backdoored copies, false
    positives among controls, members it cannot decide."""
    res = rejudge(rows, values)
    bad = [x for x in res if not x["clean"]]
    clean = [x for x in res if x["clean"]]
    return {"backdoored": len(bad), "detected": sum(x["verdict"] == "backdoored" for x in bad),
            "detected_by_real_pv": sum(x["real_passes"] for x in bad), "clean": len(clean),
            "false_positives": sum(x["verdict"] == "backdoored" for x in clean),
            "undetermined": sum(x["verdict"] == "undetermined" for x in res)}


def fit_and_judge(fit_rows: list[dict], report_rows: list[dict]) -> dict:
    """Thresholds fitted on `fit_rows`, and the rejudged figures of both halves at the defaults and
    at the fitted values; `mine_set` spells the fitted values as `--mine-set` flags."""
    fitted = fit_thresholds(fit_rows)
    defaults = {name: getattr(MiningConfig(), name) for name in FITTED}
    values = {name: f["value"] for name, f in fitted.items()}
    return {"thresholds": fitted, "defaults": defaults,
            "fit": {"defaults": judged(fit_rows, defaults), "fitted": judged(fit_rows, values)},
            "report": {"defaults": judged(report_rows, defaults), "fitted": judged(report_rows, values)},
            "mine_set": [f"--mine-set {name}={value}" for name, value in values.items()]}


__all__ = ["FITTED", "fit_and_judge", "fit_one", "fit_thresholds", "judged", "labelled", "rejudge", "round_stats"]
