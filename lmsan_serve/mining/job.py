"""The mining job: rounds of fuzz training, the filters, calibration on held-out clean text, a
checkpoint after every round, and the signature file with the verdict."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..backbone import Backbone
from ..data import clip_words
from ..errors import LmsanError
from ..kinds import MiningMode, Position, SearchStop
from ..monitor import PV_CAP, lone_word_marks, sign_agreement
from ..signatures import DEFAULT_THRESHOLD, PVRecord, SignatureSet
from ..storage import output_file
from .checkpoint import RoundRecord, at_position, candidate_record, read_checkpoint, write_json_atomic
from .config import MiningConfig
from .model import Prepared, prepare, resolved_distance, resolved_lr
from .modes import SearchOutcome, detect, search
from .positions import (
    PositionRun,
    checkpoint_path,
    coverage,
    legacy_checkpoint_problem,
    mined_positions,
    overall_stop,
    seen_through_cls,
)
from .runners import SerialRunner

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


@dataclass
class MiningResult:
    signatures: SignatureSet
    candidates: list[dict]  # every round of every position, each with its `position`
    rounds: int  # all positions together
    seconds: float
    stop: dict | None = None  # search mode: how it ended over all positions (`positions.overall_stop`)
    positions: dict[str, dict] = field(default_factory=dict)  # per covered position: `PositionRun.summary`

    @property
    def verdict(self) -> str:
        return self.signatures.meta.verdict


@dataclass
class Calibrated:
    """Per PV: its threshold (None where none up to its cap separates it from clean text), the
    false-flag rate that gives on the calibration lines, the words of those lines that fire it by
    themselves, and how many lines held one (left out of the false-flag count)."""

    thresholds: list[float | None]
    rates: list[float]
    words: list[list[str]]
    activations: list[int]


def calibrate(
    backbone: Backbone, pvs: torch.Tensor, lines: list[str], config: MiningConfig,
    floors: list[float | None] | None = None,
) -> Calibrated:
    """Per PV: the smallest threshold (at least the paper's 0.8) that flags at most `target_fpr`
    of the clean held-out lines, and the false-flag rate it gives; None where no threshold up to
    the PV's cap separates it from clean outputs. Lines that hold a word firing the PV by itself
    (`lone_word_activations`) are the backdoor at work, not false flags, and are not counted.

    The cap is PV_CAP, or the PV's `floors` entry where higher: a PV whose triggered outputs all
    but coincide with it in sign can take a threshold above the few clean lines that reach PV_CAP
    and still flag its trigger, where a fixed cap had to drop it (docs/mining.md, Why the
    thresholds)."""
    prepared = prepare(backbone, lines, config.model_copy(update={"batch_size": min(config.batch_size, len(lines))}))
    scores = sign_agreement(prepared.clean, pvs.to(prepared.clean.device)).cpu()  # [N, K]
    firing, words = lone_word_activations(backbone, lines, scores, pvs, config)
    thresholds: list[float | None] = []
    rates: list[float] = []
    for k in range(pvs.shape[0]):
        col = scores[~firing[:, k], k]
        q = float(torch.quantile(col, 1 - config.target_fpr))
        th = max(DEFAULT_THRESHOLD, q + 1.0 / pvs.shape[1])
        cap = max(PV_CAP, (floors[k] if floors else None) or 0.0)
        if th > cap:
            thresholds.append(None)
            rates.append(float((col > cap).float().mean()))
            continue
        thresholds.append(round(th, 6))
        rates.append(float((col > th).float().mean()))
    return Calibrated(thresholds, rates, words, firing.sum(dim=0).tolist())


def lone_word_activations(backbone: Backbone, lines: list[str], scores: torch.Tensor, pvs: torch.Tensor,
                          config: MiningConfig) -> tuple[torch.Tensor, list[list[str]]]:
    """[N, K]: the lines that reach DEFAULT_THRESHOLD on a PV and hold a word that, alone in the
    input, takes the output there too; and per PV those words. A backdoor whose trigger is a
    common word (its neighbours in meaning often fire as well) fires on text that looks clean;
    counting those lines as false flags would push the PV's threshold above its own triggered
    outputs, or drop it. A PV that more than `LONE_WORD_MAX_SHARE` of the words tested reach alone is
    a direction clean text takes, not a trigger's, and its lines all count."""
    suspect = scores >= DEFAULT_THRESHOLD
    words_of = [set(clip_words(line, config.max_words).lower().split()) for line in lines]
    rows = torch.nonzero(suspect.any(dim=1)).flatten().tolist()
    vocab = sorted(set().union(*(words_of[i] for i in rows))) if rows else []
    if not vocab:
        return torch.zeros_like(suspect), [[] for _ in range(pvs.shape[0])]
    alone = prepare(backbone, vocab, config.model_copy(update={"batch_size": 1}))
    fires = sign_agreement(alone.clean, pvs.to(alone.clean.device)).cpu() >= DEFAULT_THRESHOLD  # [W, K]
    firing, kept = lone_word_marks(suspect, words_of, vocab, fires)
    return firing, [[vocab[w] for w in torch.nonzero(kept[:, k]).flatten().tolist()] for k in range(pvs.shape[0])]


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

    Each position of `positions.mined_positions` (every one the encoder has unless
    `config.position` names one) is mined in turn as the job told that position would mine it,
    with its own checkpoint `<out>.<position>.ckpt.json`; detect mode stops after the first
    position whose verdict is backdoored. The file holds the PVs of every position, each record
    naming its position (docs/mining.md, Positions).

    `workers` > 1 or a `ray_address` runs rounds as Ray tasks (see `runners.RayRunner`) on
    `device` (auto, cpu or cuda, resolved by each task on its node; default: the kind of device
    `backbone` is on); the result is the same as a serial run with the same settings, up to float
    rounding where a round runs on another kind of device. A given `runner` must offer `retarget`."""
    out = Path(out)
    _check_output_folder(out)
    positions, unsupported = mined_positions(backbone, config)
    fuzz_lines, calib_lines = _split_corpus(corpus, config)
    job = _Job(backbone, config, fuzz_lines, calib_lines, out, resume, progress, say, time.time())
    legacy = legacy_checkpoint_problem(out) if resume else None
    if legacy:
        raise LmsanError(legacy)
    own_runner = runner is None

    def make_runner(prepared: Prepared, at: MiningConfig, held: Prepared) -> SerialRunner | RayRunner:
        if workers > 1 or ray_address:
            return _ray_runner(backbone, prepared, at, workers, ray_address, held, device)
        return SerialRunner(backbone, prepared, at, held)

    runs: list[PositionRun] = []
    try:
        for i, position in enumerate(positions):
            if runs and config.mode == MiningMode.DETECT and runs[-1].records:
                break  # the verdict is what detect mode is for
            runner, run = job.run_position(position, len(positions) - i, runner, make_runner,
                                           seen_through_cls(backbone, position, runs))
            runs.append(run)
    finally:
        runner_close = getattr(runner, "close", None)
        if own_runner and runner_close:
            runner_close()
    return job.finish(runs, positions, unsupported, sign_key)


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


@dataclass
class _Job:
    """What the positions of one `mine` call share: the model, the settings, the corpus split, the
    output, and the clock of the time budget."""

    backbone: Backbone
    config: MiningConfig
    fuzz_lines: list[str]
    calib_lines: list[str]
    out: Path
    resume: bool
    progress: bool
    say: Callable[[str], None] | None
    started: float

    def deadline(self, remaining: int) -> float | None:
        """When the position starting now must stop starting rounds: an equal share of what is left
        of the time budget among the `remaining` positions, so that the first cannot spend it all
        and what one leaves unused goes to those after it."""
        if self.config.time_budget is None:
            return None
        left = max(0.0, self.config.time_budget - (time.time() - self.started))
        return time.time() + left / remaining

    def run_position(self, position: Position, remaining: int, runner, make_runner: Callable[..., SerialRunner |
                     RayRunner], prior: torch.Tensor | None = None) -> tuple[SerialRunner | RayRunner, PositionRun]:
        """Mine `position` as the job told it would, with `runner` retargeted to it (or a new one
        from `make_runner`); the runner, kept for the next position, and what was found. `prior`:
        PVs known at this position already (`seen_through_cls`)."""
        backbone, config, t0 = self.backbone, at_position(self.config, position), time.time()
        if self.say:
            self.say(f"position {position}: mining ({config.mode} mode, up to {config.rounds} rounds)")
        prepared = prepare(backbone, self.fuzz_lines, config)
        held = _prepare_held_out(backbone, self.calib_lines, config)
        distance_th = resolved_distance(prepared, config)
        if runner is None:
            runner = make_runner(prepared, config, held)
        else:
            runner.retarget(prepared, config, held)
        rounds = _Rounds(backbone, config, checkpoint_path(self.out, position), self.deadline(remaining),
                         self.resume, self.say)
        bar = rounds.progress_bar(self.progress)
        try:
            kept_seeds = rounds.run_mode(runner, bar, distance_th, prior)
        finally:
            bar.close()
        if not rounds.in_budget() and self.say:
            self.say(f"position {position}: its share of the time budget of {self.config.time_budget:.0f} s is spent")
        pvs, pv_records = _calibrated(backbone, rounds.records, kept_seeds, self.calib_lines, config)
        done = [rounds.records[s] for s in sorted(rounds.records)]
        return runner, PositionRun(position, pvs, pv_records, done, time.time() - t0, distance_th,
                                   rounds.stop_record(), 0 if prior is None else len(prior))

    def finish(self, runs: list[PositionRun], positions: list[Position], unsupported: dict[str, str],
               sign_key: Ed25519PrivateKey | None) -> MiningResult:
        """The signature file of all positions' PVs, written to `out`, and the result."""
        backbone, config = self.backbone, self.config
        seconds = time.time() - self.started
        stop = overall_stop(runs)
        total = sum(len(r.rounds) for r in runs)
        mining = {**config.model_dump(), "lr": resolved_lr(backbone, config), "distance_th": runs[0].distance_th,
                  "rounds": total, "seconds": round(seconds, 1), "corpus_lines": len(self.fuzz_lines),
                  "calibration_lines": len(self.calib_lines), **coverage(runs, positions, unsupported),
                  **({"stop": stop} if stop else {})}
        pvs = torch.cat([r.pvs for r in runs])
        records = [rec for r in runs for rec in r.records]
        sig = _signature_set(backbone, runs[0].position, pvs, records, mining)
        sig.save(self.out, sign_key=sign_key)
        summary = [{"position": r.position.value, **{k: v for k, v in c.items() if k != "pv"}}
                   for r in runs for c in r.rounds]
        return MiningResult(sig, summary, total, seconds, stop, mining["positions"])


class _Rounds:
    """The finished rounds of one job by seed, resumed from the checkpoint when asked and written
    back to it after every round, with the progress bar and the time budget."""

    def __init__(self, backbone: Backbone, config: MiningConfig, ckpt: Path, deadline: float | None, resume: bool,
                 say: Callable[[str], None] | None):
        self.fingerprint, self.config, self.ckpt, self.deadline = backbone.fingerprint, config, ckpt, deadline
        self.records: dict[int, RoundRecord] = {}
        if resume and ckpt.is_file():
            self.records = read_checkpoint(ckpt, backbone.fingerprint, config.identity(), backbone.hidden_size)
            if say:
                say(f"position {config.position}: resuming, {len(self.records)} rounds already done")
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
        return self.deadline is None or time.time() <= self.deadline

    def progress_bar(self, progress: bool) -> tqdm:
        """A bar over every seed of the job, the resumed rounds counted as done."""
        seeds = self.seeds
        return tqdm(total=len(seeds), initial=sum(s in self.records for s in seeds),
                    desc=f"mine {self.config.mode} {self.config.position}", disable=not progress, unit="round")

    def run_mode(self, runner: SerialRunner | RayRunner, bar: tqdm, unique_th: float,
                 prior: torch.Tensor | None = None) -> list[int]:
        """Run the rounds the mode needs with `runner`; the seeds whose PVs are kept, in seed order
        (`prior`: PVs search steers away from and counts as repeats, see `modes.search`)."""
        config, records, seeds = self.config, self.records, self.seeds

        def run(todo: list[int], found: torch.Tensor | None, done: Callable[[], bool],
                aims: dict[int, torch.Tensor] | None = None) -> None:
            """Run `todo` (stopping once `done()`), checkpointing every finished round."""
            for key, cand, where in runner.run(todo, found, self.in_budget, aims):
                records[key] = candidate_record(cand, where, key)
                self._save()
                bar.update(1)
                if done():
                    break

        if config.mode == "detect":
            return detect(seeds, records, run)
        self.search = search(seeds, records, run, config, unique_th, bar, prior)
        return self.search.kept

    def _save(self) -> None:
        """Write every finished round, in seed order, to the checkpoint."""
        write_json_atomic(self.ckpt, {"fingerprint": self.fingerprint, "config": self.config.identity(),
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
        cal = calibrate(backbone, pvs, calib_lines, config, [c.get("floor") for c in kept_records])
        for i, (c, th, rate) in enumerate(zip(kept_records, cal.thresholds, cal.rates, strict=True)):
            c["lone_words"], c["activation_lines"] = cal.words[i], cal.activations[i]
            if th is None:
                c["reasons"].append("no threshold separates it from clean text")
                c["kept"] = False
                continue
            keep_idx.append(i)
            pv_records.append(PVRecord(origin="mined", position=config.position, seed=c["seed"], threshold=th,
                                       false_positive_rate=rate,
                                       scores={"distance": c["distance"], "entropy_ratio": c["entropy_ratio"],
                                               "dispersion": c["dispersion"]}))
    return (pvs[keep_idx] if keep_idx else torch.zeros(0, backbone.hidden_size)), pv_records


def _signature_set(backbone: Backbone, position: Position, pvs: torch.Tensor, pv_records: list[PVRecord],
                   mining: dict) -> SignatureSet:
    """The signature file's contents: the calibrated PVs of this backbone (each record naming its
    position; `position`, the first covered, is the file's), the verdict they give, and how they
    were mined."""
    return SignatureSet.create(
        pvs,
        pv_records,
        backbone_name=backbone.name,
        fingerprint=backbone.fingerprint,
        model_type=backbone.model_type,
        position=position,
        verdict="backdoored" if pv_records else "clean",
        mining=mining,
    )
