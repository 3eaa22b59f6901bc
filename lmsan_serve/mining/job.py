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
from typing import TYPE_CHECKING, TypedDict

import torch
from tqdm.auto import tqdm

from ..backbone import Backbone
from ..errors import LmsanError
from ..kinds import SearchStop
from ..monitor import PV_CAP, sign_agreement
from ..signatures import DEFAULT_THRESHOLD, PVRecord, SignatureSet
from ..storage import output_file
from .config import MiningConfig
from .model import Candidate, Prepared, prepare, resolved_distance, resolved_lr
from .modes import SearchOutcome, detect, search
from .runners import Placement, SerialRunner

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from .runners import RayRunner


# Sign agreement at which a mined PV counts as a planted one (the demo and bench/bench_mine.py).
RECOVERED = 0.9


def recovered(planted: torch.Tensor, mined: torch.Tensor, agreement: float = RECOVERED) -> int:
    """How many planted PVs [P, H] some mined PV [M, H] matches with sign agreement >= `agreement`."""
    if not len(planted) or not len(mined):
        return 0
    return int((sign_agreement(planted, mined).max(dim=1).values >= agreement).sum())


class RoundRecord(TypedDict):
    """One finished round as the checkpoint keeps it (written by `_candidate_record`, checked by
    `_read_checkpoint`). A plain dict at run time, so the checkpoint JSON is the dict as built."""

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




@dataclass
class MiningResult:
    signatures: SignatureSet
    candidates: list[dict]
    rounds: int
    seconds: float
    stop: dict | None = None  # search mode: why it stopped (`_Rounds.stop_record`)

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


def _read_checkpoint(ckpt: Path, fingerprint: str, identity: dict, hidden_size: int) -> dict[int, RoundRecord]:
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


def _candidate_record(c: Candidate, where: Placement, key: int) -> RoundRecord:
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


def calibrate(
    backbone: Backbone, pvs: torch.Tensor, lines: list[str], config: MiningConfig,
    floors: list[float | None] | None = None,
) -> tuple[list[float | None], list[float]]:
    """Per PV: the smallest threshold (at least the paper's 0.8) that flags at most `target_fpr`
    of the clean held-out lines, and the false-flag rate it gives; None where no threshold up to
    the PV's cap separates it from clean outputs.

    The cap is PV_CAP, or the PV's `floors` entry where higher: a PV whose triggered outputs all
    but coincide with it in sign can take a threshold above the few clean lines that reach PV_CAP
    and still flag its trigger, where a fixed cap had to drop it (docs/mining.md, Why the
    thresholds)."""
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
    device: str | None = None,
    sign_key: Ed25519PrivateKey | None = None,
) -> MiningResult:
    """Run the mining job and write the signature file to `out` (signed with `sign_key`, an Ed25519
    private key from `signing.load_private_key`, when given).

    `workers` > 1 or a `ray_address` runs rounds as Ray tasks (see `runners.RayRunner`) on
    `device` (auto, cpu or cuda, resolved by each task on its node; default: the kind of device
    `backbone` is on); the result is the same as a serial run with the same settings, up to float
    rounding where a round runs on another kind of device."""
    out = Path(out)
    _check_output_folder(out)
    fuzz_lines, calib_lines = _split_corpus(corpus, config)
    started = time.time()
    prepared = prepare(backbone, fuzz_lines, config)
    held = _prepare_held_out(backbone, calib_lines, config)
    settings = {"lr": resolved_lr(backbone, config), "distance_th": resolved_distance(prepared, config)}
    own_runner = runner is None
    if runner is None and (workers > 1 or ray_address):
        runner = _ray_runner(backbone, prepared, config, workers, ray_address, held, device)
    rounds = _Rounds(backbone, config, _checkpoint_path(out), started, resume, say)
    runner = runner or SerialRunner(backbone, prepared, config, held)
    bar = rounds.progress_bar(progress)
    try:
        kept_seeds = rounds.run_mode(runner, bar, settings["distance_th"])
    finally:
        bar.close()
        runner_close = getattr(runner, "close", None)
        if own_runner and runner_close:
            runner_close()
    if not rounds.in_budget() and say:
        say(f"time budget of {config.time_budget:.0f} s reached")
    records = rounds.records
    done = [records[s] for s in sorted(records)]
    pvs, pv_records = _calibrated(backbone, records, kept_seeds, calib_lines, config)
    seconds = time.time() - started
    stop = rounds.stop_record()
    sig = _signature_set(backbone, config, pvs, pv_records, {
        **config.model_dump(), **settings, "rounds": len(done), "seconds": round(seconds, 1),
        "corpus_lines": len(fuzz_lines), "calibration_lines": len(calib_lines), **({"stop": stop} if stop else {})})
    sig.save(out, sign_key=sign_key)
    summary = [{k: v for k, v in c.items() if k != "pv"} for c in done]
    return MiningResult(sig, summary, len(done), seconds, stop)


def _check_output_folder(out: Path) -> None:
    """Fail before any work when the signature file could not be written."""
    output_file(out, "the signature file")


def _split_corpus(corpus: list[str], config: MiningConfig) -> tuple[list[str], list[str]]:
    """The fuzzing lines from the start of the corpus and the calibration lines from its end; a
    corpus too small for both is split, most of it for fuzzing."""
    needed = config.lines + config.calibration_lines
    if len(corpus) < config.batch_size + 50:
        raise LmsanError(f"corpus too small: {len(corpus)} lines (need at least {config.batch_size + 50})")
    if len(corpus) >= needed:
        return corpus[: config.lines], corpus[-config.calibration_lines :]
    cut = max(config.batch_size, int(len(corpus) * 0.7))
    return corpus[:cut], corpus[cut:]


def _prepare_held_out(backbone: Backbone, calib_lines: list[str], config: MiningConfig) -> Prepared:
    """The first `held_out_lines` calibration lines, prepared for the collapse test."""
    held_lines = calib_lines[: config.held_out_lines]
    return prepare(backbone, held_lines, config.model_copy(update={"batch_size": min(config.batch_size,
                                                                                     len(held_lines))}))


def _ray_runner(backbone: Backbone, prepared: Prepared, config: MiningConfig, workers: int,
                ray_address: str | None, held: Prepared, device: str | None) -> RayRunner:
    """Rounds as Ray tasks (imported here: Ray is optional), on `device` or else the backbone's
    kind of device."""
    from .runners import RayRunner

    device = device or ("cuda" if backbone.device.type == "cuda" else "cpu")
    return RayRunner(backbone, prepared, config, workers, ray_address, device=device, held=held)


class _Rounds:
    """The finished rounds of one job by seed, resumed from the checkpoint when asked and written
    back to it after every round, with the progress bar and the time budget."""

    def __init__(self, backbone: Backbone, config: MiningConfig, ckpt: Path, started: float, resume: bool,
                 say: Callable[[str], None] | None):
        self.fingerprint, self.config, self.ckpt, self.started = backbone.fingerprint, config, ckpt, started
        self.records: dict[int, RoundRecord] = {}
        if resume and ckpt.is_file():
            self.records = _read_checkpoint(ckpt, backbone.fingerprint, config.identity(), backbone.hidden_size)
            if say:
                say(f"resuming: {len(self.records)} rounds already done")
        self.seeds = list(range(config.first_seed, config.first_seed + config.rounds))
        self.search: SearchOutcome | None = None  # set by a search-mode run

    def stop_record(self) -> dict | None:
        """How a search ended, for the signature file and the JSON summaries; None in detect mode."""
        if self.search is None:
            return None
        stop = self.search.stop
        return {"reason": stop.value, "patience": self.config.patience,
                "rounds_since_last_pv": self.search.since_last_pv, "exhausted": stop == SearchStop.EXHAUSTED,
                "probes": self.search.probes, "probe_pvs": self.search.probe_pvs}

    def in_budget(self) -> bool:
        return self.config.time_budget is None or time.time() - self.started <= self.config.time_budget

    def progress_bar(self, progress: bool) -> tqdm:
        """A bar over every seed of the job, the resumed rounds counted as done."""
        seeds = self.seeds
        return tqdm(total=len(seeds), initial=sum(s in self.records for s in seeds), desc=f"mine {self.config.mode}",
                    disable=not progress, unit="round")

    def run_mode(self, runner: SerialRunner | RayRunner, bar: tqdm, unique_th: float) -> list[int]:
        """Run the rounds the mode needs with `runner`; the seeds whose PVs are kept, in seed order."""
        config, records, seeds = self.config, self.records, self.seeds

        def run(todo: list[int], found: torch.Tensor | None, done: Callable[[], bool],
                aims: dict[int, torch.Tensor] | None = None) -> None:
            """Run `todo` (stopping once `done()`), checkpointing every finished round."""
            for key, cand, where in runner.run(todo, found, self.in_budget, aims):
                records[key] = _candidate_record(cand, where, key)
                self._save()
                bar.update(1)
                if done():
                    break

        if config.mode == "detect":
            return detect(seeds, records, run)
        self.search = search(seeds, records, run, config, unique_th, bar)
        return self.search.kept

    def _save(self) -> None:
        """Write every finished round, in seed order, to the checkpoint."""
        _write_json_atomic(self.ckpt, {"fingerprint": self.fingerprint, "config": self.config.identity(),
                                       "candidates": [self.records[k] for k in sorted(self.records)]})


def _calibrated(backbone: Backbone, records: dict[int, RoundRecord], kept_seeds: list[int], calib_lines: list[str],
                config: MiningConfig) -> tuple[torch.Tensor, list[PVRecord]]:
    """The kept PVs [K, H] that some threshold separates from clean text, with their records; the
    others are marked in `records` as dropped."""
    pvs = (torch.stack([torch.tensor(records[s]["pv"]) for s in kept_seeds]) if kept_seeds
           else torch.zeros(0, backbone.hidden_size))
    pv_records: list[PVRecord] = []
    keep_idx: list[int] = []
    if kept_seeds:
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
    return (pvs[keep_idx] if keep_idx else torch.zeros(0, backbone.hidden_size)), pv_records


def _signature_set(backbone: Backbone, config: MiningConfig, pvs: torch.Tensor, pv_records: list[PVRecord],
                   mining: dict) -> SignatureSet:
    """The signature file's contents: the calibrated PVs of this backbone, the verdict they give,
    and how they were mined."""
    return SignatureSet.create(
        pvs,
        pv_records,
        backbone_name=backbone.name,
        fingerprint=backbone.fingerprint,
        model_type=backbone.model_type,
        position=config.position,
        verdict="backdoored" if pv_records else "clean",
        mining=mining,
    )
