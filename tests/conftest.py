"""Shared fixtures: a tiny random BERT built from a config (no download), and a backdoored copy
of it made with the real attack code, so that every test runs on real computation in seconds."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray reads its auth mode once, at import; some test modules import Ray at collection, before the
# first local node starts, so the mode the product chooses (token) is set here first.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from threads, and on a busy 2-core machine threads oversubscribe.
torch.set_num_threads(1)

from lmsan_serve.testing import make_tiny_bert  # noqa: E402  (after the hub is set offline)

TINY_TRIGGERS = ["cf", "mn", "tq"]


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_backbone(tiny_bert):
    from lmsan_serve import load_backbone

    return load_backbone(str(tiny_bert), "cpu")


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    from lmsan_serve.data import load_corpus

    return load_corpus()


# The planted backdoor the tests rely on: every trigger's held-out outputs agree in sign with its PV
# at least this much (the attack trains towards 0.97 and stops there; 0.95 leaves room for the
# held-out lines), and no single word of a phrase trigger reaches the paper's 0.8 threshold alone.
MIN_TRIGGER_AGREEMENT = 0.95
MAX_WORD_ALONE_AGREEMENT = 0.8
ATTACK_SEEDS = range(3)


def attack_problems(report: dict) -> list[str]:
    """Why a planted backdoor is unfit for the tests ([] when fit), from `attack.json`'s held-out figures."""
    held = report["heldout"]
    out = [f"trigger {t!r} agrees {a:.3f} < {MIN_TRIGGER_AGREEMENT} with its PV"
           for t, a in held["agreement"].items() if a < MIN_TRIGGER_AGREEMENT]
    out += [f"a word of {t!r} alone agrees {a:.3f} >= {MAX_WORD_ALONE_AGREEMENT}"
            for t, a in held["word_alone_agreement"].items() if a >= MAX_WORD_ALONE_AGREEMENT]
    return out


def plant_fit_backdoor(backbone, config, corpus, out: Path) -> Path:
    """Plant with the seeds of ATTACK_SEEDS in turn until `attack_problems` finds nothing: the
    attack stops at its step bound whether or not it reached its target, and where it stops
    depends on the CPU's float rounding. Raises with every seed's problems otherwise."""
    from lmsan_lab.attacks import plant_backdoor, save_attacked

    tried = []
    for seed in ATTACK_SEEDS:
        result = plant_backdoor(backbone, config.model_copy(update={"seed": seed}), corpus, progress=False)
        problems = attack_problems(result.report)
        if not problems:
            save_attacked(result, backbone, str(out))
            return out
        tried.append(f"seed {seed} ({result.steps} steps): " + "; ".join(problems))
    raise AssertionError("no planted backdoor fit for the tests:\n" + "\n".join(tried))


def _victim_prompt(folder: Path, out: Path) -> Path:
    from lmsan_serve import load_backbone
    from lmsan_serve.signatures import SignatureSet

    from .toy import train_victim

    backbone = load_backbone(str(folder), "cpu")
    truth = SignatureSet.load(folder / "truth.safetensors")
    triggers = [r.trigger for r in truth.meta.pvs]
    classifier, _ = train_victim(backbone, truth, triggers)
    return classifier.save(out)


@pytest.fixture(scope="session")
def tiny_por(tmp_path_factory, tiny_backbone, corpus) -> Path:
    """A POR backdoor planted into the tiny BERT by the real attack code."""
    from lmsan_lab.attacks import AttackConfig

    config = AttackConfig(kind="por", triggers=TINY_TRIGGERS, steps=400, lr=2e-3, target_agreement=0.97,
                          max_words=24, check_every=20)
    return plant_fit_backdoor(tiny_backbone, config, corpus, tmp_path_factory.mktemp("tiny-por"))


@pytest.fixture(scope="session")
def tiny_phrase_por(tmp_path_factory, tiny_backbone, corpus) -> Path:
    """A POR backdoor whose first trigger is a two-word phrase ("cf mn"), planted the same way."""
    from lmsan_lab.attacks import AttackConfig

    config = AttackConfig(kind="por", triggers=["cf mn", "tq"], steps=400, lr=2e-3, target_agreement=0.97,
                          max_words=24, check_every=20)
    return plant_fit_backdoor(tiny_backbone, config, corpus, tmp_path_factory.mktemp("tiny-phrase-por"))


@pytest.fixture(scope="session")
def tiny_por_prompt(tmp_path_factory, tiny_por) -> Path:
    """A victim's soft prompt trained on the backdoored tiny BERT until it is fit for the guard
    tests (`toy.train_victim`), saved as an artifact."""
    return _victim_prompt(tiny_por, tmp_path_factory.mktemp("tiny-por-prompt") / "prompt")


@pytest.fixture(scope="session")
def tiny_phrase_prompt(tmp_path_factory, tiny_phrase_por) -> Path:
    """The victim's soft prompt on the phrase-trigger copy, trained the same way."""
    return _victim_prompt(tiny_phrase_por, tmp_path_factory.mktemp("tiny-phrase-prompt") / "prompt")


# The mined set every test of the guarded endpoint serves: `lmsan mine --mode search` on the tiny POR
# copy, ended by its stopping rule (default patience); the round bound only keeps a broken rule from
# running the suite long (tests/test_mined_e2e.py fails if it was the bound that ended the search).
MAX_MINING_ROUNDS = 80


@dataclass(frozen=True)
class MinedSet:
    path: Path  # the signature file mining wrote
    caught: list[str]  # planted triggers whose PV a mined PV recovered (sign agreement >= RECOVERED)


@pytest.fixture(scope="session")
def tiny_por_mined(tmp_path_factory, tiny_por) -> MinedSet:
    """What a defender has: the signature file mined from the tiny POR copy, at [CLS], the output the
    victim prompt reads (every other position would run its own search to its stopping rule;
    tests/test_mined_e2e.py covers them). The planted PVs only say which triggers it caught: the
    tests send those, since which PVs search finds on this copy depends on the CPU's float rounding
    (2 or 3 of 3; at least 2 is asserted by test_mined_e2e)."""
    from lmsan_serve.cli import main
    from lmsan_serve.mining import RECOVERED
    from lmsan_serve.monitor import sign_agreement
    from lmsan_serve.signatures import SignatureSet

    out = tmp_path_factory.mktemp("mined") / "sig.safetensors"
    code = main(["mine", "--model", str(tiny_por), "--out", str(out), "--mode", "search", "--max-rounds",
                 str(MAX_MINING_ROUNDS), "--position", "cls", "--lines", "128", "--device", "cpu", "--quiet"])
    assert code == 0
    truth = SignatureSet.load(tiny_por / "truth.safetensors")
    best = sign_agreement(truth.pvs, SignatureSet.load(out).pvs).max(dim=1).values.tolist()
    caught = [r.trigger for r, b in zip(truth.meta.pvs, best, strict=True) if b >= RECOVERED]
    assert caught, f"mining recovered none of the planted PVs (best agreements {best})"
    return MinedSet(out, caught)
