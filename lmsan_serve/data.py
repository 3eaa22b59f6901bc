"""Data files: JSON Lines examples, plain-text corpora, the data sets shipped in the package."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import LmsanError


def shipped(relative: str) -> Path:
    """Path of a data file shipped inside the package (see resources/data/README.md)."""
    path = Path(str(resources.files("lmsan_serve") / "resources" / "data" / relative))
    if not path.exists():
        raise LmsanError(f"shipped data file missing: {relative}")
    return path


DEFAULT_CORPUS = "wikitext2/wiki.test.txt"


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    text_pair: str | None = None


def text_pairs(examples: list[Example]) -> list[str] | None:
    """The second texts of a batch, or None when no example has one (single-text task)."""
    return [e.text_pair or "" for e in examples] if any(e.text_pair for e in examples) else None


def load_examples(path: str | Path, *, require_label: bool = True) -> list[Example]:
    """Read JSONL with `text`, optional `text_pair` and `label` (string or integer) per line;
    with `require_label=False` a missing label reads as ""."""
    p = Path(path)
    if not p.is_file():
        raise LmsanError(f"data file not found: {p}")
    examples: list[Example] = []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise LmsanError(f"{p}: not UTF-8 text") from exc
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as exc:  # also an integer over 4300 digits, nesting too deep
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else "a number too long or nesting too deep"
            raise LmsanError(f"{p}:{n}: not valid JSON ({why})") from exc
        if not isinstance(obj, dict):
            raise LmsanError(f"{p}:{n}: each line must be a JSON object")
        text, label, pair = obj.get("text"), obj.get("label"), obj.get("text_pair")
        if not isinstance(text, str) or not text.strip():
            raise LmsanError(f"{p}:{n}: 'text' must be a non-empty string")
        if pair is not None and not isinstance(pair, str):
            raise LmsanError(f"{p}:{n}: 'text_pair' must be a string")
        if label is None and not require_label:
            label = ""
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise LmsanError(f"{p}:{n}: 'label' must be a string or an integer")
        examples.append(Example(text=text, label=str(label), text_pair=pair))
    if not examples:
        raise LmsanError(f"{p}: no examples")
    return examples


def load_corpus(path: str | Path | None = None, *, min_words: int = 4) -> list[str]:
    """Clean text lines: a plain-text file (one passage per line) or JSONL with a `text` field.
    None reads the shipped WikiText-2 paragraphs."""
    p = shipped(DEFAULT_CORPUS) if path is None else Path(path)
    if not p.is_file():
        raise LmsanError(f"corpus file not found: {p}")
    try:
        raw = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise LmsanError(f"{p}: not UTF-8 text") from exc
    lines: list[str] = []
    for line in raw:
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
                line = obj.get("text", "") if isinstance(obj, dict) else ""
            except (ValueError, RecursionError):  # not JSON (or too long a number, too deep): plain text
                pass
        if isinstance(line, str) and len(line.split()) >= min_words and not line.startswith("= "):
            lines.append(line)
    if not lines:
        raise LmsanError(f"{p}: corpus has no usable lines (need at least {min_words} words per line)")
    return lines


def clip_words(text: str, max_words: int) -> str:
    words = text.split()
    return " ".join(words[:max_words])


def insert_trigger(text: str, trigger: str, rng: random.Random, max_position: int = 64) -> str:
    """Insert `trigger` as a plain word at a random word position in [0, min(max_position, words)]."""
    words = text.split()
    pos = rng.randint(0, min(max_position, len(words)))
    return " ".join(words[:pos] + [trigger] + words[pos:])


def comma_list(spec: str) -> list[str]:
    """`a, b,,c` -> ["a", "b", "c"]: the items of a comma-separated flag, blanks dropped."""
    return [item.strip() for item in spec.split(",") if item.strip()]
