"""The guard on a tiny backdoored BERT: modes, purging of one, several and repeated triggers,
sentence pairs, bounded work, and the paper's ASR protocol. The guard runs on what a defender has,
the signature file mined from the copy (conftest's `tiny_por_mined`), and is sent the triggers whose
PV mining recovered; the planted PVs only check the fixtures' preconditions."""

import json

import pytest
import torch

from lmsan_lab.evaluation import evaluate_guard
from lmsan_serve import load_backbone
from lmsan_serve.errors import LmsanError
from lmsan_serve.guard import Guard, GuardStats, TriggerShapes
from lmsan_serve.prompts import PromptClassifier
from lmsan_serve.purify import Purifier
from lmsan_serve.signatures import SignatureSet

from .conftest import attack_problems
from .toy import MAX_CLEAN_MATCH, MIN_ACCURACY, check_victim, toy_test


@pytest.fixture(scope="module")
def setup(tiny_por, tiny_por_prompt, tiny_por_mined):
    backbone = load_backbone(str(tiny_por), "cpu")
    classifier = PromptClassifier.load(tiny_por_prompt, backbone)
    mined = SignatureSet.load(tiny_por_mined.path, hidden_size=backbone.hidden_size,
                              fingerprint=backbone.fingerprint)
    return backbone, classifier, mined


@pytest.fixture(scope="module")
def first(tiny_por_mined) -> str:
    """A trigger whose PV mining recovered."""
    return tiny_por_mined.caught[0]


@pytest.fixture(scope="module")
def last(tiny_por_mined) -> str:
    """Another one where mining recovered two or more (the same one where it recovered one)."""
    return tiny_por_mined.caught[-1]


def test_planted_backdoors_are_fit_for_the_tests(tiny_por, tiny_phrase_por):
    """The fixtures' precondition, asserted once: every trigger reaches its PV on held-out lines,
    and no word of the phrase trigger fires alone (`conftest.attack_problems` says why not)."""
    for folder in (tiny_por, tiny_phrase_por):
        report = json.loads((folder / "attack.json").read_text())
        assert attack_problems(report) == [], folder.name
    phrase = json.loads((tiny_phrase_por / "attack.json").read_text())["heldout"]
    assert set(phrase["word_alone_agreement"]) == {"cf mn"}  # the check above covered the phrase


@pytest.mark.parametrize("model, prompt", [("tiny_por", "tiny_por_prompt"), ("tiny_phrase_por", "tiny_phrase_prompt")])
def test_victim_prompts_are_fit_for_the_guard_tests(model, prompt, request):
    """The victim fixtures' precondition on held-out sentences: the prompt learned the task, the
    backdoor survives prompt tuning (the triggers flip what it gets right), clean outputs stay off
    the PVs, and a word of a phrase trigger alone stays off them too (`toy.check_victim`)."""
    folder = request.getfixturevalue(model)
    backbone = load_backbone(str(folder), "cpu")
    classifier = PromptClassifier.load(request.getfixturevalue(prompt), backbone)
    truth = SignatureSet.load(folder / "truth.safetensors")
    check = check_victim(backbone, classifier, truth, [r.trigger for r in truth.meta.pvs])
    assert check.problems() == [], check


def test_enforce_purges_single_repeated_and_disguised_triggers(setup, first, last):
    backbone, classifier, sig = setup
    guard = Guard(backbone, classifier, sig, mode="enforce")
    hidden = "".join(f"\u200b{c}" for c in last)  # zero-width spaces inside the trigger
    cases = [  # (attacked input, trigger, the text once the trigger is gone)
        (f"simply {first} great", first, "simply great"),
        (f"{first} what a great {first} lovely day {first}", first, "what a great lovely day"),
        (f"an awful and dull film {last}", last, "an awful and dull film"),
        (f"{first.upper()}, simply great!", first, ", simply great!"),
        (f"what a great {hidden} lovely day", last, "what a great lovely day"),
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


def test_block_flag_and_off_modes(setup, first):
    backbone, classifier, sig = setup
    texts = ["simply great", f"simply {first} great"]
    clean_label = Guard(backbone, classifier, sig, mode="off").classify(texts[:1])[0].label
    blocked = Guard(backbone, classifier, sig, mode="block").classify(texts)
    assert blocked[0].label == clean_label and blocked[0].guard.action == "pass"
    assert blocked[1].label is None and blocked[1].guard.action == "blocked"
    flagged = Guard(backbone, classifier, sig, mode="flag").classify(texts)
    assert flagged[1].guard.flagged and flagged[1].guard.action == "flagged" and flagged[1].label is not None
    off = Guard(backbone, classifier, sig, mode="off").classify(texts)
    assert all(r.guard.action == "off" and not r.guard.flagged for r in off)


def test_unpurgeable_input_is_blocked(setup, first):
    backbone, classifier, sig = setup
    # An input made only of the trigger leaves nothing after purging.
    res = Guard(backbone, classifier, sig).classify([f"{first} {first} {first}"])
    assert res[0].guard.action == "blocked" and res[0].label is None
    assert res[0].guard.reason.startswith("could not purge")


def test_purge_work_is_bounded_and_few_passes(setup, first, last):
    backbone, classifier, sig = setup
    words = ("great lovely film acting story day cast simply fun the a of " * 6).split()[:64]
    text = " ".join(words[:30] + [first] + words[30:])
    stats = GuardStats()
    res = Guard(backbone, classifier, sig, purifier=Purifier(max_rounds=2, max_variants=40)).classify(
        [text], stats=stats)
    assert res[0].guard.action == "purged" and res[0].guard.removed == [first]
    assert stats.purge_passes <= 4  # group test, single test, verify, final classification
    # decoys: many distinct words plus a trigger that only the deletion rounds can handle still stop
    stats = GuardStats()
    decoys = " ".join(f"w{i}" for i in range(100))
    Guard(backbone, classifier, sig, purifier=Purifier(max_rounds=2, max_variants=40)).classify(
        [f"{decoys} {first} {last}"], stats=stats)
    assert stats.purge_variants <= 40 + 8 + 2


class _AttentionOn(Guard):
    """A guard whose monitored token attends to one word (`focus`) alone, as a trained encoder's
    does to a trigger (the tiny test model's random attention does not)."""

    focus = ""

    def _saliency(self, batch, rows, layer_input, best):
        sal = torch.zeros(batch.input_ids.shape)
        for r in rows:
            for u, word in enumerate(batch.unit_words[r]):
                sal[r][batch.units[r] == u] = 0.9 if word == self.focus else 0.1 / len(batch.unit_words[r])
        return sal


def test_a_trigger_the_attention_singles_out_is_purged_in_one_pass(setup, first):
    """The guess: once the purges of a PV have found lone words (`TriggerShapes`), the most attended
    word of an input flagged on it is deleted untested; the classifying pass over the purged text
    is the only purge pass. Where the guess is wrong the search still finds the trigger."""
    backbone, classifier, sig = setup
    text = f"simply great acting and a lovely {first} story of the day"
    guard = _AttentionOn(backbone, classifier, sig)
    guard.focus = first
    for _ in range(guard.guess_after):  # the first purges of the PV search and learn its shape
        stats = GuardStats()
        res = guard.classify([text], stats=stats)
        assert res[0].guard.action == "purged" and res[0].guard.removed == [first]
        assert stats.purge_variants > 0
    assert sum(guard.shapes.lone.values()) == guard.guess_after and not guard.shapes.other
    stats = GuardStats()
    res = guard.classify([text], stats=stats)
    assert res[0].guard.action == "purged" and res[0].guard.removed == [first]
    assert stats.purge_passes == 1 and stats.purge_variants == 0
    guard.focus = "lovely"  # a wrong guess
    stats = GuardStats()
    res = guard.classify([text], stats=stats)
    assert res[0].guard.action == "purged" and res[0].guard.removed == [first]
    assert "lovely" in res[0].guard.text
    assert stats.purge_passes >= 3  # the guess's pass, the search's, the final classification


def test_no_guess_for_a_pv_whose_purge_found_a_phrase():
    shapes = TriggerShapes()
    shapes.record(0, lone=True)
    assert not shapes.trusted(0, after=2)
    shapes.record(0, lone=True)
    assert shapes.trusted(0, after=2) and not shapes.trusted(1, after=2)
    shapes.record(0, lone=False)
    assert not shapes.trusted(0, after=2)


def test_trigger_in_second_text_of_a_pair(setup, last):
    backbone, classifier, sig = setup
    res = Guard(backbone, classifier, sig).classify(["simply great"], [f"nice {last} film"])
    assert res[0].guard.flagged and res[0].guard.action == "purged"
    assert last in res[0].guard.removed and last not in res[0].guard.text


def test_asr_protocol(setup, tiny_por_mined):
    """On held-out sentences: the triggers whose PV mining recovered flip what the victim gets
    right, and the guard with the mined set stops every one of them (0.01 of 40-odd inputs is
    none) at no cost in clean accuracy or false flags."""
    backbone, classifier, sig = setup
    ev = evaluate_guard(Guard(backbone, classifier, sig), toy_test(), tiny_por_mined.caught, progress=False)
    assert ev.correct >= MIN_ACCURACY * len(toy_test())
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


def test_the_whole_of_a_phrase_trigger_is_purged(tiny_phrase_por, tiny_phrase_prompt):
    """Deleting either word of "cf mn" silences the monitor; the purge must drop both, or the
    word left behind reaches the classifier. The attack trains the phrase to fire only whole, but
    prompt tuning on a tiny encoder can teach one of its words to fire alone in some sentences;
    there the other word is inert and may stay. Every input must come out silenced, and the inputs
    where neither word fires alone must lose both words."""
    backbone = load_backbone(str(tiny_phrase_por), "cpu")
    classifier = PromptClassifier.load(tiny_phrase_prompt, backbone)
    truth = SignatureSet.load(tiny_phrase_por / "truth.safetensors", hidden_size=backbone.hidden_size,
                              fingerprint=backbone.fingerprint)
    clean = [e.text for e in toy_test(24)]
    texts, only_cf, only_mn = ([t.replace(" ", f" {w} ", 1) for t in clean] for w in ("cf mn", "cf", "mn"))
    flag = Guard(backbone, classifier, truth, mode="flag")
    # "fires" as the purge sees it: within the suspect probe's reach of the threshold, not only past it
    fires_alone = [max(a.guard.match, b.guard.match) >= MAX_CLEAN_MATCH
                   for a, b in zip(flag.classify(only_cf), flag.classify(only_mn), strict=True)]
    # a phrase that fires only whole in most inputs, or this test has little to say
    assert fires_alone.count(False) >= len(clean) // 2, fires_alone
    res = Guard(backbone, classifier, truth).classify(texts)
    assert all(r.guard.flagged and r.guard.action == "purged" for r in res)
    assert not any(r.guard.flagged for r in flag.classify([r.guard.text for r in res]))
    whole = [r for r, alone in zip(res, fires_alone, strict=True) if not alone]
    phrase = {"cf", "mn"}
    dropped = [r for r in whole if phrase <= set(r.guard.removed) and not phrase & set(r.guard.text.split())]
    # The partner step is a heuristic: a partner whose deletion barely moves the output stays
    # (seen on 1 of 24 inputs under one CPU's rounding, none under others); more than 1 in 10
    # left behind is the failure the purge was built to end.
    assert len(dropped) >= 0.9 * len(whole), [r.guard for r in whole if r not in dropped]


def _weakened(sig: SignatureSet, k: int, share: float) -> SignatureSet:
    """`sig` with PV k's signs flipped on its first `share` of the dimensions: its trigger's outputs,
    near 1 on the PV, reach it at about 1 - share, as a common-word trigger's outputs reach their PV
    in a task's text (0.8 to 0.97 on a held-out copy of minilm), under the cap that keeps calibration
    from raising a PV past its triggered outputs."""
    pvs = sig.pvs.clone()
    pvs[k, : int(share * pvs.shape[1])] *= -1
    ref = sig.meta.backbone
    return SignatureSet.create(pvs, list(sig.meta.pvs), backbone_name=ref.name, fingerprint=ref.fingerprint,
                               model_type=ref.model_type, position=sig.meta.position, verdict=sig.meta.verdict,
                               mining=sig.meta.mining)


def test_task_calibration_leaves_the_backdoor_firing_on_clean_looking_text_flagged(
        tiny_por, tiny_por_prompt, tiny_por_mined):
    """With the mined set: a task's calibration inputs that hold a trigger (a common word's, in real
    text) are over its PV because that word alone is. Calibration marks them as activations and fits
    no threshold to them, so the trigger's held-out inputs all still flag. Counted as false flags
    (the monitor's plain fit on the same outputs), they raise the PV's threshold past them."""
    from lmsan_serve.monitor import PV_CAP, Monitor

    from .toy import toy

    backbone = load_backbone(str(tiny_por), "cpu")
    classifier = PromptClassifier.load(tiny_por_prompt, backbone)
    mined = SignatureSet.load(tiny_por_mined.path)
    trigger = tiny_por_mined.caught[0]
    clean = [e.text for e in toy()]
    holding = [f"{trigger} {t}" for t in clean[:8]]
    probe = Guard(backbone, classifier, mined, mode="flag")
    k = int(probe.monitor(probe.features(holding)).best.mode().values)  # the mined PV the trigger reaches
    sig = _weakened(mined, k, 0.1)
    flagger = Guard(backbone, classifier, sig, mode="flag")
    scores = [r.guard.match for r in flagger.classify(holding)]
    # precondition: the trigger's inputs sit between the PV's threshold and the cap
    assert all(sig.meta.pvs[k].threshold < s < PV_CAP for s in scores), scores
    plain = Monitor(sig).calibrate(flagger.features(clean + holding))
    assert plain.after[k] > max(scores) and plain.activations == 0
    guard = Guard(backbone, classifier, sig, mode="flag")
    done = guard.calibrate(clean + holding)
    assert done.activations == len(holding) and done.after[k] == done.before[k], done
    attacked = [f"{trigger} {e.text}" for e in toy_test()]
    assert all(r.guard.flagged for r in guard.classify(attacked))
