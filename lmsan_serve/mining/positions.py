"""Which encoder outputs a mining job covers, and how its per-position runs add up to one file.

A task-agnostic backdoor drives whichever output the victim's classifier reads: POR and NeuBA the
[CLS] output or the pooler over it, BToP the [MASK] output of a cloze template. The defender who
mines an encoder need not know which output their prompts read, and an encoder often serves
several prompts, so by default a job mines every output this encoder has, one run per position,
each the single-position job it would be if told that position (its own checkpoint, stopping
rule and aimed rounds); a told position narrows the job to it (docs/mining.md, Positions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..backbone import Backbone
from ..errors import LmsanError
from ..kinds import Position
from ..signatures import PVRecord
from .config import MiningConfig

# The order positions are mined in: [CLS] first, as every encoder has it and most reference
# attacks drive it; then the pooler over it; [MASK] last, as only cloze prompts read it.
ORDER = (Position.CLS, Position.POOLER, Position.MASK)


def mined_positions(backbone: Backbone, config: MiningConfig) -> tuple[list[Position], dict[str, str]]:
    """The positions the job mines, in order, and why each other position of ORDER is left out
    (only when none was told: a told position this encoder lacks is an error)."""
    if config.position is not None:
        why = backbone.supports_position(config.position)
        if why:
            raise LmsanError(why)
        return [Position(config.position)], {}
    covered: list[Position] = []
    unsupported: dict[str, str] = {}
    for position in ORDER:
        why = backbone.supports_position(position)
        if why:
            unsupported[position.value] = why
        else:
            covered.append(position)
    return covered, unsupported


def checkpoint_path(out: Path, position: Position | str) -> Path:
    """The checkpoint of one position's run, beside the signature file."""
    return out.with_name(f"{out.name}.{Position(position).value}.ckpt.json")


def legacy_checkpoint(out: Path) -> Path:
    """Where a single-position `lmsan mine` of older versions kept its checkpoint."""
    return out.with_name(out.name + ".ckpt.json")


def legacy_checkpoint_problem(out: Path) -> str | None:
    """Why `--resume` cannot go on beside `out`: an older, single-position job's checkpoint is there
    (`<out>.ckpt.json`) and no checkpoint of a position is. Its rounds are those of one position's
    run, so renaming it to that position's checkpoint resumes them; silently starting over instead
    would throw them away. None when there is no such file."""
    legacy = legacy_checkpoint(out)
    if not legacy.is_file() or any(checkpoint_path(out, p).is_file() for p in ORDER):
        return None
    try:
        target = checkpoint_path(out, json.loads(legacy.read_text(encoding="utf-8"))["config"]["position"]).name
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        target = f"{out.name}.<position>.ckpt.json"
    return (f"checkpoint {legacy} is a single-position job's: rename it to {target} to resume it, "
            "or delete it to start over")


@dataclass
class PositionRun:
    """What mining found at one position: its calibrated PVs [K, H] with their records, every
    round it ran in seed order (checkpoint records), and how its run ended."""

    position: Position
    pvs: torch.Tensor
    records: list[PVRecord]
    rounds: list[dict]
    seconds: float
    distance_th: float
    stop: dict | None  # search mode: `job._Rounds.stop_record`
    prior: int = 0  # PVs this position's search started from (`seen_through_cls`)

    def summary(self) -> dict:
        """This position's entry in the mining record's `positions` and the CLI's JSON."""
        return {"rounds": len(self.rounds), "seconds": round(self.seconds, 1), "pvs": len(self.records),
                "distance_th": self.distance_th, **({"stop": self.stop} if self.stop else {}),
                **({"seen_through_cls": self.prior} if self.prior else {})}


def overall_stop(runs: list[PositionRun]) -> dict | None:
    """How a search over several positions ended, in the one-position record's keys: exhausted
    only if every position's stopping rule ended its run (else the reason of the first that was
    cut short, which `--resume` with a larger budget continues); the fewest rounds any position
    went without a new PV; aimed rounds and the PVs they added summed. None in detect mode."""
    stops = [r.stop for r in runs if r.stop is not None]
    if not stops:
        return None
    cut = [s for s in stops if not s["exhausted"]]
    return {"reason": (cut or stops)[0]["reason"], "patience": stops[0]["patience"],
            "rounds_since_last_pv": min(s["rounds_since_last_pv"] for s in stops), "exhausted": not cut,
            "probes": sum(s["probes"] for s in stops), "probe_pvs": sum(s["probe_pvs"] for s in stops)}


def coverage(runs: list[PositionRun], positions: list[Position], unsupported: dict[str, str]) -> dict:
    """The mining record's account of the positions: each covered one's summary, those a detect
    job did not reach because an earlier one gave its verdict, and those this encoder lacks."""
    covered = {r.position.value: r.summary() for r in runs}
    skipped = [p.value for p in positions if p.value not in covered]
    return {"positions": covered, **({"not_covered": skipped} if skipped else {}),
            **({"unsupported": unsupported} if unsupported else {})}


@torch.no_grad()
def seen_through_cls(backbone: Backbone, position: Position, runs: list[PositionRun]) -> torch.Tensor | None:
    """[K, H] the pooler's output for each [CLS] PV already mined, when `position` is the pooler.

    The pooler is a function of the [CLS] output, so a trigger that collapses [CLS] onto a PV also
    collapses the pooler onto that PV's image: a backdoor the [CLS] PVs already describe, which a
    guard watching [CLS] flags. The pooler's search starts from these images, steered away from them
    and counting a round that lands on one as a repeat, so that it looks for what [CLS] does not
    show (a backdoor trained on the pooler alone) rather than finding every [CLS] backdoor again.
    None for other positions, or when no [CLS] PV was found."""
    if position != Position.POOLER:
        return None
    cls_pvs = [r.pvs for r in runs if r.position == Position.CLS and len(r.pvs)]
    if not cls_pvs:
        return None
    pvs = cls_pvs[0].to(backbone.device)
    index = torch.zeros(len(pvs), dtype=torch.long, device=backbone.device)
    return backbone.select(pvs[:, None, :], Position.POOLER, index).float().cpu()
