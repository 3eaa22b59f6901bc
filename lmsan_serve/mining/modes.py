"""What the rounds mean in each mode: detect stops at the first PV; search keeps every new one
until its stopping rule, then probes the opposite of each (`probe`). Both take a `RunRounds` that
runs rounds and records them, so they decide the same whichever runner ran the rounds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..kinds import SearchStop
from .config import MiningConfig
from .model import duplicate
from .probe import probe_key, probed_seed

if TYPE_CHECKING:
    from .checkpoint import RoundRecord

# Runs rounds for `_detect` and `_search`: (round keys to run, PVs found so far, stop early when true,
# the aims of aimed rounds by key).
RunRounds = Callable[..., None]


def search(seeds: list[int], records: dict[int, RoundRecord], run: RunRounds, config: MiningConfig,
           unique_th: float, bar: tqdm, prior: torch.Tensor | None = None) -> SearchOutcome:
    """Fuzz rounds until the stopping rule (`_search`), then the aimed rounds (`_probe_opposites`)
    unless the time budget ended it or `config.probe_opposites` is off.

    `prior` [P, H]: PVs known before the search (the pooler images of the [CLS] PVs): rounds are
    steered away from them and a round that lands on one is a repeat, but they are not kept."""
    outcome = _search(seeds, records, run, config, unique_th, bar, prior)
    if config.probe_opposites and outcome.stop != SearchStop.TIME_BUDGET:
        _probe_opposites(outcome, records, run, config, unique_th, bar, prior)
    return outcome


def _found(records: dict[int, RoundRecord], kept: list[int], prior: torch.Tensor | None) -> torch.Tensor | None:
    """[P + K, H] the PVs a round must steer away from and not repeat: `prior`, then the kept ones."""
    rows = ([prior] if prior is not None and len(prior) else []) + [torch.tensor(records[s]["pv"])[None] for s in kept]
    return torch.cat(rows) if rows else None


def detect(seeds: list[int], records: dict[int, RoundRecord], run: RunRounds) -> list[int]:
    """The lowest seed whose round passed the filters, as a serial run would stop at it."""

    def first_kept() -> int | None:
        for s in seeds:
            if s not in records:
                return None
            if not records[s]["filters"]:
                return s
        return None

    if first_kept() is None:
        run([s for s in seeds if s not in records], None, lambda: first_kept() is not None)
    winner = first_kept()
    if winner is None:
        return []
    records[winner]["kept"] = True
    for s in seeds:
        if s > winner and s in records and not records[s]["filters"]:
            records[s]["reasons"] = ["not needed: detect mode stops at the first PV"]
    return [winner]


@dataclass
class SearchOutcome:
    """The seeds whose PVs search kept, in seed order, and why it stopped (`SearchStop`)."""

    kept: list[int]
    stop: SearchStop
    since_last_pv: int  # rounds merged after the last kept PV (all of them when none was kept)
    probes: int = 0  # aimed rounds run after the search (`_probe_opposites`)
    probe_pvs: int = 0  # PVs they added


def _search(seeds: list[int], records: dict[int, RoundRecord], run: RunRounds, config: MiningConfig,
            unique_th: float, bar: tqdm, prior: torch.Tensor | None = None) -> SearchOutcome:
    """Waves of `config.wave` rounds, each started from the PVs kept before it, merged in seed order,
    until `config.patience` rounds in a row kept no new PV (checked after each whole wave, so the
    stop does not depend on how many workers ran it) or a budget runs out."""
    kept: list[int] = []
    since = 0
    for w in range(0, len(seeds), config.wave):
        members = seeds[w : w + config.wave]
        todo = [s for s in members if s not in records]
        if todo:
            run(todo, _found(records, kept, prior), lambda: False)
            if any(s not in records for s in members):
                return SearchOutcome(kept, SearchStop.TIME_BUDGET, since)  # the rest stays for --resume
        for s in members:
            since = 0 if _merge(records[s], records, kept, unique_th, config.same_pv_agreement, prior) else since + 1
        bar.set_postfix(pvs=len(kept), dry=since)
        if since >= config.patience:
            return SearchOutcome(kept, SearchStop.EXHAUSTED, since)
    return SearchOutcome(kept, SearchStop.MAX_ROUNDS, since)


def _probe_opposites(outcome: SearchOutcome, records: dict[int, RoundRecord], run: RunRounds,
                     config: MiningConfig, unique_th: float, bar: tqdm, prior: torch.Tensor | None = None) -> None:
    """One round per PV that fuzz rounds kept, aimed at its sign opposite (`probe`), merged like any
    round: kept only when it passes every filter and is new. Added to `outcome.kept` and
    `outcome.probes`."""
    probes = {probe_key(s): -torch.tensor(records[s]["pv"]) for s in outcome.kept if probed_seed(s) is None}
    todo = [k for k in probes if k not in records]
    if todo:
        bar.total = (bar.total or 0) + len(todo)
        run(todo, _found(records, outcome.kept, prior), lambda: False, probes)
    for key in probes:
        if key not in records:  # the time budget ran out among them: the rest stays for --resume
            continue
        outcome.probes += 1
        outcome.probe_pvs += _merge(records[key], records, outcome.kept, unique_th, config.same_pv_agreement, prior)
    bar.set_postfix(pvs=len(outcome.kept), probes=outcome.probes)


def _merge(rec: RoundRecord, records: dict[int, RoundRecord], kept: list[int], unique_th: float,
           same_agreement: float, prior: torch.Tensor | None = None) -> bool:
    """Judge one finished round against `prior` and the PVs kept before it in seed order; True when
    it adds one (its seed is appended to `kept`)."""
    rec["reasons"] = list(rec["filters"])
    rec["kept"] = False
    if rec["filters"]:
        return False
    why = duplicate(torch.tensor(rec["pv"]), _found(records, kept, prior), unique_th, same_agreement)
    if why:
        rec["reasons"].append(why)
        return False
    rec["kept"] = True
    kept.append(rec["seed"])
    return True
