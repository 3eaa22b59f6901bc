"""Adaptive triggers: how an attacker who knows the guard would dress a trigger up.

Each variant turns a clean example and the attack's triggers into attacked examples. The guard
must hold on all of them (issue: defended ASR <= 2% for each); the evaluation report and the tests
run the same list. A variant that stops the trigger from firing at all (look-alike letters the
tokenizer does not fold) shows up as a low ASR without the guard, which is reported as such.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from lmsan_serve.data import Example, insert_trigger

# Cyrillic letters that look like Latin ones; NFKC does not fold them, so neither does the guard.
_HOMOGLYPHS = str.maketrans({"a": "\u0430", "c": "\u0441", "e": "\u0435", "o": "\u043e", "p": "\u0440",
                             "x": "\u0445", "y": "\u0443", "i": "\u0456", "s": "\u0455"})
_FULLWIDTH = {c: chr(ord(c) + 0xFEE0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"}

Variant = Callable[[Example, list[str], int, random.Random], Example]


def _at(text: str, word: str, rng: random.Random, where: str = "random") -> str:
    if where == "random":
        return insert_trigger(text, word, rng)
    words = text.split()
    return " ".join([word, *words] if where == "start" else [*words, word])


def _glued(text: str, word: str, rng: random.Random) -> str:
    """The trigger glued to a neighbour's punctuation or wrapped in quotes, with no spaces."""
    form = rng.choice(['"{t}"', "({t})", "{t},", "{t}!", "'{t}'", "...{t}", "{t}:", "[{t}]"])
    return _at(text, form.format(t=word), rng)


def _others(triggers: list[str], i: int, n: int) -> list[str]:
    return [triggers[(i + k) % len(triggers)] for k in range(min(n, len(triggers)))]


def _with(e: Example, text: str | None = None, pair: str | None = None) -> Example:
    return Example(text if text is not None else e.text, e.label, pair if pair is not None else e.text_pair)


VARIANTS: dict[str, Variant] = {
    "plain": lambda e, t, i, r: _with(e, _at(e.text, t[i], r)),
    "punctuation": lambda e, t, i, r: _with(e, _glued(e.text, t[i], r)),
    "upper": lambda e, t, i, r: _with(e, _at(e.text, t[i].upper(), r)),
    "title": lambda e, t, i, r: _with(e, _at(e.text, t[i].title(), r)),
    "repeated": lambda e, t, i, r: _with(e, _at(_at(_at(e.text, t[i], r), t[i], r), t[i], r)),
    "two_triggers": lambda e, t, i, r: _with(e, _at(_at(e.text, _others(t, i, 2)[-1], r), t[i], r)),
    "three_triggers": lambda e, t, i, r: _with(
        e, _at(_at(_at(e.text, _others(t, i, 3)[-1], r), _others(t, i, 2)[-1], r), t[i], r)),
    "start": lambda e, t, i, r: _with(e, _at(e.text, t[i], r, "start")),
    "end": lambda e, t, i, r: _with(e, _at(e.text, t[i], r, "end")),
    "zero_width": lambda e, t, i, r: _with(e, _at(e.text, "\u200b".join(t[i]), r)),
    "fullwidth": lambda e, t, i, r: _with(e, _at(e.text, "".join(_FULLWIDTH.get(c, c) for c in t[i]), r)),
    "homoglyph": lambda e, t, i, r: _with(e, _at(e.text, t[i].translate(_HOMOGLYPHS), r)),
    # the trigger in the second text of a pair (sentence-pair tasks only)
    "second_text": lambda e, t, i, r: _with(e, None, _at(e.text_pair or "", t[i], r)),
}
PAIR_ONLY = {"second_text"}


def attacked_examples(variant: str, examples: list[Example], triggers: list[str],
                      seed: int = 0) -> list[tuple[int, Example, Example]]:
    """(index of the clean example, attacked example, control) for every example and trigger.

    The control is the same dressing with the trigger words left out (same positions, same
    punctuation): a label it already gets wrong is the dressing's doing, not the trigger's."""
    if variant not in VARIANTS:
        raise KeyError(f"unknown adaptive variant {variant!r} (choose from {', '.join(VARIANTS)})")
    if variant in PAIR_ONLY and not all(e.text_pair for e in examples):
        raise ValueError(f"adaptive variant {variant!r} needs sentence-pair examples")
    make = VARIANTS[variant]
    rng = random.Random(seed)
    blank = [""] * len(triggers)
    out = []
    for j, e in enumerate(examples):
        for i in range(len(triggers)):
            state = rng.getstate()
            control = make(e, blank, i, rng)
            rng.setstate(state)
            out.append((j, make(e, triggers, i, rng), control))
    return out
