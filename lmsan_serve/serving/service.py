"""The guarded classifier behind the endpoint, as plain Python: one frozen backbone, many soft
prompts loaded on demand, and a signature set that can be swapped while requests run.

The Serve deployment (`app.py`) only batches calls into `GuardService.classify` and forwards
`reconfigure` / health checks; tests drive this class directly, without a cluster.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..backbone import Backbone, load_backbone
from ..data import load_examples, text_pairs
from ..errors import LmsanError, first_problem
from ..guard import Guard, GuardStats, Verdict
from ..kinds import Action, AuditSink, Mode
from ..monitor import inputs_for_bound
from ..prompts import PromptClassifier
from ..signatures import SignatureSet
from ..signing import load_public_keys
from .config import Reloadable, ServeConfig, task_mode
from .metrics import GuardMetrics

log = logging.getLogger("lmsan.serve")
audit_log = logging.getLogger("lmsan.audit")


@dataclass
class ClassifyCall:
    """One HTTP request's work: inputs of one task (pairs aligned with texts, or None)."""

    request_id: str
    task: str
    texts: list[str]
    pairs: list[str | None] | None = None

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class CallResult:
    results: list[dict] = field(default_factory=list)
    error: str | None = None
    status: int = 200  # the HTTP status the ingress answers with when `error` is set
    guard_seconds: float = 0.0


@dataclass(frozen=True)
class LoadedSignatures:
    """An immutable snapshot: the service swaps the reference, never mutates one in use."""

    signatures: SignatureSet
    path: str
    set_id: str  # first 12 hex of the tensor checksum, a bounded metric label
    stat_key: tuple[int, int, int]
    loaded_at: float
    version: int


def _stat_key(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _load_trusted_keys(paths: list[str]) -> list:
    try:
        return load_public_keys(paths)
    except LmsanError as exc:
        raise LmsanError(f"invalid serve config at trusted_keys: {exc}") from exc


class PromptCache:
    """Soft prompts by task name, least recently used evicted; loading happens off the ingress."""

    def __init__(self, backbone: Backbone, capacity: int, allow_fingerprint_mismatch: bool = False):
        self.backbone = backbone
        self.capacity = capacity
        self.allow_fingerprint_mismatch = allow_fingerprint_mismatch
        self._items: OrderedDict[str, PromptClassifier] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, name: str, path: str) -> PromptClassifier:
        with self._lock:
            if name in self._items:
                self._items.move_to_end(name)
                return self._items[name]
        classifier = PromptClassifier.load(path, self.backbone, self.allow_fingerprint_mismatch)
        with self._lock:
            self.loads += 1
            self._items[name] = classifier
            self._items.move_to_end(name)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return classifier

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._items)


class GuardService:
    def __init__(self, config: ServeConfig, metrics: GuardMetrics | None = None,
                 backbone: Backbone | None = None):
        self.config = config
        self.metrics = metrics or GuardMetrics()
        self.backbone = backbone or load_backbone(config.model, None if config.device == "auto" else config.device)
        self.prompts = PromptCache(self.backbone, config.prompt_cache_size, config.allow_fingerprint_mismatch)
        self.settings = Reloadable.model_validate(config.reloadable())
        self.trusted_keys = _load_trusted_keys(config.trusted_keys)  # once: a bad key is a start-up error
        self.current: LoadedSignatures | None = None
        self.last_reload_error: str | None = None
        self.config_error: str | None = None  # why the last user_config was refused; None: applied
        self._audit_lock = threading.Lock()  # one whole line at a time from concurrent batches
        self._failed_key: tuple[str, tuple[int, int, int]] | None = None
        self._version = 0
        self._guards: dict[tuple, Guard] = {}
        self.calibrations: dict[str, dict] = {}  # task -> what the last calibration did
        # Read once, so that a bad file is a start-up error and not a failure on first traffic.
        self._calibration_inputs = {
            n: load_examples(self.config.task(n).calibration, require_label=False)
            for n in self.config.tasks if self.config.task(n).calibration
        }
        self._reload_lock = threading.Lock()
        if self.settings.signatures:
            self.reload_signatures(self.settings.signatures)
        if self.current is not None:  # calibrate before the first request rather than during it
            for task in self._calibration_inputs:
                if self.mode_of(task) != Mode.OFF:
                    self.guard(task)

    # -- signatures ------------------------------------------------------------------------------
    def reload_signatures(self, path: str) -> bool:
        """Load and validate `path`, then swap it in; on any error keep the set in use."""
        with self._reload_lock:
            try:
                key = _stat_key(path)
            except OSError as exc:
                return self._reload_failed(path, None, f"signature file {path}: {exc.strerror or exc}")
            try:
                sig = SignatureSet.load(path, hidden_size=self.backbone.hidden_size,
                                        fingerprint=self.backbone.fingerprint,
                                        allow_fingerprint_mismatch=self.config.allow_fingerprint_mismatch,
                                        trusted_keys=self.trusted_keys)
                for position in sig.positions:
                    why = self.backbone.supports_position(position)
                    if why:
                        raise LmsanError(f"{path}: {why}")
            except LmsanError as exc:
                return self._reload_failed(path, key, str(exc))
            self._version += 1
            loaded = LoadedSignatures(sig, path, sig.meta.tensor_sha256[:12], key, time.time(), self._version)
            self.current = loaded  # one reference assignment: calls in flight keep their snapshot
            self.last_reload_error = None
            self._failed_key = None
            self.metrics.reload(True)
            self.metrics.set_loaded(loaded.set_id, [sig.label(i) for i in range(len(sig))])
            log.info("signatures loaded: %s (%d PVs, set %s)", path, len(sig), loaded.set_id)
            return True

    def _reload_failed(self, path: str, key, reason: str) -> bool:
        self.last_reload_error = reason
        self._failed_key = (path, key) if key is not None else None
        self.metrics.reload(False)
        kept = f"keeping set {self.current.set_id}" if self.current else "no signature set loaded"
        log.error("signature reload failed (%s): %s", kept, reason)
        return False

    def poll_signature_file(self) -> bool | None:
        """Reload when the configured file changed on disk; None when nothing changed."""
        path = self.settings.signatures
        if not path:
            return None
        try:
            key = _stat_key(path)
        except OSError:
            key = None
        cur = self.current
        if cur is not None and cur.path == path and cur.stat_key == key:
            return None
        if self._failed_key == (path, key):
            return None  # this exact file already failed; wait for the next change
        return self.reload_signatures(path)

    def reconfigure(self, user_config: Any) -> None:
        """Apply a new `user_config`; an invalid signature file keeps the last good set.

        An invalid user_config is refused without raising: the previous settings keep serving, and
        the refusal shows in `health()` (degraded, with the reason), `lmsan_config_valid 0`, a
        failed reload and an error log line, until a valid one is applied. Raising here would make
        Ray Serve stop this replica and retry the update on fresh ones, which fail the same way:
        an invalid edit would leave no replica serving (docs/serving.md, How the pieces fit)."""
        try:
            settings = Reloadable.model_validate(user_config or {})
        except ValidationError as exc:
            return self._refuse_config(f"invalid user_config at {first_problem(exc, default='user_config')}")
        unknown = set(settings.task_modes) - set(self.config.tasks)
        if unknown:
            return self._refuse_config(f"invalid user_config at task_modes: unknown tasks {', '.join(sorted(unknown))}")
        self.settings = settings
        self.config_error = None
        self.metrics.config_applied(True)
        self._guards.clear()
        self.poll_signature_file()  # loads a new path, or the same path if the file changed

    def _refuse_config(self, reason: str) -> None:
        self.config_error = self.last_reload_error = reason
        self.metrics.reload(False)
        self.metrics.config_applied(False)
        log.error("%s; refused, the previous settings keep serving", reason)

    # -- serving ---------------------------------------------------------------------------------
    def mode_of(self, task: str) -> Mode:
        return task_mode(self.settings, self.config.task(task), task)

    def guard(self, task: str) -> tuple[Guard, LoadedSignatures | None]:
        """The guard that scores `task`'s requests now and the signature snapshot it holds (None with
        the guard off): built on first use and after a reload or reconfigure, and calibrated then on
        the task's clean inputs, so its monitor holds the thresholds the task is served with.
        Raises LmsanError when the task is guarded but no signature set is loaded."""
        mode = self.mode_of(task)
        snap = self.current
        if mode != Mode.OFF and snap is None:
            raise LmsanError(f"no valid signature set is loaded and task {task!r} is in mode {mode!r}: "
                             f"refusing to classify unguarded ({self.last_reload_error or 'none configured'})")
        key = (task, mode, self.settings.threshold, snap.version if snap else None)
        guard = self._guards.get(key)
        classifier = self.prompts.get(task, self.config.task(task).prompt)
        if guard is None or guard.classifier is not classifier:
            guard = Guard(self.backbone, classifier, snap.signatures if snap and mode != "off" else None,
                          mode=mode, threshold=self.settings.threshold)
            unwatched = [p for p in guard.signatures.positions if p not in guard.watched] if guard.signatures else []
            if unwatched:
                log.info("task %s: its prompt holds no %s output, so the PVs there are not watched",
                         task, "/".join(unwatched))
            self._calibrate(task, guard)
            self._guards = {k: g for k, g in self._guards.items() if k[0] != task}
            self._guards[key] = guard
        return guard, snap

    def _calibrate(self, task: str, guard: Guard) -> None:
        """Raise `guard`'s thresholds on the task's clean inputs, unless the guard is off or the
        operator fixed one threshold for every PV (`threshold`), which then holds as given."""
        examples = self._calibration_inputs.get(task)
        if not examples or guard.monitor is None or self.settings.threshold is not None:
            return
        spec = self.config.task(task)
        target = spec.calibration_fpr
        result = guard.calibrate([e.text for e in examples], text_pairs(examples), target,
                                 held_out=spec.calibration_margin)
        self.calibrations[task] = result.to_dict()
        log.info("task %s calibrated on %d clean inputs: flag rate %.4f -> %.4f, %d PV combinations off, "
                 "unseen clean inputs flag at most %s; %d left flagged, a word in them firing a PV alone",
                 task, result.lines, result.flag_rate_before, result.flag_rate_after, result.combinations_off,
                 result.fpr_bound, result.activations)
        if result.fpr_bound is not None and result.fpr_bound > target:
            # the held-out half was too small to show the target rate; more inputs would
            log.warning("task %s: %d calibration inputs bound unseen false flags at %.4f, above calibration_fpr "
                        "%.4f; give at least %d", task, result.lines, result.fpr_bound, target,
                        inputs_for_bound(target))

    def classify(self, calls: list[ClassifyCall]) -> list[CallResult]:
        """Answer a batch of calls; calls of one task (and pairing) share one guarded pass."""
        out = [CallResult() for _ in calls]
        groups: dict[tuple[str, bool], list[int]] = {}
        for i, call in enumerate(calls):
            if call.task not in self.config.tasks:
                out[i] = CallResult(error=f"unknown task {call.task!r}", status=404)
                continue
            groups.setdefault((call.task, call.pairs is not None), []).append(i)
        for (task, paired), members in groups.items():
            self._classify_group(task, paired, [calls[i] for i in members], [out[i] for i in members])
        return out

    def _classify_group(self, task: str, paired: bool, calls: list[ClassifyCall], outs: list[CallResult]) -> None:
        texts = [t for c in calls for t in c.texts]
        pairs = [p or "" for c in calls for p in (c.pairs or [])] if paired else None
        stats = GuardStats()
        try:
            guard, snap = self.guard(task)
            results = guard.classify(texts, pairs, stats)
        except Exception as exc:  # fail closed: no input of this group is answered unguarded
            if isinstance(exc, LmsanError):
                reason = str(exc)
            else:
                reason = f"guard error ({type(exc).__name__}: {exc})"
                log.exception("guard failed on task %s", task)
            self.metrics.guard_error(task, len(texts))
            results = self._unguarded(task, texts, pairs, reason) if self.settings.fail_open else None
            if results is None:
                for o in outs:
                    o.error, o.status = reason, 503
                return
            snap = None
        if stats.purge_bound_hits:
            self.metrics.bound_hit(task, stats.purge_bound_hits)
        start = 0
        for call, o in zip(calls, outs, strict=True):
            part = results[start:start + len(call)]
            start += len(call)
            o.results = [r.to_dict() for r in part]
            o.guard_seconds = stats.guard_seconds
            for j, r in enumerate(part):
                v = r.guard
                self.metrics.input_done(task, v.action, v.signature if v.flagged else None, v.match, v.purge_failed)
                if v.flagged:
                    self._audit(call, j, task, v, snap)
            self.metrics.request_done(task, stats.guard_seconds)

    def _unguarded(self, task: str, texts: list[str], pairs: list[str] | None, reason: str) -> list | None:
        """fail_open: classify without the guard, said in every verdict (action `unguarded`, which
        lmsan_inputs counts), and logged.
        None when even that fails (the prompt cannot load): then the caller answers 503."""
        try:
            classifier = self.prompts.get(task, self.config.task(task).prompt)
            results = Guard(self.backbone, classifier, None, mode=Mode.OFF).classify(texts, pairs)
        except Exception as exc:
            log.error("fail_open: cannot classify task %s unguarded either: %s", task, exc)
            return None
        for r in results:
            r.guard.action = Action.UNGUARDED
            r.guard.reason = f"answered unguarded (fail_open): {reason}"
        log.warning("fail_open: %d inputs of task %s answered unguarded: %s", len(texts), task, reason)
        return results

    def _audit(self, call: ClassifyCall, j: int, task: str, v: Verdict, snap: LoadedSignatures | None) -> None:
        """One JSON line for flagged input `j` of `call`: `signature` is the bounded label the
        metrics count under, `matched` the exact PV or combination the monitor named."""
        sink = self.config.audit
        if sink == AuditSink.OFF:
            return
        line = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "event": "lmsan.detection", "request_id": call.request_id, "task": task, "input": j,
            "set": snap.set_id if snap else None,
            "signature": self.metrics.signature_label(v.signature) if v.signature else None,
            "matched": v.signature, "score": v.match, "action": v.action, "removed": v.removed, "reason": v.reason,
        }
        if self.config.audit_text:
            line["text"] = call.texts[j]
            if v.text is not None:
                line["purged_text"] = v.text
        text = json.dumps(line, ensure_ascii=False)
        if sink == AuditSink.LOG:
            audit_log.warning(text)
            return
        with self._audit_lock:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    # -- introspection ---------------------------------------------------------------------------
    def health(self) -> tuple[bool, str]:
        """(False, why) only while a guarded task cannot be served at all: Ray Serve then replaces
        the replica. A refused user_config or signature file is (True, "degraded: why"): the
        replica still guards correctly on its previous settings, and replacing it would not help."""
        guarded = [t for t in self.config.tasks if self.mode_of(t) != Mode.OFF]
        notes = []
        cur, wanted = self.current, self.settings.signatures
        if guarded and cur is None:
            if not self.settings.fail_open:
                return False, (f"guard is on for {', '.join(guarded)} but no valid signature set is loaded"
                               f" ({self.last_reload_error or 'none configured'})")
            notes.append(f"answering unguarded (fail_open), {self.last_reload_error or 'no set'}")
        if self.config_error:
            notes.append(f"{self.config_error}; the previous settings keep serving")
        elif cur is not None and wanted and cur.path != wanted:
            notes.append(f"signature file {wanted} not loaded ({self.last_reload_error}); "
                         f"guarding with set {cur.set_id} from {cur.path}")
        return (True, "degraded: " + "; ".join(notes)) if notes else (True, "ok")

    def tasks_info(self) -> list[dict]:
        loaded = set(self.prompts.loaded())
        info = []
        for name in self.config.tasks:
            path = self.config.task(name).prompt
            labels = None
            try:
                labels = json.loads((Path(path) / "manifest.json").read_text(encoding="utf-8"))["labels"]
            except (OSError, ValueError, KeyError, TypeError):
                pass
            info.append({"name": name, "mode": self.mode_of(name), "labels": labels, "loaded": name in loaded,
                         "calibration": self.calibrations.get(name)})
        return info

    def signatures_info(self) -> dict:
        cur = self.current
        info: dict = {
            "loaded": cur is not None,
            "reloads": dict(self.metrics.reloads),
            "last_error": self.last_reload_error,
            "config_error": self.config_error,
            "threshold_override": self.settings.threshold,
        }
        if cur is not None:
            sig = cur.signatures
            meta = sig.meta
            thresholds = sig.thresholds(self.settings.threshold).tolist()
            info.update({
                "path": cur.path, "set": cur.set_id, "count": len(sig), "version": cur.version,
                "loaded_at": cur.loaded_at, "position": meta.position, "positions": sig.positions,
                "metric": meta.metric,
                "verdict": meta.verdict, "backbone": meta.backbone.model_dump(), "signed_by": sig.signed_by,
                "pvs": [{"signature": sig.label(i), "origin": r.origin, "position": sig.pv_positions[i],
                         "threshold": round(thresholds[i], 6),
                         "false_positive_rate": r.false_positive_rate} for i, r in enumerate(meta.pvs)],
            })
        return info
