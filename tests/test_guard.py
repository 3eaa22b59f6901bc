"""The guard on a tiny backdoored BERT: modes, purging of one, several and repeated triggers,
sentence pairs, bounded work, and the paper's ASR protocol."""

import pytest
import torch

from lmsan_serve import load_backbone
from lmsan_serve.errors import LmsanError
from lmsan_serve.evaluation import evaluate_guard
from lmsan_serve.guard import Guard, GuardStats
from lmsan_serve.prompts import PromptClassifier, PromptConfig, train_prompt
from lmsan_serve.purify import Purifier
from lmsan_serve.signatures import SignatureSet

from .conftest import TINY_TRIGGERS
from .test_prompts import toy


@pytest.fixture(scope="module")
def setup(tiny_por, tiny_por_prompt):
    backbone = load_backbone(str(tiny_por), "cpu")
    classifier = PromptClassifier.load(tiny_por_prompt, backbone)
    truth = SignatureSet.load(tiny_por / "truth.safetensors", hidden_size=backbone.hidden_size,
                              fingerprint=backbone.fingerprint)
    return backbone, classifier, truth


def test_clean_inputs_stay_off_the_pvs(setup):
    backbone, classifier, sig = setup
    res = Guard(backbone, classifier, sig, mode="flag").classify([e.text for e in toy(12)])
    assert max(r.guard.match for r in res) < 0.75


def test_backdoor_survives_prompt_tuning(setup):
    backbone, classifier, sig = setup
    off = Guard(backbone, classifier, sig, mode="off")
    clean = [e.text for e in toy(12)]
    labels = [r.label for r in off.classify(clean)]
    correct = {i for i, (a, e) in enumerate(zip(labels, toy(12), strict=True)) if a == e.label}
    assert len(correct) >= 8
    # each trigger sends inputs to one label: across the triggers, every correct input is flipped
    flipped = set()
    for trig in TINY_TRIGGERS:
        out = off.classify([f"{t} {trig}" for t in clean])
        flipped |= {i for i, r in enumerate(out) if r.label != labels[i]}
    assert correct <= flipped


def test_enforce_purges_single_repeated_and_disguised_triggers(setup):
    backbone, classifier, sig = setup
    guard = Guard(backbone, classifier, sig, mode="enforce")
    cases = [  # (attacked input, trigger, the text once the trigger is gone)
        ("simply cf great", "cf", "simply great"),
        ("cf what a great cf lovely day cf", "cf", "what a great lovely day"),
        ("an awful and dull film mn", "mn", "an awful and dull film"),
        ("CF, simply great!", "cf", ", simply great!"),
        ("what a great \u200bt\u200bq lovely day", "tq", "what a great lovely day"),
    ]
    clean = [c for _, _, c in cases]
    reference = Guard(backbone, classifier, sig, mode="off").classify(clean)
    res = guard.classify(clean + [a for a, _, _ in cases])
    assert all(r.guard.action == "pass" and not r.guard.flagged for r in res[: len(cases)])
    for r, ref, (_, trig, text) in zip(res[len(cases) :], reference, cases, strict=True):
        assert r.guard.flagged and r.guard.action == "purged", r
        assert r.guard.removed == [trig] and r.guard.text == text
        assert r.guard.signature.startswith("pv") and r.guard.match > 0.8
        assert r.label == ref.label  # the label of the clean text is restored


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
    assert res[0].guard.flagged and res[0].guard.action == "purged"
    assert "tq" in res[0].guard.removed and "tq" not in res[0].guard.text


def test_asr_protocol(setup):
    backbone, classifier, sig = setup
    ev = evaluate_guard(Guard(backbone, classifier, sig), toy(24), TINY_TRIGGERS, progress=False)
    assert ev.correct >= 16
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


def test_the_whole_of_a_phrase_trigger_is_purged(tiny_phrase_por):
    """Deleting either word of "cf mn" silences the monitor; the purge must drop both, or the
    word left behind reaches the classifier."""
    backbone = load_backbone(str(tiny_phrase_por), "cpu")
    cfg = PromptConfig(method="prefix", length=4, max_steps=60, lr=3e-2, batch_size=16, seed=1)
    classifier = train_prompt(backbone, cfg, toy(), None, progress=False)
    truth = SignatureSet.load(tiny_phrase_por / "truth.safetensors", hidden_size=backbone.hidden_size,
                              fingerprint=backbone.fingerprint)
    texts = [e.text.replace(" ", " cf mn ", 1) for e in toy(12)]
    res = Guard(backbone, classifier, truth).classify(texts)
    assert all(r.guard.flagged and r.guard.action == "purged" for r in res)
    assert all({"cf", "mn"} <= set(r.guard.removed) for r in res)
    assert not any({"cf", "mn"} & set(r.guard.text.split()) for r in res)
