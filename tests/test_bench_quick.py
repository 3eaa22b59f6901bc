"""Every benchmark's `--quick` mode, run once as its own process, and its JSON checked for the
figures the README and bench/README.md quote, with values that mean something: a benchmark that
silently stopped measuring (no input flagged, requests lost, monitors that disagree) fails here.

The quick modes share one build of the tiny artifacts (bench/tiny_artifacts.py: a tiny BERT with
a POR backdoor, a victim prompt, a signature set mined from it), made once for this module and
passed to every script with --cache. bench_mine.py and bench_soak.py have their own tests
(test_reference_mine.py, test_soak.py).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _load(name: str) -> ModuleType:
    """A bench script as a module (they import their siblings by name, so bench/ goes on the path)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def _run(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=ROOT)
    print(f"{script}: {time.perf_counter() - t0:.1f} s")
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _positive(x: float | None) -> bool:
    return x is not None and math.isfinite(x) and x > 0


def _share(x: float | None) -> bool:
    return x is not None and 0.0 <= x <= 1.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("tiny-artifacts")
    return json.loads(_run("tiny_artifacts.py", "--out", str(out), timeout=300).stdout)


def test_tiny_artifacts_hold_what_the_quick_modes_need(tiny):
    assert tiny["accuracy"] >= 0.9 and tiny["flipped"] >= 0.9 and tiny["clean_match"] < 0.75
    assert tiny["planted"] == len(tiny["triggers"]) == 6
    assert 1 <= tiny["recovered"] <= tiny["mined_pvs"]
    for key in ("model", "prompt", "truth", "mined"):
        assert Path(tiny[key]).exists(), key
    # a second build with the same settings reuses the first, untouched
    art = _load("tiny_artifacts").build(tiny["root"], progress=lambda _msg: None)
    assert art.to_dict() == tiny


def test_bench_guard_quick(tiny, tmp_path):
    out = tmp_path / "guard.json"
    done = _run("bench_guard.py", "--quick", "--cache", tiny["root"], "--json", str(out), timeout=240)
    res = json.loads(out.read_text())
    assert res["quick"] and res["signatures"] == tiny["mined"] and res["truth"] == tiny["truth"]
    assert sorted(res["triggers"] + res["missed_triggers"]) == sorted(tiny["triggers"])
    assert len(res["triggers"]) >= tiny["recovered"] >= 1

    mon = res["monitor"]
    assert mon["identical"] and mon["mismatches"] == []
    assert mon["pvs"] == tiny["mined_pvs"] and mon["hidden"] == 64
    vectors = mon["batches"] * mon["batch_size"]
    assert 0 < mon["vectors_flagged"] <= vectors and 0 <= mon["combination_only"] <= vectors - mon["vectors_flagged"]
    for key in ("ours_ms", "reference_ms", "speedup", "ours_with_combinations_ms", "speedup_with_combinations"):
        assert _positive(mon[key]), key
    assert "Identical per-PV scores, flag decisions and best-PV choices: yes" in done.stdout

    assert [p["words"] for p in res["purge"]] == [16, 64, 128]
    for p in res["purge"]:
        assert p["inputs"] == 10 and p["first_pass_disagreements"] == 0
        assert p["triggered_flagged"] >= 8, p  # every input carries a trigger the mined set covers
        for key in ("ours_passes", "ref_passes", "ours_p50_ms", "ref_p50_ms", "clean_p50_ms", "speedup_p50",
                    "speedup_mean"):
            assert _positive(p[key]), (p["words"], key)
        assert p["ours_rows"] >= p["ours_passes"] - 1  # each pass but the re-check scores at least one row
        # purged inputs had their trigger named and their clean label back
        assert p["ours_success"] >= 0.7 and p["ours_exact"] >= 0.7, p
        assert _share(p["ref_success"]) and _share(p["ref_exact"])


def test_identical_flags_compare_single_pvs_and_count_combinations_apart():
    from lmsan_serve.monitor import Monitor
    from lmsan_serve.signatures import PVRecord, SignatureSet

    bench = _load("bench_guard")
    h = 64
    pv0 = torch.ones(h)
    pv1 = torch.ones(h)
    pv1[h // 2 :] = -1  # the two PVs agree on the first half only
    sig = SignatureSet.create(torch.stack([pv0, pv1]), [PVRecord(origin="mined"), PVRecord(origin="mined")],
                              backbone_name="toy", fingerprint="0" * 64, model_type="bert", position="cls",
                              verdict="backdoored", threshold=0.8)
    # a blend: both PVs' signs where they agree, each PV's on half of the rest -> 0.75 against
    # each PV alone, 1.0 against the pair: flagged by the combination only
    blend = torch.ones(h)
    blend[h // 2 : 3 * h // 4] = -1
    x = torch.stack([blend, pv1 * 0.5, -pv0])  # a blend, a single PV, a clean-looking output
    single, deployed = Monitor(sig, combinations=False), Monitor(sig)
    assert deployed.combos == [(0, 1)]
    mismatches, flagged, combo_only = bench.compare_monitors(single, deployed, x, "toy")
    assert mismatches == [] and flagged == 1 and combo_only == 1
    # compared as a whole with the reference, the deployed monitor disagrees on the blend: that is
    # what the old check did, and why it had to go
    ref_flags, _, _ = bench.reference_monitor(x, single.pvs, single.thresholds)
    assert deployed(x).flagged.tolist() != ref_flags


@pytest.mark.slow  # Ray start-up and shutdown dominate: about a minute on 2 cores
def test_bench_serve_quick(tiny, tmp_path):
    out = tmp_path / "serve.json"
    _run("bench_serve.py", "--quick", "--cache", tiny["root"], "--json", str(out), timeout=300)
    res = json.loads(out.read_text())
    assert res["signatures"] == tiny["mined"] and res["errors"] == 0
    phases = res["phases"]
    assert list(phases) == list(res["requests_sent"])
    for name, p in phases.items():
        assert p["errors"] == 0 and p["requests"] == res["requests_sent"][name], name
        assert _positive(p["p50_ms"]) and p["p99_ms"] >= p["p50_ms"], name
    assert phases["clean, mode off"]["requests"] == 40 and phases["triggered, enforce"]["requests"] == 16
    triggered = phases["triggered, enforce"]["requests"] + phases["mixed: triggered"]["requests"]
    assert res["triggered_purged"] == f"{triggered}/{triggered}"  # purged, trigger named
    assert phases["triggered, enforce"]["flagged"] == 16 and phases["clean, mode off"]["flagged"] == 0
    for key in ("throughput_ratio", "throughput_ratio_median_round", "p50_ratio_enforce_vs_off",
                "triggered_vs_clean_p50", "mixed_triggered_vs_clean_p50", "mixed_rps"):
        assert _positive(res[key]), key
    assert len(res["throughput_ratio_rounds"]) == 2
    clean_enforce = sum(phases[n]["requests"] for n in ("clean, mode enforce", "clean, enforce (reference)",
                                                         "mixed: clean"))
    assert res["false_flags"] <= 0.1 * clean_enforce


def test_bench_probe_quick(tiny, tmp_path):
    out = tmp_path / "probe.json"
    _run("bench_probe.py", "--quick", "--cache", tiny["root"], "--json", str(out), timeout=120)
    res = json.loads(out.read_text())
    assert res["signatures"] == tiny["mined"] and res["sentences"] == 96
    assert res["batches"] == 2 * math.ceil(96 / 8)
    assert set(res["seconds"]) == {"off", "enforce", "enforce, no probe"}
    assert all(_positive(s) for s in res["seconds"].values())
    assert _positive(res["ratio_with_probe"]) and _positive(res["ratio_without_probe"])
    assert 0 <= res["probe_passes"] <= 2 * res["batches"]


def test_bench_false_flags_quick(tiny, tmp_path):
    out = tmp_path / "false-flags.json"
    _run("bench_false_flags.py", "--quick", "--cache", tiny["root"], "--json", str(out), timeout=120)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["task"], r["calibration_inputs"], r["method"]) for r in rows] == [
        (task, n, m) for task in ("sms_spam", "ag_news") for n, m in ((0, "-"), (100, "held-out"), (100, "exact"))
    ]
    for r in rows:
        assert r["test_inputs"] == 200 and 0 <= r["holding_trigger"] <= r["flagged"] <= 200
        assert r["false_flags"] == r["flagged"] / 200
        assert r["false_flags_without"] == (r["flagged"] - r["holding_trigger"]) / 200
        if r["calibration_inputs"]:
            assert _share(r["flagged_on_them"]) and r["combinations_off"] >= 0
            assert (r["fpr_bound"] is not None) == (r["method"] == "held-out")
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    for none, *calibrated in by_task.values():
        # calibration only ever raises thresholds: it cannot add a false flag
        assert all(r["flagged"] <= none["flagged"] for r in calibrated)


def test_probe_opposites_quick(tiny, tmp_path):
    out = tmp_path / "opposites.json"
    _run("probe_opposites.py", "--quick", "--cache", tiny["root"], "--json", str(out), timeout=120)
    res = json.loads(out.read_text())
    assert res["config"] == tiny["mining"]
    rows = res["rows"]
    assert [r["target"] for r in rows] == [f"opposite of kept PV {i}" for i in range(tiny["mined_pvs"])] + [
        "control: random signs"]
    cfg = res["config"]
    for r in rows:
        assert _positive(r["dispersion"]) and _share(r["self_agreement"]), r
        for key in ("nearest_planted_agreement", "target_agreement", "nearest_kept_agreement"):
            assert _share(r[key]), (r["target"], key)
        assert r["passes"] == (r["dispersion"] <= cfg["max_dispersion"]
                               and r["self_agreement"] >= cfg["min_self_agreement"])
        assert r["nearest_planted"].startswith("pv")
    # all six POR triggers are planted in opposite pairs, so the opposite of every recovered PV is a
    # planted PV too; the control's random signs are not
    assert sum(r["target_planted_agreement"] >= 0.9 for r in rows[:-1]) >= tiny["recovered"]
    assert rows[-1]["target_planted_agreement"] < 0.9


def test_quick_refuses_artifacts_of_its_own():
    for name in ("bench_guard", "bench_serve", "bench_probe", "bench_false_flags", "bench_endpoint"):
        module = _load(name)
        with pytest.raises(SystemExit) as exc:
            module.parse_args(["--quick", "--signatures", "x.safetensors"])
        assert exc.value.code == 2, name
        with pytest.raises(SystemExit):
            module.parse_args(["--cache", "somewhere"])  # --cache without --quick


@pytest.mark.slow  # Ray start-up and shutdown dominate
def test_bench_endpoint_quick(tiny, tmp_path):
    """The endpoint-against-forward benchmark runs end to end: every point of its curve answered
    every request, and its ratios are real numbers."""
    out = tmp_path / "endpoint.json"
    _run("bench_endpoint.py", "--quick", "--cache", tiny["root"], "--replica-cpus", "1,2", "--json", str(out),
         timeout=300)
    res = json.loads(out.read_text())
    assert res["quick"] and res["signatures"] == tiny["mined"] and res["replica_cpus"] == 2
    assert [r["replica_cpus"] for r in res["runs"]] == [1, 2]
    for run in res["runs"]:
        assert [(p["size"], p["clients"], p["task"]) for p in run["curve"]] == [
            (size, 2, task) for size in (1, 8) for task in ("sst2", "sst2-off")]
        for p in run["curve"]:
            assert p["errors"] == 0 and p["requests"] >= 2 and _positive(p["inputs_per_s"]) and _positive(p["p50_ms"])
    for key in ("forward_inputs_per_s", "endpoint_vs_forward", "idle_vs_forward_one"):
        assert _positive(res[key]), key
