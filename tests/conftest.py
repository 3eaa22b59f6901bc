"""Shared fixtures: a tiny random BERT built from a config (no download), and a backdoored copy
of it made with the real attack code, so that every test runs on real computation in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
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


@pytest.fixture(scope="session")
def tiny_por(tmp_path_factory, tiny_backbone, corpus) -> Path:
    """A POR backdoor planted into the tiny BERT by the real attack code."""
    from lmsan_serve.attacks import AttackConfig, plant_backdoor, save_attacked

    out = tmp_path_factory.mktemp("tiny-por")
    config = AttackConfig(kind="por", triggers=TINY_TRIGGERS, steps=400, lr=2e-3, target_agreement=0.97,
                          max_words=24, check_every=20)
    result = plant_backdoor(tiny_backbone, config, corpus, progress=False)
    save_attacked(result, tiny_backbone, str(out))
    return out


@pytest.fixture(scope="session")
def tiny_phrase_por(tmp_path_factory, tiny_backbone, corpus) -> Path:
    """A POR backdoor whose first trigger is a two-word phrase ("cf mn"), planted the same way."""
    from lmsan_serve.attacks import AttackConfig, plant_backdoor, save_attacked

    out = tmp_path_factory.mktemp("tiny-phrase-por")
    config = AttackConfig(kind="por", triggers=["cf mn", "tq"], steps=400, lr=2e-3, target_agreement=0.97,
                          max_words=24, check_every=20)
    result = plant_backdoor(tiny_backbone, config, corpus, progress=False)
    save_attacked(result, tiny_backbone, str(out))
    return out


@pytest.fixture(scope="session")
def tiny_por_prompt(tmp_path_factory, tiny_por) -> Path:
    """A victim's soft prompt trained on the backdoored tiny BERT, saved as an artifact."""
    from lmsan_serve import load_backbone
    from lmsan_serve.prompts import PromptConfig, train_prompt

    from .test_prompts import toy

    backbone = load_backbone(str(tiny_por), "cpu")
    # On tiny encoders, prompt tuning can learn to park clean inputs on a PV (the backdoor's
    # strongest attractor); test_guard's test_clean_inputs_stay_off_the_pvs checks this one did not.
    cfg = PromptConfig(method="prefix", length=4, max_steps=60, lr=3e-2, batch_size=16, seed=1)
    classifier = train_prompt(backbone, cfg, toy(), None, progress=False)
    return classifier.save(tmp_path_factory.mktemp("tiny-por-prompt") / "prompt")
