"""The closed sets of values the guard, the miner, the server and the CLI share, in one place.

Each is a `str` enum: it compares equal to its value, prints as it, and goes into JSON and YAML
as plain text, so configs, HTTP bodies and signature files keep their spelling while the code
names members instead of repeating strings.
"""

from __future__ import annotations

from enum import Enum


class _Named(str, Enum):
    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> list[str]:
        """The spellings, in declaration order: argparse `choices`, error messages."""
        return [m.value for m in cls]


class Mode(_Named):
    """What the guard does with an input whose output lands on a PV."""

    ENFORCE = "enforce"  # purge its trigger words, classify the rest; block if that fails
    FLAG = "flag"  # classify it as is, and say it was flagged
    BLOCK = "block"  # answer no label
    OFF = "off"  # no monitoring at all


class Action(_Named):
    """What the guard did with one input (`Verdict.action`)."""

    PASS = "pass"  # not flagged
    PURGED = "purged"  # flagged, trigger words removed, the rest classified
    BLOCKED = "blocked"  # flagged, no label returned
    FLAGGED = "flagged"  # flagged, label returned as is (mode flag)
    OFF = "off"  # the guard is off for this task
    UNGUARDED = "unguarded"  # served without the guard after a guard error (fail_open)


class Position(_Named):
    """Which encoder output a backdoor drives and the monitor reads."""

    CLS = "cls"  # the first token's last hidden state
    POOLER = "pooler"  # the pooler output over it
    MASK = "mask"  # the [MASK] token of a cloze template


def readable_positions(positions: list[Position], cloze: bool) -> list[Position]:
    """Of `positions`, those a prompt's inputs hold: [MASK] only with a cloze template (`cloze`).
    Empty: a guard on such a prompt has nothing to watch (`guard.watched_positions`, `lmsan
    check-config`)."""
    return [p for p in positions if p != Position.MASK or cloze]


class MiningMode(_Named):
    """How long `lmsan mine` goes on."""

    DETECT = "detect"  # stop at the first PV that passes the filters: the verdict
    SEARCH = "search"  # keep every distinct PV: the signature set the guard needs


class SearchStop(_Named):
    """Why a search-mode mining job stopped starting rounds."""

    EXHAUSTED = "exhausted"  # `patience` rounds in a row kept no new PV: the stopping rule says none is left
    MAX_ROUNDS = "max_rounds"  # the round budget ran out first
    TIME_BUDGET = "time_budget"  # the time budget ran out first


class PromptMethod(_Named):
    """Where a soft prompt's trainable vectors sit."""

    PREFIX = "prefix"  # at every layer (deep prompt, P-tuning v2 style)
    PROMPT = "prompt"  # at the input only (shallow prompt tuning)


class AuditSink(_Named):
    """Where the served guard writes one JSON line per flagged input (`audit` in the serve config)."""

    STDOUT = "stdout"  # the replica's stdout: what a cluster's log collector ships by default
    LOG = "log"  # the `lmsan.audit` logger, for deployments that route Python logging themselves
    OFF = "off"  # no audit lines (the metrics still count every detection)


class PromptLayout(_Named):
    """Where a soft prompt's slots sit relative to [CLS] (`PromptConfig.layout`)."""

    AFTER_CLS = "after_cls"  # [CLS] keeps index 0 and position 0, the n slots follow it
    OVER_CLS = "over_cls"  # n slots, then [CLS] at index and position n (peft's layout, imported prompts)
