"""The short form of bench/bench_soak.py on the tiny backdoored BERT: sustained load, a signature
reload under load (valid, garbage, valid), and a replica killed under load with two replicas, on
the signature file mining found (conftest's `tiny_por_mined`).
No request may be lost by a client that follows the documented retry policy, and no answer may be
wrong: triggered inputs come back purged with their trigger named, clean inputs with the label the
prompt gives them unguarded, never flagged (the tiny victim prompt keeps clean text off the PVs)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_soak.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_soak", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_soak"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_soak_reload_and_replica_kill_lose_nothing(tmp_path, tiny_por, tiny_por_prompt, tiny_por_mined):
    """The endpoint serves the mined file; the triggers sent are those whose PVs it caught."""
    bench = _bench()
    res = bench.run(str(tiny_por), str(tiny_por_prompt), tiny_por_mined.path, tmp_path / "soak",
                    triggers=tiny_por_mined.caught, clients=4, soak_s=8, phase_s=6, say=lambda m: None)
    print(bench.render(res))
    soak, reload, kill = res["soak"], res["reload"], res["kill"]
    assert res["clean_pool"] >= 250  # of 300 SST-2 inputs, only near ties of the two labels are left out
    for name, phase in (("soak", soak), ("reload", reload), ("kill", kill)):
        assert phase["lost"] == 0 and phase["wrong"] == 0, (name, phase)
        assert phase["wrong_clean"] == 0 and phase["false_flags"] == 0, (name, phase)
        # 9 in 10 requests are clean: the clean answers were really checked
        assert phase["clean_answered"] >= phase["answered"] // 2, (name, phase)
    assert res["lost_total"] == res["wrong_total"] == res["false_flags_total"] == 0
    assert soak["answered"] > 20 and reload["answered"] > 10 and kill["answered"] > 10
    assert len(soak["rss_start_mb"]) == 2 and len(soak["rss_end_mb"]) == 2
    # every replica reloaded both good files and refused the garbage while keeping its set
    assert reload["reloads_ok"] >= 3 and reload["reloads_failed"] >= 1
    assert reload["loaded_during_bad_file"] and reload["last_error_during_bad_file"]
    # a killed replica costs retries, never a lost request, and comes back
    assert kill["replica_back_after_s"] is not None and kill["running_replicas"] == 2
