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

import torch
from tqdm.auto import tqdm

from ..backbone import Backbone
from ..errors import LmsanError
from ..monitor import sign_agreement
from ..signatures import DEFAULT_THRESHOLD, PVRecord, SignatureSet
from .config import MiningConfig
from .model import Candidate, fuzz_round, prepare, resolved_distance, resolved_lr

# A PV whose calibrated threshold would have to exceed this cannot be told apart from clean text.
MAX_THRESHOLD = 0.97


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


def _candidate_record(c: Candidate) -> dict:
    return {
        "seed": c.seed,
        "kept": not c.reasons,
        "distance": round(c.distance, 6),
        "entropy_ratio": round(c.entropy_ratio, 6),
        "epochs": c.epochs,
        "seconds": round(c.seconds, 2),
        "reasons": c.reasons,
        "pv": c.pv.tolist() if c.pv is not None and not c.reasons else None,
    }


def calibrate(
    backbone: Backbone, pvs: torch.Tensor, lines: list[str], config: MiningConfig
) -> tuple[list[float | None], list[float]]:
    """Per PV: the smallest threshold (at least the paper's 0.8) that flags at most `target_fpr`
    of the clean held-out lines, and the false-flag rate it gives; None where no threshold up to
    MAX_THRESHOLD separates the PV from clean outputs."""
    prepared = prepare(backbone, lines, config.model_copy(update={"batch_size": min(config.batch_size, len(lines))}))
    scores = sign_agreement(prepared.clean, pvs.to(prepared.clean.device)).cpu()  # [N, K]
    thresholds: list[float | None] = []
    rates: list[float] = []
    for k in range(pvs.shape[0]):
        col = scores[:, k]
        q = float(torch.quantile(col, 1 - config.target_fpr))
        th = max(DEFAULT_THRESHOLD, q + 1.0 / pvs.shape[1])
        if th > MAX_THRESHOLD:
            thresholds.append(None)
            rates.append(float((col > MAX_THRESHOLD).float().mean()))
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
) -> MiningResult:
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
    settings = {"lr": resolved_lr(backbone, config), "distance_th": resolved_distance(prepared, config)}

    ckpt = _checkpoint_path(out)
    done: list[dict] = []
    if resume and ckpt.is_file():
        try:
            state = json.loads(ckpt.read_text())
        except json.JSONDecodeError as exc:
            raise LmsanError(f"checkpoint {ckpt} is corrupt; delete it to start over") from exc
        if state.get("fingerprint") != backbone.fingerprint or state.get("config") != config.model_dump():
            raise LmsanError(f"checkpoint {ckpt} was made for another model or other settings")
        done = state["candidates"]
        if say:
            say(f"resuming: {len(done)} rounds already done")
    kept = [torch.tensor(c["pv"]) for c in done if c["kept"]]
    seeds_done = {c["seed"] for c in done}
    bar = tqdm(total=config.rounds, initial=len(done), desc=f"mine {config.mode}", disable=not progress,
               unit="round")
    for seed in range(config.first_seed, config.first_seed + config.rounds):
        if config.mode == "detect" and kept:
            break
        if seed in seeds_done:
            continue
        if config.time_budget is not None and time.time() - started > config.time_budget:
            if say:
                say(f"time budget of {config.time_budget:.0f} s reached")
            break
        found = torch.stack(kept).to(backbone.device) if kept else None
        cand = fuzz_round(backbone, prepared, config, seed, found)
        record = _candidate_record(cand)
        done.append(record)
        if record["kept"]:
            kept.append(cand.pv.cpu())
        _write_json_atomic(ckpt, {"fingerprint": backbone.fingerprint, "config": config.model_dump(),
                                  "candidates": done})
        bar.update(1)
        bar.set_postfix(pvs=len(kept))
    bar.close()

    pvs = torch.stack(kept) if kept else torch.zeros(0, backbone.hidden_size)
    records: list[PVRecord] = []
    keep_idx: list[int] = []
    if kept:
        thresholds, rates = calibrate(backbone, pvs, calib_lines, config)
        kept_records = [c for c in done if c["kept"]]
        for i, (c, th, rate) in enumerate(zip(kept_records, thresholds, rates, strict=True)):
            if th is None:
                c["reasons"].append("no threshold separates it from clean text")
                c["kept"] = False
                continue
            keep_idx.append(i)
            records.append(PVRecord(origin="mined", seed=c["seed"], threshold=th, false_positive_rate=rate,
                                    scores={"distance": c["distance"], "entropy_ratio": c["entropy_ratio"]}))
    pvs = pvs[keep_idx] if keep_idx else torch.zeros(0, backbone.hidden_size)
    seconds = time.time() - started
    sig = SignatureSet.create(
        pvs,
        records,
        backbone_name=backbone.name,
        fingerprint=backbone.fingerprint,
        model_type=backbone.model_type,
        position=config.position,
        verdict="backdoored" if records else "clean",
        mining={**config.model_dump(), **settings, "rounds": len(done), "seconds": round(seconds, 1),
                "corpus_lines": len(fuzz_lines), "calibration_lines": len(calib_lines)},
    )
    sig.save(out)
    summary = [{k: v for k, v in c.items() if k != "pv"} for c in done]
    return MiningResult(sig, summary, len(done), seconds)
