"""The checkpoint of one position's mining run: every finished round, written beside the
signature file after each, so that `--resume` continues a killed job; and which existing
checkpoints a job's settings cannot resume."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TypedDict

from ..backbone import Backbone
from ..errors import LmsanError
from ..kinds import Position
from .config import MiningConfig
from .model import Candidate
from .positions import checkpoint_path, legacy_checkpoint, mined_positions
from .runners import Placement


class RoundRecord(TypedDict):
    """One finished round as the checkpoint keeps it (written by `candidate_record`, checked by
    `read_checkpoint`). A plain dict at run time, so the checkpoint JSON is the dict as built."""

    seed: int
    kept: bool
    distance: float
    entropy_ratio: float
    dispersion: float | None
    epochs: int
    row: int | None
    self_agreement: float | None
    floor: float | None
    seconds: float
    trace: list[list[float]]
    filters: list[str]
    reasons: list[str]
    pv: list[float] | None
    node: str  # Ray node id of the node that ran the round, "local" in a serial run; absent in older checkpoints
    device: str  # the device the round ran on; absent in older checkpoints


def write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def read_checkpoint(ckpt: Path, fingerprint: str, identity: dict, hidden_size: int) -> dict[int, RoundRecord]:
    """The finished rounds of a checkpoint, each checked to be what `candidate_record` writes."""
    corrupt = f"checkpoint {ckpt} is corrupt; delete it to start over"
    try:
        state = json.loads(ckpt.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # not UTF-8, not JSON, too deep
        raise LmsanError(corrupt) from exc
    if not isinstance(state, dict):
        raise LmsanError(corrupt)
    if state.get("fingerprint") != fingerprint or state.get("config") != identity:
        raise LmsanError(f"checkpoint {ckpt} was made for another model or other settings")

    def valid(c) -> bool:
        if not isinstance(c, dict) or not all(k in c for k in ("seed", "kept", "filters", "reasons", "pv")):
            return False
        if type(c["seed"]) is not int or not isinstance(c["filters"], list) or not isinstance(c["reasons"], list):
            return False
        pv = c["pv"]
        return pv is None if c["filters"] else (isinstance(pv, list) and len(pv) == hidden_size and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in pv))

    candidates = state.get("candidates")
    if not isinstance(candidates, list) or not all(valid(c) for c in candidates):
        raise LmsanError(corrupt)
    return {c["seed"]: c for c in candidates}


def stale_checkpoints(out: str | Path, backbone: Backbone, config: MiningConfig) -> list[Path]:
    """The checkpoints beside `out` of the positions `config` mines that exist but cannot be resumed
    with it (another model, other settings, or unreadable), and an older single-position job's
    (`positions.legacy_checkpoint`), so that a caller that caches runs can start those over."""
    legacy = legacy_checkpoint(Path(out))
    stale = [legacy] if legacy.is_file() else []
    for position in mined_positions(backbone, config)[0]:
        ckpt = checkpoint_path(Path(out), position)
        if not ckpt.is_file():
            continue
        try:
            read_checkpoint(ckpt, backbone.fingerprint, at_position(config, position).identity(), backbone.hidden_size)
        except LmsanError:
            stale.append(ckpt)
    return stale


def stale_checkpoint(out: str | Path, backbone: Backbone, config: MiningConfig) -> Path | None:
    """The first of `stale_checkpoints`, or None."""
    return next(iter(stale_checkpoints(out, backbone, config)), None)


def at_position(config: MiningConfig, position: Position) -> MiningConfig:
    """The single-position job that mines `position`: its identity is that of a job told it."""
    return config.model_copy(update={"position": position})


def candidate_record(c: Candidate, where: Placement, key: int) -> RoundRecord:
    """A finished round as the checkpoint keeps it, under its key (its seed; for an aimed round the
    negative `probe.probe_key`). `filters` are the round's own verdicts; `kept` and `reasons` are
    set when the job merges rounds (uniqueness across a wave, detect's stop)."""
    return {
        "seed": key,
        "kept": False,
        "distance": round(c.distance, 6),
        "entropy_ratio": round(c.entropy_ratio, 6),
        "dispersion": round(c.dispersion, 6) if c.dispersion is not None else None,
        "epochs": c.epochs,
        "row": c.row,
        "self_agreement": round(c.self_agreement, 6) if c.self_agreement is not None else None,
        "floor": round(c.floor, 6) if c.floor is not None else None,
        "seconds": round(c.seconds, 2),
        "trace": [list(t) for t in c.trace],
        "filters": list(c.reasons),
        "reasons": list(c.reasons),
        "pv": c.pv.tolist() if c.pv is not None and not c.reasons else None,
        "node": where.node,
        "device": where.device,
    }
