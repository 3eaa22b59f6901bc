"""The text an attack trains on, apart from the text a defender's miner reads.

A zoo that plants its backdoors with the very lines the miner later fuzzes on tells the miner
more than a real attacker would: the backdoor was shaped on exactly that text. So an attack can
name its text kind (`AttackConfig.text`), and each kind's lines are ones the miner never reads:

- `wikitext`: the shipped WikiText-2 lines between the miner's fuzzing lines (the first
  `MiningConfig.lines`) and its calibration lines (the last `MiningConfig.calibration_lines`), at
  the mining defaults; `miner_lines` and tests/test_zoo_plan.py check the split against the
  miner's own `_split_corpus`;
- `news`: the shipped AG News texts;
- `sms`: the shipped SMS Spam Collection texts (ham and spam alike).

Kept free of pydantic and torch, so the CLI can offer the kinds while it builds its parser.
"""

from __future__ import annotations

from lmsan_serve.data import load_corpus, shipped
from lmsan_serve.errors import LmsanError
from lmsan_serve.kinds import _Named

# The miner's defaults (MiningConfig.lines, .calibration_lines), repeated here so that this module
# needs no pydantic; tests/test_zoo_plan.py checks them against MiningConfig.
MINER_FUZZ_LINES = 256
MINER_CALIBRATION_LINES = 400


class AttackText(_Named):
    """Which text an attack trains its backdoor on (see the module docstring)."""

    WIKITEXT = "wikitext"
    NEWS = "news"
    SMS = "sms"


_FILES = {AttackText.NEWS: "ag_news/test.jsonl", AttackText.SMS: "sms_spam/all.jsonl"}


def miner_lines(corpus: list[str], fuzz: int = MINER_FUZZ_LINES,
                calibration: int = MINER_CALIBRATION_LINES) -> tuple[list[str], list[str]]:
    """The lines of `corpus` a miner with `fuzz` fuzzing and `calibration` calibration lines reads:
    the first `fuzz` and the last `calibration` (the miner's rule for a corpus that holds both)."""
    if len(corpus) < fuzz + calibration:
        raise LmsanError(f"a corpus of {len(corpus)} lines leaves no line unread by a miner that reads "
                         f"{fuzz} + {calibration}")
    return corpus[:fuzz], corpus[len(corpus) - calibration:]


def attack_corpus(text: AttackText | str, fuzz: int = MINER_FUZZ_LINES,
                  calibration: int = MINER_CALIBRATION_LINES) -> list[str]:
    """The lines an attack on `text` trains and holds out on; for wikitext, those a miner reading
    `fuzz` + `calibration` lines of the shipped corpus never reads."""
    text = AttackText(text)
    if text == AttackText.WIKITEXT:
        corpus = load_corpus()
        miner_lines(corpus, fuzz, calibration)  # the check: something is left between
        return corpus[fuzz: len(corpus) - calibration]
    return load_corpus(shipped(_FILES[text]))
