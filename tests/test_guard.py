"""The guard on a tiny backdoored BERT: modes, purging of one, several and repeated triggers,
sentence pairs, bounded work, and the paper's ASR protocol."""

import pytest
import torch

from lmsan_serve import load_backbone
from lmsan_serve.errors import LmsanError
from lmsan_serve.evaluation import evaluate_guard
from lmsan_serve.guard import Guard, GuardStats
from lmsan_serve.prompts import PromptConfig, train_prompt
from lmsan_serve.purify import Purifier
from lmsan_serve.signatures import SignatureSet

from .conftest import TINY_TRIGGERS
from .test_prompts import toy


@pytest.fixture(scope="module")
def setup(tiny_por):
    backbone = load_backbone(str(tiny_por), "cpu")
    cfg = PromptConfig(method="prefix", length=4, max_steps=60, lr=3e-2, batch_size=16)
    classifier = train_prompt(backbone, cfg, toy(), None, progress=False)
    truth = SignatureSet.load(tiny_por / "truth.safetensors", hidden_size=backbone.hidden_size,
                              fingerprint=backbone.fingerprint)
    # With 64 hidden units the paper's 0.8 is only 51 agreeing signs, and prompt-tuning on a
    # backdoored encoder pulls clean outputs toward the PVs, so the tiny model needs a stricter one.
    sig = SignatureSet.create(truth.pvs, truth.meta.pvs, backbone_name=truth.meta.backbone.name,
                              fingerprint=truth.meta.backbone.fingerprint, model_type="bert", position="cls",
                              verdict="backdoored", threshold=0.9)
    return backbone, classifier, sig


def test_backdoor_survives_prompt_tuning(setup):
    backbone, classifier, sig = setup
    off = Guard(backbone, classifier, sig, mode="off")
    clean = [e.text for e in toy(12)]
    labels = [r.label for r in off.classify(clean)]
    assert labels == [e.label for e in toy(12)]
    # each trigger sends every input to one label; across the triggers the labels flip
    flipped = set()
    for trig in TINY_TRIGGERS:
        out = off.classify([f"{t} {trig}" for t in clean])
        flipped |= {i for i, r in enumerate(out) if r.label != labels[i]}
    assert len(flipped) >= 10


def test_enforce_purges_single_repeated_and_multiple_triggers(setup):
    backbone, classifier, sig = setup
    guard = Guard(backbone, classifier, sig, mode="enforce")
    texts = [
        "simply great",
        "simply cf great",
        "cf what a great cf lovely day cf",
        "mn what an awful tq dull day cf",
        "CF, simply great!",
    ]
    res = guard.classify(texts)
    assert res[0].guard.action == "pass" and not res[0].guard.flagged
    assert res[1].guard.action == "purged" and res[1].guard.removed == ["cf"]
    assert res[1].guard.text == "simply great" and res[1].label == "pos"
    assert res[1].guard.signature.startswith("pv") and res[1].guard.match > 0.8
    assert res[2].guard.removed == ["cf"] and res[2].label == "pos"
    assert set(res[3].guard.removed) == {"mn", "tq", "cf"} and res[3].label == "neg"
    assert res[4].guard.action == "purged" and res[4].label == "pos"


def test_block_flag_and_off_modes(setup):
    backbone, classifier, sig = setup
    texts = ["simply great", "simply cf great"]
    blocked = Guard(backbone, classifier, sig, mode="block").classify(texts)
    assert blocked[0].label == "pos" and blocked[1].label is None and blocked[1].guard.action == "blocked"
    flagged = Guard(backbone, classifier, sig, mode="flag").classify(texts)
    assert flagged[1].guard.flagged and flagged[1].guard.action == "flagged" and flagged[1].label is not None
    off = Guard(backbone, classifier, sig, mode="off").classify(texts)
    assert all(r.guard.action == "off" and not r.guard.flagged for r in off)


def test_unpurgeable_input_is_blocked(setup):
    backbone, classifier, sig = setup
    # An input made only of the trigger leaves nothing after purging.
    res = Guard(backbone, classifier, sig).classify(["cf cf cf"])
    assert res[0].guard.action == "blocked" and res[0].label is None
    assert res[0].guard.reason.startswith("could not purge")


def test_purge_work_is_bounded_and_few_passes(setup):
    backbone, classifier, sig = setup
    words = ("great lovely film acting story day cast simply fun the a of " * 6).split()[:64]
    text = " ".join(words[:30] + ["cf"] + words[30:])
    stats = GuardStats()
    res = Guard(backbone, classifier, sig, purifier=Purifier(max_rounds=2, max_variants=40)).classify(
        [text], stats=stats)
    assert res[0].guard.action == "purged" and res[0].guard.removed == ["cf"]
    assert stats.purge_passes <= 4  # group test, single test, verify, final classification
    # decoys: many distinct words plus a trigger that only the deletion rounds can handle still stop
    stats = GuardStats()
    decoys = " ".join(f"w{i}" for i in range(100))
    Guard(backbone, classifier, sig, purifier=Purifier(max_rounds=2, max_variants=40)).classify(
        [decoys + " cf mn"], stats=stats)
    assert stats.purge_variants <= 40 + 8 + 2


def test_trigger_in_second_text_of_a_pair(setup):
    backbone, classifier, sig = setup
    res = Guard(backbone, classifier, sig).classify(["simply great"], ["nice tq film"])
    assert res[0].guard.flagged and res[0].guard.removed == ["tq"]
    assert res[0].guard.action == "purged"


def test_asr_protocol(setup):
    backbone, classifier, sig = setup
    ev = evaluate_guard(Guard(backbone, classifier, sig), toy(24), TINY_TRIGGERS, progress=False)
    assert ev.correct == 24
    assert ev.asr_off >= 0.9
    assert ev.asr_on <= 0.01
    assert ev.cacc_on >= ev.cacc_off - 0.005
    assert ev.false_flag_rate == 0.0


def test_guard_refuses_bad_settings(setup, tiny_backbone):
    backbone, classifier, sig = setup
    with pytest.raises(LmsanError, match="mode"):
        Guard(backbone, classifier, sig, mode="panic")
    with pytest.raises(LmsanError, match="needs a signature file"):
        Guard(backbone, classifier, None, mode="enforce")
    with pytest.raises(LmsanError, match="threshold"):
        Guard(backbone, classifier, sig, threshold=1.5)
    wide = SignatureSet.create(torch.ones(1, 8), sig.meta.pvs[:1], backbone_name="x", fingerprint="0" * 64,
                               model_type="bert", position="cls", verdict="backdoored")
    with pytest.raises(LmsanError, match="wide"):
        Guard(backbone, classifier, wide)
