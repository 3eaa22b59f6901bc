"""Tables in the docs generated from the committed result JSON, so that a table cannot say what its
data does not.

A generated table sits in a Markdown file between

    <!-- generated: NAME -->
    ...
    <!-- end generated -->

and NAME is one of TABLES: a function from the JSON file it names to the table's lines.

    .venv/bin/python bench/results_tables.py           # rewrite every generated table
    .venv/bin/python bench/results_tables.py --check   # exit 1, naming each table that differs

`tests/test_results_tables.py` runs the check.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
DOCS = [ROOT / "docs" / "results.md", ROOT / "README.md"]
REGION = re.compile(r"(<!-- generated: (?P<name>[a-z-]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def demo_table(d: dict) -> list[str]:
    """`lmsan demo --json`: clean accuracy, ASR, false flags and detections, guard off and on."""
    flagged = f"{d['detections_client']:,} / {d['purged_client']:,} / {d['blocked']:,}"
    return [
        f"| | guard off (`sst2-off`) | guard on (`sst2`, {d['guard_with']} set) | target (design.md) |",
        "|---|---:|---:|---|",
        f"| clean accuracy, SST-2 dev (first 400) | {d['cacc_off']:.3f} | {d['cacc_on']:.3f} | <= 0.1 pt lost |",
        f"| attack success rate (any of 6 triggers flips a correct input) | **{d['asr_off']:.3f}** | "
        f"**{d['asr_on']:.3f}** | <= 1% |",
        f"| false flags on clean inputs | - | {d['false_flag_rate']:.3f} | <= 0.5% |",
        f"| triggered inputs flagged / purged / blocked | - | {flagged} | |",
        f"| detections in the Prometheus export (`ray_lmsan_detections_total`) | | {d['detections']:,} | |",
        f"| PVs mining found / the guard watched (at outputs its prompt reads) | | "
        f"{d['pvs_found']} / {d.get('pvs_watched', d['pvs_found'])} | |",
    ]


def endpoint_table(d: dict) -> list[str]:
    """`bench/bench_endpoint.py --replica-cpus 1,2`: guarded inputs/s per point, per replica setting."""
    runs = {r["replica_cpus"]: r for r in d["runs"]}
    cpus = sorted(runs)
    head = " | ".join(f"inputs/s (x forward), replica {c} CPU{'s' if c > 1 else ''}" for c in cpus)
    lines = [f"| sentences per request | clients | {head} | p50 ms, {cpus[-1]} CPUs |",
             "|---:|---:|" + "---:|" * len(cpus) + "---:|"]
    points = [p for p in runs[cpus[-1]]["curve"] if p["task"] == "sst2"]
    for p in points:
        same = [next(q for q in runs[c]["curve"] if (q["task"], q["size"], q["clients"]) ==
                     ("sst2", p["size"], p["clients"])) for c in cpus]
        cells = " | ".join(f"{q['inputs_per_s']:.1f} ({q['vs_forward']:.2f})" for q in same)
        lines.append(f"| {p['size']} | {p['clients']} | {cells} | {p['p50_ms']:.0f} |")
    return lines


def _x(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def bench_table(d: dict) -> list[str]:
    """`bench/bench_all.py` (`make bench`): the headline line against the issue's targets."""
    h, g = d["headline"], d["pieces"].get("guard") or {}
    planted = (g.get("throughput_in_process") or {}).get("planted", {}).get("ratio_with_probe")
    purge = h.get("purge_speedup_vs_reference_p50") or {}
    mining = h.get("mining_speedup_vs_reference")
    lines = [f"| `make bench` at {d['commit'][:7]} ({d['machine']['cpus']}-core CPU, mined set) | measured | target |",
             "|---|---:|---|",
             "| clean throughput, guard enforce / off, over HTTP | "
             f"{_x(h['guard_throughput_ratio'], '.3f')} | >= 0.97 |",
             f"| the same in process (planted set beside it) | {_x(h['guard_throughput_ratio_in_process'], '.3f')} "
             f"({_x(planted, '.3f')}) | >= 0.97 |",
             f"| triggered / clean p50 over HTTP (p99) | {_x(h['triggered_p50_ratio'])}x "
             f"({_x(h['triggered_p99_ratio'])}x) | <= 2 |",
             f"| endpoint / raw batched forward, best request size | {_x(h['endpoint_vs_forward'])} | >= 0.7 |",
             "| one sentence on an idle endpoint / one forward pass (p50) | "
             f"{_x(h['idle_vs_forward_one'], '.1f')}x | |",
             f"| monitor speed-up over the reference loop | {_x(h['monitor_speedup_vs_reference'], '.0f')}x | |",
             "| purge speed-up over the batched reference, p50 at " + ", ".join(purge) + " words | "
             + " / ".join(f"{v:.1f}x" for v in purge.values()) + " | |"]
    if mining is None:
        lines.append("| mining speed-up over the reference at its best | not run (`--skip mining`) | >= 3x |")
    else:
        cells = ", ".join(f"{k} {_x(v['speedup'], '.1f')}x" for k, v in mining.items())
        lines.append(f"| mining speed-up over the reference at its best | {cells} | >= 3x |")
    return lines


def _worst(adaptive: dict | None) -> str:
    """The adaptive variant with the highest ASR with the guard on, or '-' where none was run."""
    if not adaptive:
        return "-"
    name, v = max(adaptive.items(), key=lambda kv: kv[1]["asr_on"])
    return f"**{v['asr_on']:.3f}** ({name}, of {len(adaptive)})"


def matrix_table(d: dict) -> list[str]:
    """`bench/asr_matrix.py`: per attack and task, over HTTP with the mined set, guard off and on."""
    lines = ["| attack: mined PVs (planted recovered) | task | clean accuracy off / on | ASR off | ASR on | "
             "adaptive ASR on, worst variant | false flags (inputs holding a trigger) | "
             "calibration: flagged after (a word fires alone) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, a in d["attacks"].items():
        m = a["mined"]
        found = f"{m['pvs']} ({m['recovered']} of {m['planted']})" if "planted" in m else str(m["pvs"])
        for r in a["tasks"].values():
            c = r.get("calibration") or {}
            cal = f"{c['flag_rate_after']:.3f} ({c.get('activations', '-')})" if c else "-"
            lines.append(f"| {name}: {found} | {r['title']} | {r['cacc_off']:.3f} / {r['cacc_on']:.3f} | "
                         f"{r['asr_off']:.3f} | **{r['asr_on']:.3f}** | {_worst(r.get('adaptive'))} | "
                         f"{r['false_flag_rate']:.3f} ({r['holding_trigger']}) | {cal} |")
    return lines


def _seconds(point: dict) -> str:
    """A reference point's seconds, and the lower bound on its time to the right verdict where a
    budget cut it short (bench_mine's `floor`)."""
    if point["floor"] > point["seconds"] + 0.05:
        return f"{point['seconds']:,.0f} s (right verdict: >= {point['floor']:,.0f} s)"
    return f"{point['seconds']:,.0f} s"


def mining_table(d: dict) -> list[str]:
    """`bench/bench_mine.py`: ours (told the position) against the reference's sweep, per model."""
    lines = ["| model | truth | ours: verdict, rounds, time | reference, each lr of its sweep: verdict, rounds, "
             "time | speed-up to the right verdict |", "|---|---|---|---|---:|"]
    for r in d["rows"]:
        o = r["ours"]
        sweep = "<br>".join(f"{p['lr']:g}: {p['verdict']}, {p['rounds']}, {_seconds(p)}" for p in r["reference_sweep"])
        speed = "-" if r["time_ratio"] is None or not r["ours_correct"] else \
            (">= " if r["ratio_is_lower_bound"] else "") + f"{r['time_ratio']:.1f}x"
        lines.append(f"| {r['attack']} ({r['position']}) | {r['truth']} | {o['verdict']}, {o['rounds']}, "
                     f"{o['seconds']:,.0f} s | {sweep or '-'} | **{speed}** |")
    return lines


# table name -> (its JSON file under docs/results, the function that renders it)
TABLES: dict[str, tuple[str, Callable[[dict], list[str]]]] = {
    "demo": ("demo.json", demo_table),
    "endpoint": ("endpoint-minilm.json", endpoint_table),
    "bench": ("bench-minilm.json", bench_table),
    "matrix": ("asr-matrix-minilm.json", matrix_table),
    "mining": ("bench-mine-minilm.json", mining_table),
}


def render(name: str) -> str:
    if name not in TABLES:
        raise SystemExit(f"unknown generated table {name!r} (known: {', '.join(TABLES)})")
    file, fn = TABLES[name]
    return "\n".join(fn(json.loads((RESULTS / file).read_text(encoding="utf-8")))) + "\n"


def regenerate(text: str) -> tuple[str, list[str]]:
    """`text` with every generated table rendered again, and the names of those that changed."""
    changed: list[str] = []

    def sub(m: re.Match) -> str:
        body = render(m["name"])
        if body != m["body"]:
            changed.append(m["name"])
        return m.group(1) + body + m.group(4)

    return REGION.sub(sub, text), changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from its JSON")
    args = ap.parse_args(argv)
    stale = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        new, changed = regenerate(text)
        stale += [f"{doc.relative_to(ROOT)}: {name}" for name in changed]
        if changed and not args.check:
            doc.write_text(new, encoding="utf-8")
    if args.check and stale:
        print("tables differ from their JSON (run bench/results_tables.py): " + "; ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
