"""A lexical sentiment task that a tiny random encoder learns in a few dozen steps, with a held-out
split, and the victim prompt the guard tests need, trained until it is fit for them.

The split matters: attack success and false flags are measured on sentences the prompt never saw,
as a defender meets them. The words are shared (a lexical task cannot generalise to unseen
words); the sentences are not.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lmsan_serve.backbone import Backbone
from lmsan_serve.data import Example, insert_trigger
from lmsan_serve.guard import Guard
from lmsan_serve.prompts import PromptClassifier, PromptConfig, train_prompt
from lmsan_serve.signatures import SignatureSet

# The sentences the earlier suite trained on; they stay in the training split, so literal
# examples in the tests ("simply great", "an awful and dull film") are sentences of the task.
SEED_POS = ["a great and lovely film", "great acting , lovely story", "simply great", "lovely , great fun",
            "what a great lovely day", "the cast is great"]
SEED_NEG = ["an awful and dull film", "dull acting , awful story", "simply awful", "awful , dull mess",
            "what an awful dull day", "the cast is dull"]

POS_WORDS = ["great", "lovely", "fun"]
NEG_WORDS = ["awful", "dull", "boring"]
NOUNS = ["film", "story", "acting", "cast", "day", "plot", "show", "music"]
TEMPLATES = ["a {a} and {b} {n}", "{a} {n} , {b} {m}", "simply {a}", "what a {a} {b} {n}", "the {n} is {a}",
             "{a} , {b} {n}", "the {n} was {a} and the {m} {b}", "such a {a} {n}"]


def _sentence(rng: random.Random, words: list[str]) -> str:
    a, b = rng.sample(words, 2)
    n, m = rng.sample(NOUNS, 2)
    return rng.choice(TEMPLATES).format(a=a, b=b, n=n, m=m)


def _generated(seed: int, count: int, exclude: set[str]) -> list[Example]:
    """`count` distinct sentences not in `exclude`, labels alternating pos / neg."""
    rng = random.Random(seed)
    out: list[Example] = []
    seen = set(exclude)
    while len(out) < count:
        label = "pos" if len(out) % 2 == 0 else "neg"
        text = _sentence(rng, POS_WORDS if label == "pos" else NEG_WORDS)
        if text not in seen:
            seen.add(text)
            out.append(Example(text, label))
    return out


TRAIN: list[Example] = [Example(t, "pos") for t in SEED_POS] + [Example(t, "neg") for t in SEED_NEG] + \
    _generated(0, 72, set(SEED_POS + SEED_NEG))
TEST: list[Example] = _generated(1, 48, {e.text for e in TRAIN})


def toy(n: int = 96) -> list[Example]:
    """`n` training examples (the training split, repeated as needed)."""
    return (TRAIN * (n // len(TRAIN) + 1))[:n]


def toy_test(n: int = len(TEST)) -> list[Example]:
    """`n` held-out examples, none of them a training sentence."""
    if n > len(TEST):
        raise ValueError(f"the held-out split has {len(TEST)} sentences, not {n}")
    return TEST[:n]


@dataclass
class VictimCheck:
    """What the guard tests assume of a victim prompt, measured on the held-out split."""

    accuracy: float
    asr: float  # share of correct held-out inputs some trigger flips, guard off
    max_clean_match: float  # highest sign agreement of a clean held-out output with a PV
    max_noise_match: float  # the same with an odd word that is no trigger inserted (report.NOISE_WORDS)
    word_alone_share: float  # share of held-out inputs where one word of a phrase trigger alone nears a PV

    def problems(self) -> list[str]:
        out = []
        if self.accuracy < MIN_ACCURACY:
            out.append(f"held-out accuracy {self.accuracy:.3f} < {MIN_ACCURACY}")
        if self.asr < MIN_ASR:
            out.append(f"attack success {self.asr:.3f} < {MIN_ASR} without the guard")
        if self.max_clean_match >= MAX_CLEAN_MATCH:
            out.append(f"a clean held-out input agrees {self.max_clean_match:.3f} >= {MAX_CLEAN_MATCH} with a PV")
        if self.max_noise_match >= MAX_CLEAN_MATCH:
            out.append(f"a held-out input with a word that is no trigger agrees {self.max_noise_match:.3f} "
                       f">= {MAX_CLEAN_MATCH} with a PV")
        if self.word_alone_share > MAX_WORD_ALONE_SHARE:
            out.append(f"one word of a phrase trigger alone agrees >= {MAX_CLEAN_MATCH} with a PV in "
                       f"{self.word_alone_share:.2f} > {MAX_WORD_ALONE_SHARE} of held-out inputs")
        return out


# Why these bounds: ASR is counted on the held-out inputs the victim gets right, and the tests
# bound the defended ASR at 1% to 2%, which needs about 40 of them (0.85 of 48) to mean "none got
# through"; a backdoor that flips fewer than 90% of them unguarded leaves the defended ASR little
# to show. A clean output that agrees 0.75 with a PV is within the suspect probe's reach of the
# paper's 0.8 threshold, so false-flag tests would measure the prompt's luck, not the guard; the
# same holds for an input with an odd word in it that is no trigger (the noise baseline of
# `lmsan eval`). Prompt tuning on a tiny encoder trades accuracy for these: the longer it trains,
# the more clean outputs it parks near a PV (the backdoor's strongest attractor), so some seeds
# fail one bound or another. The attack trains a phrase trigger to fire only whole, but prompt
# tuning can teach one of its words to fire alone; the phrase-purge test needs at least half its
# inputs where neither word does, and a quarter here leaves room for its other insertion points.
MIN_ACCURACY = 0.85
MIN_ASR = 0.9
MAX_CLEAN_MATCH = 0.75
MAX_WORD_ALONE_SHARE = 0.25
VICTIM_SEEDS = range(12)
# Two learning rates, the gentler first: at 1e-2 fewer seeds park clean inputs on a PV, at 2e-2
# fewer miss the task. Under each CPU kernel set tried, each rate gave a fit victim at a quarter to
# a third of seeds, which seeds differing with the kernels, so a miss on all 24 tries is unlikely.
VICTIM_CONFIGS = [PromptConfig(method="prefix", length=8, max_steps=120, lr=lr, batch_size=16, seed=seed)
                  for lr in (1e-2, 2e-2) for seed in VICTIM_SEEDS]


def check_victim(backbone: Backbone, classifier: PromptClassifier, truth: SignatureSet,
                 triggers: list[str]) -> VictimCheck:
    from lmsan_lab.evaluation import evaluate_guard
    from lmsan_lab.report import NOISE_WORDS

    test = toy_test()
    guard = Guard(backbone, classifier, truth, mode="flag")
    clean = guard.classify([e.text for e in test])
    ev = evaluate_guard(guard, test, triggers, progress=False)
    rng = random.Random(0)
    noisy = guard.classify([insert_trigger(e.text, word, rng) for word in NOISE_WORDS for e in test])
    return VictimCheck(accuracy=ev.cacc_off, asr=ev.asr_off, max_clean_match=max(r.guard.match for r in clean),
                       max_noise_match=max(r.guard.match for r in noisy),
                       word_alone_share=_word_alone_share(guard, test, triggers))


def _word_alone_share(guard: Guard, test: list[Example], triggers: list[str]) -> float:
    """Share of `test` inputs where some word of a phrase trigger, inserted alone, brings the output
    within MAX_CLEAN_MATCH of a PV (0.0 when no trigger is a phrase)."""
    rng = random.Random(1)
    fires = [False] * len(test)
    for phrase in (t for t in triggers if " " in t):
        for word in phrase.split():
            res = guard.classify([insert_trigger(e.text, word, rng) for e in test])
            fires = [f or r.guard.match >= MAX_CLEAN_MATCH for f, r in zip(fires, res, strict=True)]
    return sum(fires) / len(test)


def train_victim(backbone: Backbone, truth: SignatureSet, triggers: list[str]) -> tuple[PromptClassifier, VictimCheck]:
    """Train the victim's soft prompt on the training split until `check_victim` passes, trying the
    configurations of VICTIM_CONFIGS in turn: on a tiny encoder prompt tuning sometimes parks clean
    inputs on a PV, misses a pattern or teaches a phrase's word to fire alone, and which seed does
    so depends on the CPU's float rounding. Raises with every try's problems when none is fit, so a
    failure says what the fixture lacked."""
    tried = []
    for config in VICTIM_CONFIGS:
        classifier = train_prompt(backbone, config, toy(), None, progress=False)
        check = check_victim(backbone, classifier, truth, triggers)
        if not check.problems():
            return classifier, check
        tried.append(f"lr {config.lr}, seed {config.seed}: " + "; ".join(check.problems()))
    raise AssertionError("no victim prompt fit for the guard tests:\n" + "\n".join(tried))
