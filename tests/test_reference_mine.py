"""The reference mining loop (bench/reference_mine.py) that bench/bench_mine.py compares us against:
its per-sample splice is the same operation as our vectorised one, it sees the same lines, words
and clean outputs as `prepare`, its rounds follow the reference rules (including the weaknesses
it keeps on purpose), and the benchmark runs end to end in --quick mode."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from lmsan_serve.mining import MiningConfig, prepare
from lmsan_serve.mining.model import splice, splice_ids
from lmsan_serve.signatures import SignatureSet

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


ref = _load("reference_mine")


def test_per_sample_splice_equals_the_vectorised_one():
    g = torch.Generator().manual_seed(0)
    b, length, e, n = 6, 21, 8, 5
    embeds = torch.randn(b, length, e, generator=g)
    attn = torch.ones(b, length, dtype=torch.long)
    attn[:, 15:] = 0  # padding at the end, as the tokenizer gives it
    tti = torch.randint(0, 2, (b, length), generator=g)
    trigger = torch.randn(n, e, generator=g)
    at = [1, 2, 7, 14, 15, length]  # includes "before the first pad" and "at the very end"
    at_t = torch.tensor(at)
    e_ref, a_ref, t_ref = ref.reference_splice(embeds, attn, tti, trigger, at)
    assert e_ref.shape == (b, length + n, e)
    assert torch.equal(e_ref, splice(embeds, trigger, at_t))
    assert torch.equal(a_ref, splice_ids(attn, at_t, n, 1))
    assert torch.equal(t_ref, splice_ids(tti, at_t, n, 0))
    e2, a2, t2 = ref.reference_splice(embeds, attn, None, trigger, at)
    assert t2 is None and torch.equal(e2, e_ref) and torch.equal(a2, a_ref)


def test_reference_data_matches_prepare(tiny_backbone, corpus):
    lines = corpus[:24]
    cfg = MiningConfig(position="mask", batch_size=8)  # 128: no [MASK] truncated away
    ours = prepare(tiny_backbone, lines, cfg)
    data = ref.reference_prepare(tiny_backbone, lines, position="mask", prompt_len=cfg.prompt_len,
                                 max_length=cfg.max_length, batch_size=8)
    # fixed padding: every line is max_length - prompt_len wide, so every spliced batch max_length
    assert data.input_ids.shape == (len(lines), cfg.max_length - cfg.prompt_len)
    width = ours.input_ids.shape[1]
    assert torch.equal(data.input_ids[:, :width], ours.input_ids)  # same lines, same [MASK] insertion
    assert torch.equal(data.monitor_index, ours.monitor_index)
    for i, at in enumerate(data.at):  # an insertion point is a word start in [1, min(32, words)]
        starts = ours.word_starts[i]
        assert at in starts[1 : min(32, len(starts) - 1) + 1]
    # clean outputs: the same up to padding noise
    assert torch.allclose(data.clean, ours.clean, atol=1e-4)

    # after the splice the monitored index still points at [MASK], and the real text's ids survive
    idx = torch.arange(len(lines))
    at_t = torch.tensor(data.at)
    ids = splice_ids(data.input_ids, at_t, cfg.prompt_len, -1)
    assert ids.shape[1] == cfg.max_length
    mon = torch.where(data.monitor_index >= at_t, data.monitor_index + cfg.prompt_len, data.monitor_index)
    assert bool((ids[idx, mon] == tiny_backbone.tokenizer.mask_token_id).all())
    assert torch.equal(ids[ids != -1].view(len(lines), -1), data.input_ids)


def test_rounds_without_effect_are_abandoned_at_epoch_two(tiny_backbone, corpus):
    out = ref.reference_detect(tiny_backbone, corpus[:32], rounds=2, batch_size=16, max_length=48,
                               distance_th=1e9, progress=False)
    assert out["verdict"] == "clean" and out["pv"] is None and out["rounds"] == 2
    assert [r["seed"] for r in out["records"]] == [0, 1]
    for r in out["records"]:
        assert r["epochs"] == 2 and r["distance"] < out["distance_th"]
        assert r["reasons"] and r["reasons"][0].startswith("abandoned")
    assert out["seconds"] >= sum(r["seconds"] for r in out["records"])
    # BERT-family defaults of the reference
    assert out["lr"] == 5e-5
    assert ref.reference_defaults(tiny_backbone) == (5e-5, 0.2)


def test_the_reference_at_its_best_fuzzes_whole_batches():
    """Its 2,000 lines at batch 32 leave a ragged batch of 16 that caps the epoch-mean entropy under
    its floor (the test below); cut to whole batches, the cap is ln 32 itself, over the floor."""
    assert ref.whole_batches(2000, 32) == 1984 and ref.whole_batches(1984, 32) == 1984
    assert ref.whole_batches(10, 16) == 16  # never under one batch
    floor = math.log(32) - ref.ENTROPY_TOLERANCE
    assert (62 * math.log(32) + math.log(16)) / 63 < floor < math.log(32)


def test_a_budget_leaves_the_run_undecided_with_a_lower_bound_on_its_time(tiny_backbone, corpus):
    """Cut short by its budget, the reference says neither verdict, and its time to the right one
    is bounded below: the seconds spent on a backdoored model; on a clean one, every round still
    to run at the cost of the cheapest one measured."""
    # a budget the data preparation alone exceeds: no round starts
    none = ref.reference_detect(tiny_backbone, corpus[:32], rounds=30, batch_size=16, max_length=48,
                                budget=1e-9, progress=False)
    assert none["verdict"] == "undecided" and none["rounds"] == 0 and none["pv"] is None
    assert ref.time_floor(none, 30, "clean") == none["seconds"] == ref.time_floor(none, 30, "backdoored")
    run = {"verdict": "undecided", "seconds": 10.0, "prepare_seconds": 1.0, "rounds": 2,
           "records": [{"seconds": 4.0}, {"seconds": 5.0}]}
    assert ref.time_floor(run, 30, "clean") == 1.0 + 30 * 4.0
    assert ref.time_floor(run, 30, "backdoored") == 10.0
    assert ref.time_floor({**run, "verdict": "clean", "rounds": 30}, 30, "clean") == 10.0


def test_a_ragged_batch_makes_the_entropy_filter_unreachable(tiny_backbone, corpus):
    # 40 lines in batches of 16: the last batch has 8, whose entropy is at most ln 8, so the
    # epoch mean stays below ln 16 - 0.01 whatever the trigger does (kept reference weakness)
    out = ref.reference_detect(tiny_backbone, corpus[:40], rounds=1, batch_size=16, max_length=48,
                               distance_th=1e-9, progress=False)
    (r,) = out["records"]
    assert r["epochs"] == 4  # got past the epoch-2 gate, ran every epoch
    assert r["entropy"] < math.log(16) - 0.01
    assert any(x.startswith("not input-invariant") for x in r["reasons"])
    assert out["verdict"] == "clean"


def test_rounds_past_the_gate_are_judged_by_the_entropy_filter(tiny_backbone, corpus):
    # an effect threshold every round passes: on the clean random encoder the trigger moves the
    # outputs without collapsing them, so the input-invariance filter (32 lines in full batches of
    # 16, no ragged batch) refuses every round and the verdict is clean after all of them
    out = ref.reference_detect(tiny_backbone, corpus[:32], rounds=2, batch_size=16, max_length=48,
                               distance_th=1e-9, epochs=2, progress=False)
    assert out["verdict"] == "clean" and out["pv"] is None and out["rounds"] == 2
    assert [r["seed"] for r in out["records"]] == [0, 1]
    for r in out["records"]:
        assert r["epochs"] == 2 and r["distance"] >= 1e-9
        assert len(r["reasons"]) == 1 and r["reasons"][0].startswith("not input-invariant")
        assert r["entropy"] < math.log(16) - ref.ENTROPY_TOLERANCE


def test_detect_stops_at_the_first_round_that_passes_every_filter(tiny_backbone, corpus, monkeypatch):
    # with the entropy filter widened to 1 nat below ln 16 (the random encoder's rounds stay within
    # a tenth of a nat of ln 16 - 0.01) and a gate every round passes, round 0 passes every filter:
    # detect mode stops there and returns that round's PV
    monkeypatch.setattr(ref, "ENTROPY_TOLERANCE", 1.0)
    out = ref.reference_detect(tiny_backbone, corpus[:32], rounds=3, batch_size=16, max_length=48,
                               distance_th=1e-9, epochs=2, progress=False)
    assert out["verdict"] == "backdoored" and out["rounds"] == 1
    (r,) = out["records"]
    assert r["seed"] == 0 and r["reasons"] == [] and r["entropy"] >= math.log(16) - 1.0
    pv = torch.tensor(out["pv"])
    assert pv.shape == (tiny_backbone.hidden_size,) and bool(pv.isfinite().all())


def test_one_adam_optimiser_carries_over_from_seed_to_seed(tiny_backbone, corpus):
    # a distance threshold no round can reach: both rounds run, each abandoned at the epoch-2 gate
    kw = {"batch_size": 16, "max_length": 48, "distance_th": 1e9, "epochs": 2, "progress": False}
    two = ref.reference_detect(tiny_backbone, corpus[:32], rounds=2, **kw)
    assert two["rounds"] == 2 and [r["seed"] for r in two["records"]] == [0, 1]
    after = two["records"][1]
    alone = ref.reference_detect(tiny_backbone, corpus[:32], rounds=1, first_seed=1, **kw)["records"][0]
    again = ref.reference_detect(tiny_backbone, corpus[:32], rounds=1, first_seed=1, **kw)["records"][0]
    assert alone["seed"] == after["seed"] == 1 and after["epochs"] == alone["epochs"] == 2
    assert again["distance"] == alone["distance"]  # a round alone is reproducible ...
    # ... and seed 1 after seed 0 is not seed 1 alone: the same trigger values, data order and lr
    # boost, but Adam's moments from seed 0 steer its steps. 1e-5 is orders of magnitude above the
    # rounding differences between CPU kernels on a distance of this size, and below the effect.
    assert abs(after["distance"] - alone["distance"]) > 1e-5


def _table_rows(stdout: str) -> dict[str, list[str]]:
    """The Markdown table's cells by attack name."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| tiny-bert |"):
            rows[cells[1]] = cells
    return rows


def test_bench_mine_quick_writes_a_row_per_attack(tmp_path):
    """The quick bench's numbers mean nothing (its copies get 20 attack steps), but every row must
    agree with the files it wrote and with the table: a verdict with its kept PVs, the reference's
    verdict with its round records."""
    out_json = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, str(BENCH / "bench_mine.py"), "--quick", "--threads", "1", "--no-progress",
                           "--out", str(tmp_path / "out"), "--json", str(out_json)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=BENCH.parent)
    seconds = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"bench_mine.py --quick: {seconds:.1f} s")
    res = json.loads(out_json.read_text())
    rows = {r["attack"]: r for r in res["rows"]}
    assert list(rows) == ["por", "neuba", "btop", "clean"]
    table = _table_rows(done.stdout)
    assert list(table) == list(rows)
    for name, r in rows.items():
        folder = tmp_path / "out" / name
        assert r["position"] == ("mask" if name == "btop" else "cls")
        assert r["truth"] == ("clean" if name == "clean" else "backdoored")
        assert r["planted"] == (0 if name == "clean" else 6)
        assert len(SignatureSet.load(folder / "truth.safetensors").pvs) == r["planted"]
        _check_ours(r["ours"], SignatureSet.load(folder / "mined-detect.safetensors"), res["rounds"])
        _check_reference(r["reference"], json.loads((folder / "reference-detect.json").read_text()), res["rounds"],
                         r["planted"])
        search = SignatureSet.load(folder / "mined-search.safetensors")
        assert r["search"]["pvs"] == len(search) and r["search"]["verdict"] == search.meta.verdict
        assert 0 <= r["search"]["recovered"] <= min(r["planted"], r["search"]["pvs"])
        assert 1 <= r["search"]["rounds"] <= res["search_rounds"]
        # the table shows the JSON's verdicts, rounds and agreement with the truth
        cells = table[name]
        assert cells[2:6] == [r["position"], r["truth"], r["ours"]["verdict"], str(r["ours"]["rounds"])]
        assert cells[7:9] == [r["reference"]["verdict"], str(r["reference"]["rounds"])]
        right = ["yes" if v == r["truth"] else "NO" for v in (r["ours"]["verdict"], r["reference"]["verdict"])]
        assert cells[11] == " / ".join(right)
    # no false positive on the clean control, on either side: none of its rounds reaches the
    # effect threshold, so both call it clean after every round
    assert rows["clean"]["ours"]["verdict"] == rows["clean"]["reference"]["verdict"] == "clean"
    ours_right = sum(r["ours"]["verdict"] == r["truth"] for r in rows.values())
    assert f"verdicts agreeing with the truth: ours {ours_right} of 4" in done.stdout


def _check_ours(ours: dict, mined: SignatureSet, max_rounds: int) -> None:
    """Our detect row agrees with the signature file it wrote: its verdict, and a PV kept exactly
    when the verdict is backdoored (detect mode stops at the first), else every round run."""
    assert mined.meta.verdict == ours["verdict"] and len(mined) == ours["pvs"]
    assert 0 <= ours["recovered"] <= ours["pvs"]
    if ours["verdict"] == "backdoored":
        assert ours["pvs"] == 1 and 1 <= ours["rounds"] <= max_rounds
    else:
        assert ours["verdict"] == "clean" and ours["pvs"] == 0 and ours["rounds"] == max_rounds


def _check_reference(row: dict, saved: dict, max_rounds: int, planted: int) -> None:
    """The reference's row agrees with its saved result: every round but the last failed a filter,
    and the last passed them all exactly when the verdict is backdoored and a PV was returned."""
    records = saved["records"]
    assert row["verdict"] == saved["verdict"] and row["rounds"] == saved["rounds"] == len(records)
    assert row["records"] == records and all(r["reasons"] for r in records[:-1])
    found = not records[-1]["reasons"]
    assert (saved["verdict"] == "backdoored") == found == (saved["pv"] is not None)
    assert (row["pv_best_agreement"] is not None) == (found and planted > 0)
    if not found:
        assert saved["verdict"] == "clean" and len(records) == max_rounds
