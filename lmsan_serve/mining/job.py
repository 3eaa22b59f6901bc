"""The mining job: rounds of fuzz training, the filters, calibration on held-out clean text, a
checkpoint after every round, and the signature file with the verdict."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..backbone import Backbone
from ..errors import LmsanError
from ..monitor import PV_CAP, sign_agreement
from ..signatures import DEFAULT_THRESHOLD, PVRecord, SignatureSet
from .config import MiningConfig
from .model import Candidate, duplicate, prepare, resolved_distance, resolved_lr
from .runners import SerialRunner

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


# Sign agreement at which a mined PV counts as a planted one (the demo and bench/bench_mine.py).
RECOVERED = 0.9


def recovered(planted: torch.Tensor, mined: torch.Tensor, agreement: float = RECOVERED) -> int:
    """How many planted PVs [P, H] some mined PV [M, H] matches with sign agreement >= `agreement`."""
    if not len(planted) or not len(mined):
        return 0
    return int((sign_agreement(planted, mined).max(dim=1).values >= agreement).sum())


@dataclass
class MiningResult:
    signatures: SignatureSet
    candidates: list[dict]
    rounds: int
    seconds: float

    @property
    def verdict(self) -> str:
        return self.signatures.meta.verdict


def _checkpoint_path(out: Path) -> Path:
    return out.with_name(out.name + ".ckpt.json")


def _write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _read_checkpoint(ckpt: Path, fingerprint: str, identity: dict, hidden_size: int) -> dict[int, dict]:
    """The finished rounds of a checkpoint, each checked to be what `_candidate_record` writes."""
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


def stale_checkpoint(out: str | Path, backbone: Backbone, config: MiningConfig) -> Path | None:
    """The checkpoint beside `out` when it exists but cannot be resumed with `config` (another
    model, other settings, or unreadable), so a caller that caches runs can start over."""
    ckpt = _checkpoint_path(Path(out))
    if not ckpt.is_file():
        return None
    try:
        _read_checkpoint(ckpt, backbone.fingerprint, config.identity(), backbone.hidden_size)
    except LmsanError:
        return ckpt
    return None


def _candidate_record(c: Candidate) -> dict:
    """A finished round as the checkpoint keeps it. `filters` are the round's own verdicts; `kept`
    and `reasons` are set when the job merges rounds (uniqueness across a wave, detect's stop)."""
    return {
        "seed": c.seed,
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
    }


def _detect(seeds: list[int], records: dict[int, dict], run) -> list[int]:
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


def _search(seeds: list[int], records: dict[int, dict], run, wave: int, unique_th: float, same_agreement: float,
            bar) -> list[int]:
    """Waves of `wave` rounds, each started from the PVs kept before it, merged in seed order."""
    kept: list[int] = []
    for w in range(0, len(seeds), wave):
        members = seeds[w : w + wave]
        todo = [s for s in members if s not in records]
        if todo:
            found = torch.stack([torch.tensor(records[s]["pv"]) for s in kept]) if kept else None
            run(todo, found, lambda: False)
            if any(s not in records for s in members):
                break  # the time budget ran out inside this wave; its rounds stay for --resume
        for s in members:
            rec = records[s]
            rec["reasons"] = list(rec["filters"])
            rec["kept"] = False
            if rec["filters"]:
                continue
            why = duplicate(torch.tensor(rec["pv"]), torch.tensor([records[k]["pv"] for k in kept]) if kept else None,
                            unique_th, same_agreement)
            if why:
                rec["reasons"].append(why)
                continue
            rec["kept"] = True
            kept.append(s)
        bar.set_postfix(pvs=len(kept))
    return kept


def calibrate(
    backbone: Backbone, pvs: torch.Tensor, lines: list[str], config: MiningConfig,
    floors: list[float | None] | None = None,
) -> tuple[list[float | None], list[float]]:
    """Per PV: the smallest threshold (at least the paper's 0.8) that flags at most `target_fpr`
    of the clean held-out lines, and the false-flag rate it gives; None where no threshold up to
    the PV's cap separates it from clean outputs.

    The cap is PV_CAP (0.97), or the PV's `floors` entry where higher: a PV whose triggered outputs
    all but coincide with it in sign (NeuBA on MiniLM: 0.9996 on average) can take a threshold above
    the few clean lines that reach 0.97 (0.75% of them, none above 0.982) and still flag its
    trigger, where a fixed cap of 0.97 had to drop it."""
    prepared = prepare(backbone, lines, config.model_copy(update={"batch_size": min(config.batch_size, len(lines))}))
    scores = sign_agreement(prepared.clean, pvs.to(prepared.clean.device)).cpu()  # [N, K]
    thresholds: list[float | None] = []
    rates: list[float] = []
    for k in range(pvs.shape[0]):
        col = scores[:, k]
        q = float(torch.quantile(col, 1 - config.target_fpr))
        th = max(DEFAULT_THRESHOLD, q + 1.0 / pvs.shape[1])
        cap = max(PV_CAP, (floors[k] if floors else None) or 0.0)
        if th > cap:
            thresholds.append(None)
            rates.append(float((col > cap).float().mean()))
            continue
        thresholds.append(round(th, 6))
        rates.append(float((col > th).float().mean()))
    return thresholds, rates


def mine(
    backbone: Backbone,
    config: MiningConfig,
    corpus: list[str],
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
    runner=None,
    workers: int = 1,
    ray_address: str | None = None,
    sign_key: Ed25519PrivateKey | None = None,
) -> MiningResult:
    """Run the mining job and write the signature file to `out` (signed with `sign_key`, an Ed25519
    private key from `signing.load_private_key`, when given).

    `workers` > 1 or a `ray_address` runs rounds as Ray tasks (see `runners.RayRunner`); the
    result is the same as a serial run with the same settings."""
    out = Path(out)
    if not out.parent.is_dir():
        raise LmsanError(f"output folder does not exist: {out.parent}")
    if not os.access(out.parent, os.W_OK):
        raise LmsanError(f"output folder is not writable: {out.parent}")
    needed = config.lines + config.calibration_lines
    if len(corpus) < config.batch_size + 50:
        raise LmsanError(f"corpus too small: {len(corpus)} lines (need at least {config.batch_size + 50})")
    if len(corpus) >= needed:
        fuzz_lines, calib_lines = corpus[: config.lines], corpus[-config.calibration_lines :]
    else:  # small corpus: split it, most for fuzzing
        cut = max(config.batch_size, int(len(corpus) * 0.7))
        fuzz_lines, calib_lines = corpus[:cut], corpus[cut:]
    started = time.time()
    prepared = prepare(backbone, fuzz_lines, config)
    held_lines = calib_lines[: config.held_out_lines]
    held = prepare(backbone, held_lines, config.model_copy(update={"batch_size": min(config.batch_size,
                                                                                     len(held_lines))}))
    settings = {"lr": resolved_lr(backbone, config), "distance_th": resolved_distance(prepared, config)}
    own_runner = runner is None
    if runner is None and (workers > 1 or ray_address):
        from .runners import RayRunner

        runner = RayRunner(backbone, prepared, config, workers, ray_address,
                           device="cuda" if backbone.device.type == "cuda" else "cpu",
                           gpus_per_round=1.0 if backbone.device.type == "cuda" else 0.0, held=held)

    ckpt = _checkpoint_path(out)
    records: dict[int, dict] = {}
    if resume and ckpt.is_file():
        records = _read_checkpoint(ckpt, backbone.fingerprint, config.identity(), backbone.hidden_size)
        if say:
            say(f"resuming: {len(records)} rounds already done")
    seeds = list(range(config.first_seed, config.first_seed + config.rounds))
    runner = runner or SerialRunner(backbone, prepared, config, held)
    bar = tqdm(total=len(seeds), initial=sum(s in records for s in seeds), desc=f"mine {config.mode}",
               disable=not progress, unit="round")

    def in_budget() -> bool:
        return config.time_budget is None or time.time() - started <= config.time_budget

    def run(todo: list[int], found: torch.Tensor | None, done: Callable[[], bool]) -> None:
        """Run `todo` (stopping once `done()`), checkpointing every finished round."""
        for seed, cand in runner.run(todo, found, in_budget):
            records[seed] = _candidate_record(cand)
            _write_json_atomic(ckpt, {"fingerprint": backbone.fingerprint, "config": config.identity(),
                                      "candidates": [records[k] for k in sorted(records)]})
            bar.update(1)
            if done():
                break

    try:
        if config.mode == "detect":
            kept_seeds = _detect(seeds, records, run)
        else:
            kept_seeds = _search(seeds, records, run, config.wave, settings["distance_th"], config.same_pv_agreement,
                                 bar)
    finally:
        bar.close()
        runner_close = getattr(runner, "close", None)
        if own_runner and runner_close:
            runner_close()
    if not in_budget() and say:
        say(f"time budget of {config.time_budget:.0f} s reached")
    done = [records[s] for s in sorted(records)]
    kept = [torch.tensor(records[s]["pv"]) for s in kept_seeds]

    pvs = torch.stack(kept) if kept else torch.zeros(0, backbone.hidden_size)
    pv_records: list[PVRecord] = []
    keep_idx: list[int] = []
    if kept:
        kept_records = [records[s] for s in kept_seeds]
        thresholds, rates = calibrate(backbone, pvs, calib_lines, config, [c.get("floor") for c in kept_records])
        for i, (c, th, rate) in enumerate(zip(kept_records, thresholds, rates, strict=True)):
            if th is None:
                c["reasons"].append("no threshold separates it from clean text")
                c["kept"] = False
                continue
            keep_idx.append(i)
            pv_records.append(PVRecord(origin="mined", seed=c["seed"], threshold=th, false_positive_rate=rate,
                                       scores={"distance": c["distance"], "entropy_ratio": c["entropy_ratio"],
                                               "dispersion": c["dispersion"]}))
    pvs = pvs[keep_idx] if keep_idx else torch.zeros(0, backbone.hidden_size)
    seconds = time.time() - started
    sig = SignatureSet.create(
        pvs,
        pv_records,
        backbone_name=backbone.name,
        fingerprint=backbone.fingerprint,
        model_type=backbone.model_type,
        position=config.position,
        verdict="backdoored" if pv_records else "clean",
        mining={**config.model_dump(), **settings, "rounds": len(done), "seconds": round(seconds, 1),
                "corpus_lines": len(fuzz_lines), "calibration_lines": len(calib_lines)},
    )
    sig.save(out, sign_key=sign_key)
    summary = [{k: v for k, v in c.items() if k != "pv"} for c in done]
    return MiningResult(sig, summary, len(done), seconds)
