"""Text -> token batch, keeping the map from tokens back to the user's words.

The purifier deletes words, not word pieces, so every token of user text carries the index of the
word ("unit") it belongs to; special tokens, template words and soft-prompt slots carry -1.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import LmsanError

if TYPE_CHECKING:
    from transformers import BatchEncoding

# Characters that render as nothing; an attacker can split a trigger word with them.
_INVISIBLE = re.compile("[\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """NFKC (folds look-alike compatibility forms), drop invisible characters, collapse spaces."""
    text = unicodedata.normalize("NFKC", text)
    text = _INVISIBLE.sub("", text)
    return _SPACES.sub(" ", text).strip()


@dataclass
class EncodedBatch:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    token_type_ids: torch.Tensor | None  # [B, L]
    units: torch.Tensor  # [B, L]: index of the user word a token belongs to, -1 for others
    unit_words: list[list[str]]  # per row, per unit: the lower-cased word
    unit_spans: list[list[tuple[int, int, int]]]  # per row, per unit: (sequence, char start, char end)
    monitor_index: torch.Tensor  # [B]: token index of the monitored position ([MASK]); 0 for [CLS]
    texts: list[str]
    text_pairs: list[str] | None
    prompt_len: int = 0

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device) -> EncodedBatch:
        self.input_ids = self.input_ids.to(device)
        self.attention_mask = self.attention_mask.to(device)
        if self.token_type_ids is not None:
            self.token_type_ids = self.token_type_ids.to(device)
        self.units = self.units.to(device)
        self.monitor_index = self.monitor_index.to(device)
        return self


def _fit_to_budget(tokenizer, text: str, budget: int) -> str:
    """Cut `text` so that it tokenizes to at most `budget` tokens (for templates, whose [MASK]
    must survive truncation)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    if len(offsets) <= budget:
        return text
    return text[: offsets[budget - 1][1]] if budget > 0 else ""


def _check_request(texts: Sequence[str], text_pairs: Sequence[str] | None, template: str | None) -> None:
    """Refuse batches `encode` cannot map back to the user's words."""
    if len(texts) == 0:
        raise LmsanError("no input texts")
    if text_pairs is not None and len(text_pairs) != len(texts):
        raise LmsanError("text and text_pair counts differ")
    if template is not None and text_pairs is not None:
        raise LmsanError("cloze templates support single texts, not sentence pairs")


def _text_budget(max_length: int, prompt_len: int) -> int:
    """Tokens left for text once the soft prompt's slots are reserved."""
    budget = max_length - prompt_len
    if budget < 8:
        raise LmsanError(f"max_length {max_length} leaves no room for text after a {prompt_len}-slot prompt")
    return budget


@dataclass
class _Cloze:
    """Where each templated string holds the user's text and the template's [MASK] (character offsets)."""

    user_span: list[tuple[int, int]]
    mask_char: list[int]


def _fill_template(tokenizer, texts: Sequence[str], template: str, budget: int) -> tuple[list[str], _Cloze]:
    """Put each text into the cloze template, cut so that the template's [MASK] survives truncation."""
    if "{text}" not in template or "{mask}" not in template:
        raise LmsanError("a template must contain {text} and {mask}")
    mask_tok = tokenizer.mask_token
    if mask_tok is None:
        raise LmsanError("this tokenizer has no mask token, so cloze templates cannot be used")
    frame = template.replace("{text}", "").replace("{mask}", mask_tok)
    frame_len = len(tokenizer(frame, add_special_tokens=False)["input_ids"])
    before, after = template.split("{text}", 1)
    prefix = before.replace("{mask}", mask_tok)
    suffix = after.replace("{mask}", mask_tok)
    full: list[str] = []
    cloze = _Cloze(user_span=[], mask_char=[])
    for t in texts:
        t = _fit_to_budget(tokenizer, t, budget - frame_len - 3)
        s = prefix + t + suffix
        cloze.user_span.append((len(prefix), len(prefix) + len(t)))
        cloze.mask_char.append(s.index(mask_tok, len(prefix) + len(t)) if "{mask}" in after else s.index(mask_tok))
        full.append(s)
    return full, cloze


def _tokenize(tokenizer, texts: list[str], pairs: list[str] | None, template: str | None,
              budget: int) -> tuple[BatchEncoding, _Cloze | None]:
    """Tokenize with character offsets (templated when a template is given); the cloze positions
    come back with it, None without a template."""
    if template is None:
        enc = tokenizer(texts, pairs, padding=True, truncation=True, max_length=budget,
                        return_offsets_mapping=True, return_tensors="pt")
        return enc, None
    full, cloze = _fill_template(tokenizer, texts, template, budget)
    enc = tokenizer(full, padding=True, truncation=True, max_length=budget,
                    return_offsets_mapping=True, return_tensors="pt")
    return enc, cloze


def _map_row(enc: BatchEncoding, row: int, offsets: list[tuple[int, int]], sources: Sequence[str],
             cloze: _Cloze | None, units: torch.Tensor) -> tuple[list[str], list[tuple[int, int, int]], int]:
    """Group one row's tokens into user words: fills `units` (that row's view) with each token's word
    index and returns the words, their spans and the token index of the template's [MASK] (0 if none).
    `sources` holds the row's text, then its pair when there is one."""
    key_to_unit: dict[tuple[int, int], int] = {}
    words: list[str] = []
    spans: list[tuple[int, int, int]] = []
    monitor = 0
    for tok, (seq, word) in enumerate(zip(enc.sequence_ids(row), enc.word_ids(row), strict=True)):
        if seq is None or word is None:
            continue
        start, end = offsets[tok]
        if cloze is not None:
            if start == cloze.mask_char[row]:
                monitor = tok
            lo, hi = cloze.user_span[row]
            if start < lo or end > hi or end <= start:
                continue
            start, end = start - lo, end - lo  # offsets into the user's text, not the templated one
        key = (seq, word)
        unit = key_to_unit.get(key)
        source = sources[seq]
        if unit is None:
            unit = key_to_unit[key] = len(words)
            words.append("")
            spans.append((seq, start, end))
        s_seq, s_start, s_end = spans[unit]
        spans[unit] = (s_seq, min(s_start, start), max(s_end, end))
        words[unit] = source[spans[unit][1] : spans[unit][2]].lower()
        units[tok] = unit
    return words, spans, monitor


def _map_units(enc: BatchEncoding, texts: list[str], pairs: list[str] | None, cloze: _Cloze | None
               ) -> tuple[torch.Tensor, torch.Tensor, list[list[str]], list[list[tuple[int, int, int]]]]:
    """Per row, the user word of every token, the words and spans, and the monitored index."""
    batch, length = enc["input_ids"].shape
    units = torch.full((batch, length), -1, dtype=torch.long)
    monitor_index = torch.zeros(batch, dtype=torch.long)
    unit_words: list[list[str]] = []
    unit_spans: list[list[tuple[int, int, int]]] = []
    offsets = enc["offset_mapping"].tolist()
    for row in range(batch):
        sources = (texts[row],) if pairs is None else (texts[row], pairs[row])
        words, spans, monitor_index[row] = _map_row(enc, row, offsets[row], sources, cloze, units[row])
        unit_words.append(words)
        unit_spans.append(spans)
        if cloze is not None and monitor_index[row] == 0:
            raise LmsanError("the template's mask token was lost in tokenization")
    return units, monitor_index, unit_words, unit_spans


def _insert_prompt_slots(tokenizer, prompt_len: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         token_type_ids: torch.Tensor | None, units: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Make room for the soft prompt right after the first token, so [CLS] stays at index 0; the
    backbone overwrites these slots' hidden states, and they belong to no user word."""
    batch = input_ids.shape[0]
    fill = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def splice(t: torch.Tensor, value: int) -> torch.Tensor:
        slots = torch.full((batch, prompt_len), value, dtype=t.dtype)
        return torch.cat([t[:, :1], slots, t[:, 1:]], dim=1)

    input_ids = splice(input_ids, fill)
    attention_mask = splice(attention_mask, 1)
    if token_type_ids is not None:
        token_type_ids = splice(token_type_ids, 0)
    return input_ids, attention_mask, token_type_ids, splice(units, -1)


def encode(
    tokenizer,
    texts: Sequence[str],
    text_pairs: Sequence[str] | None = None,
    *,
    template: str | None = None,
    prompt_len: int = 0,
    max_length: int = 128,
    normalize: bool = True,
) -> EncodedBatch:
    """Tokenize a batch. `template` (single texts only) is a cloze pattern holding `{text}` and
    `{mask}`, e.g. "{text} It was {mask} ."; the monitored index is then the template's [MASK]."""
    _check_request(texts, text_pairs, template)
    texts = [normalize_text(t) if normalize else t for t in texts]
    pairs = [normalize_text(t) if normalize else t for t in text_pairs] if text_pairs is not None else None
    budget = _text_budget(max_length, prompt_len)
    enc, cloze = _tokenize(tokenizer, texts, pairs, template, budget)
    units, monitor_index, unit_words, unit_spans = _map_units(enc, texts, pairs, cloze)
    input_ids, attention_mask, token_type_ids = enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids")
    if prompt_len:
        input_ids, attention_mask, token_type_ids, units = _insert_prompt_slots(
            tokenizer, prompt_len, input_ids, attention_mask, token_type_ids, units)
        if template is not None:
            monitor_index = monitor_index + prompt_len
    return EncodedBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        token_type_ids=token_type_ids,
        units=units,
        unit_words=unit_words,
        unit_spans=unit_spans,
        monitor_index=monitor_index,
        texts=list(texts),
        text_pairs=list(pairs) if pairs is not None else None,
        prompt_len=prompt_len,
    )


def remove_units(text: str, spans: Sequence[tuple[int, int, int]], drop: set[int], seq: int) -> str:
    """`text` with the words in `drop` (indices into `spans`, for sequence `seq`) cut out."""
    cuts = sorted((s, e) for i, (q, s, e) in enumerate(spans) if i in drop and q == seq)
    out, pos = [], 0
    for start, end in cuts:
        out.append(text[pos:start])
        pos = max(pos, end)
    out.append(text[pos:])
    return _SPACES.sub(" ", " ".join(out)).strip()
