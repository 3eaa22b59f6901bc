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

import pytest
import torch

from lmsan_serve.mining import MiningConfig, prepare
from lmsan_serve.mining.model import _splice, _splice_ids

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
    assert torch.equal(e_ref, _splice(embeds, trigger, at_t))
    assert torch.equal(a_ref, _splice_ids(attn, at_t, n, 1))
    assert torch.equal(t_ref, _splice_ids(tti, at_t, n, 0))
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
    ids = _splice_ids(data.input_ids, at_t, cfg.prompt_len, -1)
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


def test_detect_result_is_consistent_and_the_optimiser_carries_over(tiny_backbone, corpus):
    kw = {"batch_size": 16, "max_length": 48, "distance_th": 1e-9, "epochs": 2, "progress": False}
    two = ref.reference_detect(tiny_backbone, corpus[:32], rounds=2, **kw)
    recs = two["records"]
    assert 1 <= two["rounds"] == len(recs) <= 2
    assert all(r["reasons"] for r in recs[:-1])  # detect stops at the first PV
    if not recs[-1]["reasons"]:
        assert two["verdict"] == "backdoored" and len(two["pv"]) == tiny_backbone.hidden_size
    else:
        assert two["verdict"] == "clean" and two["pv"] is None and two["rounds"] == 2
    assert all(r["epochs"] == 2 and r["distance"] >= 1e-9 for r in recs)
    if two["rounds"] == 2:
        # seed 1 after seed 0 is not seed 1 alone: one Adam optimiser, its state carried across seeds
        alone = ref.reference_detect(tiny_backbone, corpus[:32], rounds=1, first_seed=1, **kw)
        assert alone["records"][0]["seed"] == recs[1]["seed"] == 1
        assert alone["records"][0]["distance"] != recs[1]["distance"]


def test_bench_mine_quick_writes_a_row_per_attack(tmp_path):
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
    for name, r in rows.items():
        assert r["position"] == ("mask" if name == "btop" else "cls")
        assert r["truth"] == ("clean" if name == "clean" else "backdoored")
        assert r["planted"] == (0 if name == "clean" else 6)
        assert r["ours"]["verdict"] in {"clean", "backdoored"} and 1 <= r["ours"]["rounds"] <= 3
        assert r["reference"]["verdict"] in {"clean", "backdoored"} and 1 <= r["reference"]["rounds"] <= 3
        assert r["time_ratio"] == pytest.approx(r["reference"]["seconds"] / r["ours"]["seconds"])
        assert r["ours_correct"] == (r["ours"]["verdict"] == r["truth"])
        assert 0 <= r["search"]["recovered"] <= r["planted"] and r["search"]["rounds"] <= 4
        folder = tmp_path / "out" / name
        for f in ("truth.safetensors", "mined-detect.safetensors", "mined-search.safetensors", "reference-detect.json"):
            assert (folder / f).is_file(), f
    assert "| por | cls | backdoored |" in done.stdout  # the Markdown table
