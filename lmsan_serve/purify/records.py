"""What the purge steps (`purifier.Purifier`) pass around: each row's words, one typed record per
deletion variant, and the results and costs they return."""


from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto

import torch

from ..encoding import EncodedBatch

# margins(input_ids, attention_mask, token_type_ids, monitor_index) -> [N] score minus threshold
# of the best PV (positive = flagged), for a batch of variants.
Scorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]


@dataclass
class PurifyResult:
    ok: bool  # the found words silence the monitor
    removed: list[str] = field(default_factory=list)  # distinct lower-cased words dropped
    drop_units: set[int] = field(default_factory=set)  # unit indices (every copy) dropped
    reason: str = ""
    variants: int = 0
    tentative: bool = False  # one word found and not yet verified: the caller's own pass verifies it
    found_types: set[int] = field(default_factory=set)  # for a follow-up call (`start_from`)
    grouped: bool = False  # the group tests (1a/1b) ran for this row
    exhausted: bool = False  # stopped by the work bound (variants or rounds), not by a verdict
    alone: set[int] = field(default_factory=set)  # word types a keep-only test found firing by themselves

    @property
    def lone_word(self) -> bool:
        """The purge removed one word type, and it fires by itself: a single-word trigger."""
        return len(self.found_types) == 1 and self.found_types <= self.alone


@dataclass
class PurifyStats:
    passes: int = 0  # batched forward passes
    variants: int = 0  # variant rows scored in total


@dataclass
class RowWords:
    """The user words of one row of a batch, as variants address them: word types (distinct
    lower-cased words, in order of first occurrence), each token's type, and the tokens present."""

    types: list[str]
    unit_type: list[int]  # word unit -> type index
    tok_type: torch.Tensor  # [L] token -> type index, -1 for tokens that are not user words
    present: torch.Tensor  # [L] bool: tokens a variant may keep (soft-prompt slots left out)

    @classmethod
    def of(cls, batch: EncodedBatch, r: int) -> RowWords:
        words = batch.unit_words[r]
        types = list(dict.fromkeys(words))
        index = {w: i for i, w in enumerate(types)}
        unit_type = [index[w] for w in words]
        units = batch.units[r].cpu()
        table = torch.tensor(unit_type + [-1], dtype=torch.long)
        tok_type = table[torch.where(units >= 0, units, len(words))].to(batch.input_ids.device)
        # Soft-prompt slots are left out: variants are scored on the bare encoder, whose outputs
        # the PVs describe, and short variants are cheap.
        present = batch.attention_mask[r].bool().clone()
        present[1 : 1 + batch.prompt_len] = False
        return cls(types, unit_type, tok_type, present)

    def _selected(self, chosen: set[int]) -> torch.Tensor:
        sel = torch.zeros(len(self.types) + 1, dtype=torch.bool, device=self.tok_type.device)
        sel[list(chosen)] = True
        return sel[self.tok_type]  # index -1 reads the spare slot, which stays False

    def keep_only(self, keep: set[int]) -> torch.Tensor:
        """Attention mask of the variant that keeps the word types `keep` and the special tokens."""
        return (self.present & ((self.tok_type < 0) | self._selected(keep))).long()

    def delete(self, drop: set[int]) -> torch.Tensor:
        """Attention mask of the variant with every copy of the word types `drop` deleted."""
        return (self.present & ~((self.tok_type >= 0) & self._selected(drop))).long()

    def attention(self, saliency: torch.Tensor) -> torch.Tensor:
        """Attention the monitored token gives each word type (its strongest token); special
        tokens and soft-prompt slots are left out, and a type with no token present scores -inf."""
        sal = saliency.to(self.tok_type.device).float()
        words = (self.tok_type >= 0) & self.present
        score = torch.full((len(self.types),), float("-inf"), device=self.tok_type.device)
        return score.scatter_reduce(0, self.tok_type[words], sal[words], reduce="amax")

    def neighbours(self, chosen: set[int], window: int) -> set[int]:
        """Word types within `window` words of any occurrence of the types `chosen`."""
        near: set[int] = set()
        for u, t in enumerate(self.unit_type):
            if t in chosen:
                near.update(self.unit_type[max(0, u - window) : u + window + 1])
        return near


class VariantKind(Enum):
    """What a deletion variant (steps 2-4) tests, so each step reads its margins by kind."""

    VERIFY = auto()  # 2: every word type found deleted
    EXTEND = auto()  # 3: those found and one more
    BASE = auto()  # 4: nothing deleted, the full text's own margin
    SOLE = auto()  # a found word deleted alone
    SPARE = auto()  # every found word but one deleted, to see whether that one fires alone
    CONFIRM = auto()  # the words proposed to go, deleted together
    PARTNER = auto()  # a neighbour of a trigger's word deleted alone
    AFTER = auto()  # a neighbour deleted on top of the words proposed


@dataclass
class Deletion:
    """A deletion variant of one row: its full text with every copy of the word types `drop`
    deleted. `word` is the word type it tests, where it tests one."""

    row: int
    kind: VariantKind
    drop: set[int]
    word: int | None = None

    @property
    def key(self) -> tuple[int, VariantKind, int | None]:
        return self.row, self.kind, self.word


@dataclass
class Pruned:
    """One row after the first prune pass (step 4)."""

    base: float  # margin of the full text, nothing deleted
    keep: set[int]  # found word types that stay found
    sole: set[int]  # of those, the ones whose deletion alone silences the input: a trigger's words


@dataclass
class PurgeCall:
    """What the steps of one `purify` or `probe` call share: its batch and scorer, and per row the
    words, the result so far and the word types found so far."""

    batch: EncodedBatch
    scorer: Scorer
    words: dict[int, RowWords]
    results: dict[int, PurifyResult]
    found: dict[int, set[int]]
    stats: PurifyStats = field(default_factory=PurifyStats)
