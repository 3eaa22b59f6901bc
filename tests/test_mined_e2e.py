"""The defender's path end to end, through the CLI, with what mining found and nothing planted:
`lmsan mine --mode search` on the tiny POR copy, then `lmsan classify` with the mined file on
held-out sentences the victim prompt never saw, clean and with each trigger. The planted PVs
(`truth.safetensors`) only score how many PVs mining recovered."""

from __future__ import annotations

import json
import random

import pytest

from lmsan_lab.attacks import AttackConfig
from lmsan_serve import load_backbone
from lmsan_serve.cli import main
from lmsan_serve.data import insert_trigger
from lmsan_serve.mining import RECOVERED, recovered
from lmsan_serve.monitor import sign_agreement
from lmsan_serve.signatures import SignatureSet

from .conftest import TINY_TRIGGERS, plant_fit_backdoor
from .toy import toy_test

# A planted PV counts as recovered when a mined PV agrees with it in sign `mining.RECOVERED` (0.9):
# the monitor's 0.8 threshold then separates its triggered outputs (about 1.0) from clean ones (0.5).
# The mined file is conftest's `tiny_por_mined`, the set the serving and soak tests serve too.


@pytest.fixture(scope="module")
def mined(tiny_por_mined) -> tuple[object, SignatureSet]:
    return tiny_por_mined.path, SignatureSet.load(tiny_por_mined.path)


def _classify(tiny_por, prompt, signatures, texts: list[str], mode: str, tmp_path, capsys) -> list[dict]:
    data = tmp_path / f"inputs-{mode}.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    capsys.readouterr()
    code = main(["classify", "--model", str(tiny_por), "--prompt", str(prompt), "--signatures", str(signatures),
                 "--input", str(data), "--mode", mode, "--device", "cpu", "--json", "--quiet"])
    assert code == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_search_stops_by_its_rule_with_most_planted_pvs(tiny_por, mined):
    """The search was ended by its stopping rule, not by the round bound, with at least 2 of the 3
    planted PVs recovered, each by a mined PV that agrees >= 0.9 in sign with it; the file says
    backdoored and every kept PV is calibrated. Not every PV: which ones search finds on this copy
    depends on the CPU's float rounding (3 of 3 with AVX-512 kernels, 2 of 3 with ATEN_CPU_CAPABILITY
    default or avx2, the rule ending each search), and finding every PV is the open part of the
    miner's issue; asserting it would make the test pass on one CPU and fail on another."""
    _, sig = mined
    truth = SignatureSet.load(tiny_por / "truth.safetensors")
    assert sig.meta.verdict == "backdoored"
    stop = sig.meta.mining["stop"]
    assert stop["reason"] == "exhausted" and stop["rounds_since_last_pv"] >= stop["patience"], stop
    best = sign_agreement(truth.pvs, sig.pvs).max(dim=1).values
    assert recovered(truth.pvs, sig.pvs) >= 2, best.tolist()
    # The control of the aimed rounds: no two of this copy's planted PVs are opposites, so every
    # round aimed at a kept PV's opposite aims where nothing is planted, and the filters must keep
    # none of them (one per PV fuzz rounds kept)
    fuzz_kept = [r for r in sig.meta.pvs if r.seed >= 0]
    assert float(sign_agreement(truth.pvs, -truth.pvs).max()) < RECOVERED
    assert stop["probes"] >= len(fuzz_kept) >= 2 and stop["probe_pvs"] == 0, stop
    assert all(r.origin == "mined" and r.threshold is not None for r in sig.meta.pvs)


def test_the_mined_file_guards_held_out_inputs(tiny_por, tiny_por_prompt, mined, tmp_path, capsys):
    """Unguarded, the triggers flip what the victim gets right. Guarded with the mined file, no
    input with a trigger whose PV mining recovered gets through, and no clean held-out input is
    flagged. A trigger whose PV search missed is reported, not asserted: finding every PV is the
    miner's open problem, and this test must not hide it behind the planted answer key."""
    path, sig = mined
    truth = SignatureSet.load(tiny_por / "truth.safetensors")
    best = sign_agreement(truth.pvs, sig.pvs).max(dim=1).values
    found = [r.trigger for r, b in zip(truth.meta.pvs, best.tolist(), strict=True) if b >= RECOVERED]
    test = toy_test()
    clean = _classify(tiny_por, tiny_por_prompt, path, [e.text for e in test], "enforce", tmp_path, capsys)
    right = [e for e, r in zip(test, clean, strict=True) if r["label"] == e.label]
    rng = random.Random(0)
    attacked = [(e, t, insert_trigger(e.text, t, rng)) for e in right for t in TINY_TRIGGERS]
    texts = [a for _, _, a in attacked]
    off = _classify(tiny_por, tiny_por_prompt, path, texts, "off", tmp_path, capsys)
    on = _classify(tiny_por, tiny_por_prompt, path, texts, "enforce", tmp_path, capsys)
    flipped = sum(r["label"] != e.label for (e, _, _), r in zip(attacked, off, strict=True))
    beaten = {t: [a for (e, u, a), r in zip(attacked, on, strict=True) if u == t and r["label"] not in (None, e.label)]
              for t in TINY_TRIGGERS}
    print({t: len(b) for t, b in beaten.items()}, "recovered:", found)
    # Each trigger drives its inputs to one label, so it flips the other half: a third of the
    # (input, trigger) pairs flipped shows the triggers work and leaves the guard 40-odd to stop.
    assert flipped >= len(attacked) / 3, flipped
    for t in found:
        assert beaten[t] == [], (t, beaten[t][:5])  # none of 40-odd: under the 1% the issue bounds ASR to
    assert not any(r["guard"]["flagged"] for r in clean)
    assert sum(e.label == r["label"] for e, r in zip(test, clean, strict=True)) == len(right)


@pytest.fixture(scope="module")
def tiny_btop(tmp_path_factory, tiny_backbone, corpus):
    """A BToP backdoor at the [MASK] output of the tiny BERT, one trigger (it converges in a fraction of
    the steps three take)."""
    config = AttackConfig(kind="btop", triggers=TINY_TRIGGERS[:1], steps=400, lr=2e-3, target_agreement=0.97,
                          max_words=24, check_every=20)
    return plant_fit_backdoor(tiny_backbone, config, corpus, tmp_path_factory.mktemp("tiny-btop"))


def test_a_mask_backdoor_is_found_at_mask_with_no_position_told(tiny_btop, tmp_path, capsys):
    """Search with no position told covers [CLS], the pooler and [MASK], each to its own stopping
    rule; the planted [MASK] PV is among the file's PVs, and its record says it was found at [MASK]
    (what the guard watches it at). The patience is short to keep the suite quick: this copy's
    [MASK] rounds reach the PV within the first few seeds, and the round bound is only a backstop."""
    truth = SignatureSet.load(tiny_btop / "truth.safetensors")
    assert truth.positions == ["mask"]
    out = tmp_path / "sig.safetensors"
    capsys.readouterr()
    assert main(["mine", "--model", str(tiny_btop), "--out", str(out), "--mode", "search", "--max-rounds", "16",
                 "--patience", "8", "--no-probes", "--lines", "96", "--device", "cpu", "--json", "--quiet"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(last["positions"]) == ["cls", "pooler", "mask"] and last["verdict"] == "backdoored"
    assert all(r["rounds"] >= 1 for r in last["positions"].values())
    sig = SignatureSet.load(out)
    assert last["pv_positions"] == [r.position for r in sig.meta.pvs] == sig.pv_positions
    assert last["pvs"] == sum(r["pvs"] for r in last["positions"].values()) == len(sig)
    at_mask = [i for i, p in enumerate(sig.pv_positions) if p == "mask"]
    assert at_mask and "mask" in sig.positions, last["positions"]
    best = sign_agreement(sig.pvs[at_mask], truth.pvs).max()
    assert float(best) >= RECOVERED, float(best)
    # The pooler reads [CLS]: its search starts from the pooler image of every [CLS] PV and keeps
    # none of them again (modes.search, `prior`)
    cls_pvs = [i for i, p in enumerate(sig.pv_positions) if p == "cls"]
    assert last["positions"]["pooler"].get("seen_through_cls", 0) == len(cls_pvs)
    at_pooler = [i for i, p in enumerate(sig.pv_positions) if p == "pooler"]
    if cls_pvs and at_pooler:
        backbone = load_backbone(str(tiny_btop), "cpu")
        images = backbone.model.pooler(sig.pvs[cls_pvs][:, None, :])
        assert float(sign_agreement(sig.pvs[at_pooler], images).max()) < 0.9
    # What the other positions found is reported, not asserted: on this 2-layer copy the trigger also
    # moves [CLS] (a PV there agrees with the [MASK] one), which the guard then watches at [CLS] too.
    print({p: r["pvs"] for p, r in last["positions"].items()},
          sign_agreement(sig.pvs, truth.pvs).max(dim=1).values.tolist() if len(sig) else [])
