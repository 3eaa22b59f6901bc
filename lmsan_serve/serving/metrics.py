"""Guard metrics, under the names the alert rules and dashboard in deployments/ use. Ray's
exporter adds the `ray_` prefix and `_total` to counters, so `lmsan_inputs` is scraped as
`ray_lmsan_inputs_total`.

`GuardMetrics` records into plain dicts (what the in-process service and its tests use);
`RayGuardMetrics` also sends every event through Ray's metrics pipeline. Every label value comes
from a closed set, because each distinct value is a time series Prometheus keeps: task names come
from the config, actions and reload results from enums, and the `signature` of a detection is one
of the loaded set's PV names, `combination` (the monitor also scores pairs and triples of PVs, up
to hundreds of them, so their names stay out of the label and go to the audit line instead) or
`other`. So a task has at most K + 2 signature series for a set of K PVs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence

# Match scores are sign agreements or cosines; the interesting range is near the threshold.
MATCH_BUCKETS = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0]
SECONDS_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]

METRIC_NAMES = (
    "lmsan_inputs", "lmsan_detections", "lmsan_purge_failures", "lmsan_guard_errors",
    "lmsan_match_ratio", "lmsan_guard_seconds", "lmsan_signatures_loaded", "lmsan_signature_reloads",
    "lmsan_purge_bound_hits", "lmsan_config_valid",
)

COMBINATION = "combination"  # the label of every flag matched by a combination of PVs
OTHER = "other"  # the label of a name outside the loaded set (a verdict from before a reload)


def _is_combination(name: str, pv_names: Collection[str]) -> bool:
    """Whether `name` is two or more of `pv_names` joined by '+' (how the monitor names a
    combination). A PV name may itself hold '+' (its trigger word), so every split is tried."""
    if name in pv_names:
        return False  # a single PV, not a combination
    starts, seen = [0], {0}
    while starts:
        pos = starts.pop()
        for pv in pv_names:
            if not name.startswith(pv, pos):
                continue
            end = pos + len(pv)
            if end == len(name):
                return True
            if name[end] == "+" and end + 1 not in seen:
                seen.add(end + 1)
                starts.append(end + 1)
    return False


def signature_label(name: str, pv_names: Collection[str]) -> str:
    """The bounded metric label for the matched signature `name`: itself when it is a PV of the
    loaded set, `combination` for a combination of its PVs, else `other`."""
    if name in pv_names:
        return name
    return COMBINATION if _is_combination(name, pv_names) else OTHER


class GuardMetrics:
    """In-memory record of guard events; subclasses forward them to a metrics backend."""

    def __init__(self) -> None:
        self.inputs: Counter[tuple[str, str]] = Counter()  # (task, action) -> inputs
        self.detections: Counter[tuple[str, str]] = Counter()  # (task, bounded signature label)
        self.purge_failures: Counter[str] = Counter()
        self.guard_errors: Counter[str] = Counter()
        self.purge_bound_hits: Counter[str] = Counter()
        self.reloads: Counter[str] = Counter()
        self.match_scores: list[float] = []
        self.guard_seconds: list[float] = []
        self.signatures_loaded: tuple[str, int] = ("none", 0)
        self.pv_names: frozenset[str] = frozenset()  # the loaded set's PV names: the signature labels
        self.config_valid = True

    def signature_label(self, name: str) -> str:
        return signature_label(name, self.pv_names)

    def input_done(self, task: str, action: str, signature: str | None, match: float | None,
                   purge_failed: bool) -> None:
        """One guarded input; `signature` is the exact name the monitor matched (None: not flagged)."""
        self.inputs[(task, action)] += 1
        if signature is not None:
            self.detections[(task, self.signature_label(signature))] += 1
        if purge_failed:
            self.purge_failures[task] += 1
        if match is not None and len(self.match_scores) < 100_000:
            self.match_scores.append(match)

    def request_done(self, task: str, guard_seconds: float) -> None:
        if len(self.guard_seconds) < 100_000:
            self.guard_seconds.append(guard_seconds)

    def guard_error(self, task: str, inputs: int) -> None:
        self.guard_errors[task] += inputs

    def bound_hit(self, task: str, inputs: int) -> None:
        self.purge_bound_hits[task] += inputs

    def reload(self, ok: bool) -> None:
        self.reloads["ok" if ok else "failed"] += 1

    def set_loaded(self, set_id: str, pv_names: Sequence[str]) -> None:
        self.signatures_loaded = (set_id, len(pv_names))
        self.pv_names = frozenset(pv_names)

    def config_applied(self, valid: bool) -> None:
        """A user_config was applied (True) or refused as invalid, the previous settings kept (False)."""
        self.config_valid = valid

    def refresh(self) -> None:
        """Export the gauges again; nothing to do for the in-memory record."""


class RayGuardMetrics(GuardMetrics):
    """Also exports through `ray.util.metrics` (valid only inside a Ray worker or replica)."""

    def __init__(self) -> None:
        super().__init__()
        from ray.util import metrics as m

        self._inputs = m.Counter("lmsan_inputs", "guarded inputs by task and action", ("task", "action"))
        self._detections = m.Counter("lmsan_detections", "flagged inputs by matched PV of the loaded set, "
                                     "'combination' or 'other'", ("task", "signature"))
        self._purge_failures = m.Counter("lmsan_purge_failures", "flagged inputs that could not be purged",
                                         ("task",))
        self._guard_errors = m.Counter("lmsan_guard_errors", "inputs refused because the guard failed", ("task",))
        self._match = m.Histogram("lmsan_match_ratio", "best PV match score of each input", MATCH_BUCKETS,
                                  ("task",))
        self._seconds = m.Histogram("lmsan_guard_seconds", "time the guard adds to a request, seconds",
                                    SECONDS_BUCKETS, ("task",))
        self._bound_hits = m.Counter("lmsan_purge_bound_hits",
                                     "flagged inputs whose purge stopped at the work bound", ("task",))
        self._loaded = m.Gauge("lmsan_signatures_loaded", "PVs in the signature set in use (0: none)", ("set",))
        self._reloads = m.Counter("lmsan_signature_reloads", "signature reloads by result", ("result",))
        self._config_valid = m.Gauge("lmsan_config_valid", "1: the last user_config was applied; 0: it was "
                                     "refused as invalid and the previous settings serve")
        self._loaded.set(0, {"set": "none"})
        self._config_valid.set(1)

    def input_done(self, task, action, signature, match, purge_failed) -> None:
        super().input_done(task, action, signature, match, purge_failed)
        self._inputs.inc(1, {"task": task, "action": action})
        if signature is not None:
            self._detections.inc(1, {"task": task, "signature": self.signature_label(signature)})
        if purge_failed:
            self._purge_failures.inc(1, {"task": task})
        if match is not None:
            self._match.observe(match, {"task": task})

    def request_done(self, task, guard_seconds) -> None:
        super().request_done(task, guard_seconds)
        self._seconds.observe(guard_seconds, {"task": task})

    def guard_error(self, task, inputs) -> None:
        super().guard_error(task, inputs)
        self._guard_errors.inc(inputs, {"task": task})

    def bound_hit(self, task, inputs) -> None:
        super().bound_hit(task, inputs)
        self._bound_hits.inc(inputs, {"task": task})

    def reload(self, ok) -> None:
        super().reload(ok)
        self._reloads.inc(1, {"result": "ok" if ok else "failed"})

    def set_loaded(self, set_id, pv_names) -> None:
        previous = self.signatures_loaded[0]
        super().set_loaded(set_id, pv_names)
        if previous != set_id:
            # the old set's series drops to 0, so "sum by (set)" shows only the set in use
            self._loaded.set(0, {"set": previous})
        self._loaded.set(len(pv_names), {"set": set_id})

    def config_applied(self, valid) -> None:
        super().config_applied(valid)
        self._config_valid.set(1 if valid else 0)

    def refresh(self) -> None:
        """Set both gauges to their current values again. Ray's exporter drops a gauge value that
        was not set within a few report intervals, so on an idle replica the signature set and the
        config state would vanish from /metrics (and `absent()` alerts fire) unless re-set."""
        set_id, count = self.signatures_loaded
        self._loaded.set(count, {"set": set_id})
        self._config_valid.set(1 if self.config_valid else 0)
