"""The short form of bench/bench_soak.py on the tiny backdoored BERT: sustained load, a signature
reload under load (valid, garbage, valid), and a replica killed under load with two replicas.
No request may be lost by a client that follows the documented retry policy."""

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


def test_soak_reload_and_replica_kill_lose_nothing(tmp_path, tiny_por, tiny_por_prompt):
    bench = _bench()
    res = bench.run(str(tiny_por), str(tiny_por_prompt), tiny_por / "truth.safetensors", tmp_path / "soak",
                    clients=4, soak_s=8, phase_s=6, say=lambda m: None)
    print(bench.render(res))
    soak, reload, kill = res["soak"], res["reload"], res["kill"]
    assert soak["answered"] > 20 and soak["lost"] == 0 and soak["wrong"] == 0
    assert len(soak["rss_start_mb"]) == 2 and len(soak["rss_end_mb"]) == 2
    # every replica reloaded both good files and refused the garbage while keeping its set
    assert reload["lost"] == 0 and reload["wrong"] == 0 and reload["answered"] > 10
    assert reload["reloads_ok"] >= 3 and reload["reloads_failed"] >= 1
    assert reload["loaded_during_bad_file"] and reload["last_error_during_bad_file"]
    # a killed replica costs retries, never a lost request, and comes back
    assert kill["lost"] == 0 and kill["wrong"] == 0 and kill["answered"] > 10
    assert kill["replica_back_after_s"] is not None and kill["running_replicas"] == 2
