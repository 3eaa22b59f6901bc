"""Every benchmark's `--quick` mode, run once as its own process, and its JSON checked for the
figures the README and bench/README.md quote, with values that mean something: a benchmark that
silently stopped measuring (no input flagged, requests lost, monitors that disagree) fails here.

The quick modes share one build of the tiny artifacts (bench/tiny_artifacts.py: a tiny BERT with
a POR backdoor, a victim prompt, a signature set mined from it), made once for this module and
passed to every script with --cache. bench_all.py (`make bench`) runs the guard, probe, serve,
endpoint and mining pieces in one process: its quick run is where the serve, probe and endpoint
reports are checked (each script's own run would repeat the same code); bench_guard.py keeps a
run of its own command line. bench_mine.py and bench_soak.py have their own tests
(test_reference_mine.py, test_soak.py).
"""

from __future__ import annotations

import hashlib
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


def _check_guard(res: dict, tiny: dict, sig: str) -> None:
    """bench_guard's report on the tiny model guarded with `sig` ("mined" or "truth", the planted PVs)."""
    assert res["quick"] and res["signatures"] == tiny[sig] and res["truth"] == tiny["truth"]
    assert sorted(res["triggers"] + res["missed_triggers"]) == sorted(tiny["triggers"])
    assert len(res["triggers"]) >= (tiny["recovered"] if sig == "mined" else tiny["planted"]) >= 1

    mon = res["monitor"]
    assert mon["identical"] and mon["mismatches"] == []
    assert mon["pvs"] == (tiny["mined_pvs"] if sig == "mined" else tiny["planted"]) and mon["hidden"] == 64
    vectors = mon["batches"] * mon["batch_size"]
    assert 0 < mon["vectors_flagged"] <= vectors and 0 <= mon["combination_only"] <= vectors - mon["vectors_flagged"]
    for key in ("ours_ms", "reference_ms", "speedup", "ours_with_combinations_ms", "speedup_with_combinations"):
        assert _positive(mon[key]), key

    assert [p["words"] for p in res["purge"]] == [16, 64, 128]
    for p in res["purge"]:
        assert p["inputs"] == 10 and p["first_pass_disagreements"] == 0
        assert p["triggered_flagged"] >= 8, p  # every input carries a trigger the set covers
        for key in ("ours_passes", "ref_passes", "ref_rows", "ours_p50_ms", "ref_p50_ms", "clean_p50_ms",
                    "speedup_p50", "speedup_mean"):
            assert _positive(p[key]), (p["words"], key)
        assert p["ours_rows"] >= p["ours_passes"] - 1  # each pass but the re-check scores at least one row
        # the reference scores up to 32 deletion variants per pass, at least one in each
        assert p["ref_passes"] <= p["ref_rows"] <= 32 * p["ref_passes"]
        # purged inputs had their trigger named and their clean label back
        assert p["ours_success"] >= 0.7 and p["ours_exact"] >= 0.7, p
        assert _share(p["ref_success"]) and _share(p["ref_exact"])


def test_bench_guard_quick(tiny, tmp_path):
    """The script's own command line: its report, its JSON, the monitors' agreement line."""
    out = tmp_path / "guard.json"
    done = _run("bench_guard.py", "--quick", "--cache", tiny["root"], "--json", str(out), timeout=240)
    _check_guard(json.loads(out.read_text()), tiny, "mined")
    assert "Identical per-PV scores, flag decisions and best-PV choices: yes" in done.stdout


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


def _check_serve(res: dict, tiny: dict) -> None:
    """bench_serve's report: no request lost, every triggered one purged with its trigger named."""
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


def _check_probe(res: dict, tiny: dict, sig: str) -> None:
    """bench_probe's in-process throughput, guard enforce against off."""
    assert res["signatures"] == tiny[sig] and res["sentences"] == 96
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
    for name in ("bench_guard", "bench_serve", "bench_probe", "bench_false_flags", "bench_endpoint", "bench_all"):
        module = _load(name)
        with pytest.raises(SystemExit) as exc:
            module.parse_args(["--quick", "--signatures", "x.safetensors"])
        assert exc.value.code == 2, name
        with pytest.raises(SystemExit):
            module.parse_args(["--cache", "somewhere"])  # --cache without --quick


def test_benchmarks_serve_the_mined_set_unless_told(tmp_path):
    """A benchmark's default signature set is what mining wrote for the model; with none, it stops
    with the command that mines one (the planted PVs are served only when named)."""
    served = _load("served")
    model = tmp_path / "por"
    model.mkdir()
    with pytest.raises(served.LmsanError, match=r"lmsan mine --model .*por --mode search") as err:
        served.resolve_signatures(None, model)
    assert "truth.safetensors serves the planted PVs" in str(err.value) and "\n" not in str(err.value)
    (model / "mined.safetensors").write_bytes(b"")
    assert served.resolve_signatures(None, model) == model / "mined.safetensors"
    assert served.resolve_signatures(str(model / "truth.safetensors"), model) == model / "truth.safetensors"


def _check_endpoint(res: dict, tiny: dict) -> None:
    """The endpoint against the forward pass: every point of its curve answered every request, and
    its ratios are real numbers."""
    cpus = os.cpu_count()
    assert res["quick"] and res["signatures"] == tiny["mined"] and res["replica_cpus"] == cpus
    assert [r["replica_cpus"] for r in res["runs"]] == [cpus]  # one replica on every core, as `lmsan serve`
    for run in res["runs"]:
        assert [(p["size"], p["clients"], p["task"]) for p in run["curve"]] == [
            (size, 2, task) for size in (1, 8) for task in ("sst2", "sst2-off")]
        for p in run["curve"]:
            assert p["errors"] == 0 and p["requests"] >= 2 and _positive(p["inputs_per_s"]) and _positive(p["p50_ms"])
    for key in ("forward_inputs_per_s", "endpoint_vs_forward", "idle_vs_forward_one"):
        assert _positive(res[key]), key


HEADLINE = ("guard_throughput_ratio", "guard_throughput_ratio_in_process", "triggered_p50_ratio", "triggered_p99_ratio",
            "endpoint_vs_forward", "idle_vs_forward_one", "monitor_speedup_vs_reference")


@pytest.mark.slow  # Ray twice (endpoint, then serve) and four tiny plantings: about 2.5 minutes on 2 cores
def test_bench_all_quick(tiny, tmp_path):
    """`make bench`'s script end to end: one JSON line on stdout with every headline key a real
    number, and the file with every piece's report, each checked as its own script's was."""
    out = tmp_path / "bench.json"
    done = _run("bench_all.py", "--quick", "--cache", tiny["root"], "--json", str(out), timeout=600)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout[-2000:]  # Ray's and the pieces' output went to stderr
    line = json.loads(lines[0])
    assert line["quick"] and line["skipped"] == [] and line["failed"] == []
    for key in HEADLINE:
        assert _positive(line[key]), key
    assert set(line["purge_speedup_vs_reference_p50"]) == {"16", "64", "128"}
    assert all(_positive(x) for x in line["purge_speedup_vs_reference_p50"].values())
    mining = line["mining_speedup_vs_reference"]
    assert list(mining) == ["por", "neuba", "btop", "clean"]
    for name, m in mining.items():
        assert m["truth"] == ("clean" if name == "clean" else "backdoored")
        for key in ("time_ratio", "ours_seconds", "ours_defaults_seconds", "reference_seconds", "reference_lr"):
            assert _positive(m[key]), (name, key)
        assert {m["ours_verdict"], m["ours_defaults_verdict"], m["reference_verdict"]} <= {"backdoored", "clean"}
        assert m["time_ratio"] == pytest.approx(m["reference_seconds"] / m["ours_seconds"])
        assert m["ours_right"] == (m["ours_verdict"] == m["truth"])
        # a speed-up counts only to a right verdict (the tiny quick copies are often missed in 4 rounds)
        assert m["speedup"] == (m["time_ratio"] if m["ours_right"] else None)

    report = json.loads(out.read_text())
    assert report["headline"] == line and report["json"] == str(out)
    assert report["machine"]["cpus"] == os.cpu_count() and report["machine"]["torch"] == torch.__version__
    assert report["command"].endswith(f"--json {out}")
    for key, sig in (("mined", "mined"), ("planted", "truth")):
        assert report["signatures"][key]["path"] == tiny[sig]
        assert report["signatures"][key]["sha256"] == hashlib.sha256(Path(tiny[sig]).read_bytes()).hexdigest()
    pieces = report["pieces"]
    for sig, name in (("mined", "mined"), ("truth", "planted")):
        _check_guard(pieces["guard"][name], tiny, sig)
        _check_probe(pieces["guard"]["throughput_in_process"][name], tiny, sig)
    _check_serve(pieces["serve"], tiny)
    _check_endpoint(pieces["endpoint"], tiny)
    rows = {r["attack"]: r for r in pieces["mining"]["rows"]}
    for name, r in rows.items():
        # the reference's best point is one of its sweep, which holds the family's official lr
        assert r["reference"] in r["reference_sweep"] and any(p["official_lr"] for p in r["reference_sweep"])
        assert sorted(p["lr"] for p in r["reference_sweep"]) == sorted({5e-5, 2e-4, 4e-4})
        right = [p for p in r["reference_sweep"] if p["verdict"] == r["truth"]]
        assert r["reference"]["seconds"] == min(p["seconds"] for p in right or r["reference_sweep"])
        assert r["ours_defaults"]["same_run_as_ours"] == (r["ours_defaults"]["position"] == r["position"]), name


def test_bench_all_skips_leave_keys_null(tmp_path):
    """A skipped piece's keys are null in the line, never made up; an unknown piece is refused."""
    bench_all = _load("bench_all")
    report = {"quick": True, "skipped": ["guard", "endpoint", "serve", "mining"], "json": "x.json",
              "pieces": {"guard": None, "endpoint": None, "serve": None, "mining": {"error": "boom"}}}
    line = bench_all.headline(report)
    assert all(line[key] is None for key in (*HEADLINE, "purge_speedup_vs_reference_p50",
                                             "mining_speedup_vs_reference"))
    assert line["failed"] == ["mining"]
    with pytest.raises(SystemExit) as exc:
        bench_all.parse_args(["--skip", "guard,nonsense"])
    assert exc.value.code == 2
