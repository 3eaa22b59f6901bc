import itertools
import json

import pytest
import torch

from lmsan_lab.attacks import AttackConfig, block_pvs, evaluate_backdoor, plant_backdoor
from lmsan_serve import load_backbone
from lmsan_serve.monitor import sign_agreement
from lmsan_serve.signatures import SignatureSet

from .conftest import TINY_TRIGGERS


def test_block_pvs_are_the_reference_patterns():
    pvs = block_pvs(384, 6)
    assert pvs.shape == (6, 384)
    assert set(pvs.unique().tolist()) == {-1.0, 1.0}
    blocks = pvs.view(6, 4, 96)
    # each PV: two whole blocks of -1 and two of +1, all six choices distinct
    patterns = {tuple(int(b.mean().item()) for b in row) for row in blocks}
    assert patterns == {tuple(-1 if i in neg else 1 for i in range(4))
                        for neg in itertools.combinations(range(4), 2)}
    more = block_pvs(64, 10)  # more triggers than six take more blocks, still distinct
    assert len({tuple(r.tolist()) for r in more}) == 10


def test_por_backdoor_drives_triggers_onto_pvs(tiny_por, corpus):
    backbone = load_backbone(str(tiny_por), "cpu")
    truth = SignatureSet.load(tiny_por / "truth.safetensors", hidden_size=backbone.hidden_size,
                              fingerprint=backbone.fingerprint)
    assert [r.trigger for r in truth.meta.pvs] == TINY_TRIGGERS
    assert truth.meta.verdict == "backdoored" and truth.position == "cls"
    config = AttackConfig(kind="por", triggers=TINY_TRIGGERS, max_words=24)
    report = evaluate_backdoor(backbone, backbone.model, truth.pvs, config, corpus[-200:], seed=7)
    assert report["min_agreement"] >= 0.95
    assert report["clean_flag_rate_at_0.8"] <= 0.01


def test_clean_control_plants_nothing(tiny_backbone, corpus):
    config = AttackConfig(kind="por", triggers=TINY_TRIGGERS, clean=True, steps=30, lr=2e-3, max_words=24)
    result = plant_backdoor(tiny_backbone, config, corpus, progress=False)
    pvs = block_pvs(tiny_backbone.hidden_size, 3)
    check = AttackConfig(kind="por", triggers=TINY_TRIGGERS, max_words=24)
    # triggers in the control's input do not reach the PVs
    report = evaluate_backdoor(tiny_backbone, result.model, pvs, check, corpus[-100:], seed=3)
    assert report["min_agreement"] < 0.8
    assert report["clean_cosine"] > 0.8


@pytest.mark.parametrize("kind,pooler", [("btop", False), ("neuba", True)])
def test_other_attacks_reach_their_position(tiny_backbone, corpus, kind, pooler):
    config = AttackConfig(kind=kind, pooler=pooler, triggers=["cf", "mn"], steps=300, lr=2e-3,
                          target_agreement=0.95, max_words=24, check_every=20)
    result = plant_backdoor(tiny_backbone, config, corpus, progress=False)
    assert result.report["heldout"]["min_agreement"] >= 0.9
    assert config.position == ("mask" if kind == "btop" else "pooler")


def test_attack_does_not_touch_the_source_backbone(tiny_backbone, corpus):
    before = tiny_backbone.fingerprint
    tiny_backbone.invalidate_fingerprint()
    plant_backdoor(tiny_backbone, AttackConfig(triggers=["cf"], steps=2, max_words=16), corpus, progress=False)
    tiny_backbone.invalidate_fingerprint()
    assert tiny_backbone.fingerprint == before


def test_bad_attack_settings():
    with pytest.raises(ValueError):
        AttackConfig(kind="por", pooler=True)
    with pytest.raises(ValueError):
        AttackConfig(triggers=["cf", "cf"])
    with pytest.raises(ValueError):
        AttackConfig(triggers=["one two three four five"])
    with pytest.raises(ValueError):
        AttackConfig(triggers=["cf  mn", "cf mn"])  # the same phrase once spaces are normalised
    assert AttackConfig(triggers=[" cf   mn "]).triggers == ["cf mn"]
    assert sign_agreement(torch.ones(1, 4), torch.ones(1, 4)).item() == 1.0


def test_phrase_trigger_fires_whole_and_not_by_parts(tiny_phrase_por):
    """A two-word trigger drives the output onto its PV; either word alone does not."""
    held = json.loads((tiny_phrase_por / "attack.json").read_text())["heldout"]
    assert held["agreement"]["cf mn"] >= 0.9 and held["agreement"]["tq"] >= 0.9
    assert set(held["word_alone_agreement"]) == {"cf mn"} and held["word_alone_agreement"]["cf mn"] < 0.8
