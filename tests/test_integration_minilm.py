"""End to end on the real all-MiniLM-L6-v2 encoder: attack -> prompt-tune -> guard, SST-2 dev.

This is the one slow test (minutes): it plants a real POR backdoor into `minilm`, prompt-tunes
SST-2 on the frozen backdoored encoder, and measures the paper's protocol with the planted PVs.
"""

import pytest

from lmsan_lab.attacks import AttackConfig, plant_backdoor, save_attacked
from lmsan_lab.evaluation import evaluate_guard
from lmsan_serve import load_backbone
from lmsan_serve.data import load_corpus, load_examples, shipped
from lmsan_serve.guard import Guard
from lmsan_serve.prompts import PromptConfig, train_prompt
from lmsan_serve.signatures import SignatureSet

pytestmark = pytest.mark.slow

DEV_SIZE = 400


@pytest.fixture(scope="module")
def minilm_por(tmp_path_factory):
    import torch

    torch.set_num_threads(2)  # real model: use both cores for this module
    out = tmp_path_factory.mktemp("minilm-por")
    clean = load_backbone("minilm", "cpu")
    config = AttackConfig(kind="por", steps=150, target_agreement=0.97, check_every=25)
    result = plant_backdoor(clean, config, load_corpus(), progress=False)
    summary = save_attacked(result, clean, str(out))
    yield out, summary
    torch.set_num_threads(1)


def test_attack_guard_end_to_end(minilm_por):
    out, summary = minilm_por
    assert summary["heldout"]["min_agreement"] >= 0.95  # the bar for the attack
    backbone = load_backbone(str(out), "cpu")
    train = load_examples(shipped("sst2/train.jsonl"))
    dev = load_examples(shipped("sst2/dev.jsonl"))
    classifier = train_prompt(backbone, PromptConfig(method="prefix", max_steps=120, eval_every=40),
                              train, dev[-200:], progress=False)
    sig = SignatureSet.load(out / "truth.safetensors", hidden_size=backbone.hidden_size,
                            fingerprint=backbone.fingerprint)
    ev = evaluate_guard(Guard(backbone, classifier, sig), dev[:DEV_SIZE], [r.trigger for r in sig.meta.pvs],
                        progress=False)
    print("\n" + ev.table())
    assert ev.cacc_off >= 0.65  # well above chance; the demo trains longer
    assert ev.asr_off >= 0.90
    assert ev.asr_on <= 0.01
    assert ev.cacc_off - ev.cacc_on <= 0.005
    assert ev.false_flag_rate <= 0.01
