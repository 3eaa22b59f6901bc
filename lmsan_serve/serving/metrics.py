"""Guard metrics, under the names the alert rules and dashboard in deployments/ use. Ray's
exporter adds the `ray_` prefix and `_total` to counters, so `lmsan_requests` is scraped as `ray_lmsan_requests_total`.

`GuardMetrics` records into plain dicts (what the in-process service and its tests use);
`RayGuardMetrics` also sends every event through Ray's metrics pipeline. Label values are
bounded: task names come from the config, signature labels from the loaded set, actions and
reload results from fixed lists.
"""

from __future__ import annotations

from collections import Counter

# Match scores are sign agreements or cosines; the interesting range is near the threshold.
MATCH_BUCKETS = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0]
SECONDS_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]

METRIC_NAMES = (
    "lmsan_requests", "lmsan_detections", "lmsan_purge_failures", "lmsan_guard_errors",
    "lmsan_match_ratio", "lmsan_guard_seconds", "lmsan_signatures_loaded", "lmsan_signature_reloads",
    "lmsan_purge_bound_hits",
)


class GuardMetrics:
    """In-memory record of guard events; subclasses forward them to a metrics backend."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()  # (task, action) -> inputs
        self.detections: Counter[tuple[str, str]] = Counter()  # (task, signature)
        self.purge_failures: Counter[str] = Counter()
        self.guard_errors: Counter[str] = Counter()
        self.purge_bound_hits: Counter[str] = Counter()
        self.reloads: Counter[str] = Counter()
        self.match_scores: list[float] = []
        self.guard_seconds: list[float] = []
        self.signatures_loaded: tuple[str, int] = ("none", 0)

    def input_done(self, task: str, action: str, signature: str | None, match: float | None,
                   purge_failed: bool) -> None:
        self.requests[(task, action)] += 1
        if signature is not None:
            self.detections[(task, signature)] += 1
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

    def set_loaded(self, set_id: str, count: int) -> None:
        self.signatures_loaded = (set_id, count)


class RayGuardMetrics(GuardMetrics):
    """Also exports through `ray.util.metrics` (valid only inside a Ray worker or replica)."""

    def __init__(self) -> None:
        super().__init__()
        from ray.util import metrics as m

        self._requests = m.Counter("lmsan_requests", "guarded inputs by task and action", ("task", "action"))
        self._detections = m.Counter("lmsan_detections", "flagged inputs by matched PV", ("task", "signature"))
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
        self._loaded.set(0, {"set": "none"})

    def input_done(self, task, action, signature, match, purge_failed) -> None:
        super().input_done(task, action, signature, match, purge_failed)
        self._requests.inc(1, {"task": task, "action": action})
        if signature is not None:
            self._detections.inc(1, {"task": task, "signature": signature})
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

    def set_loaded(self, set_id, count) -> None:
        previous = self.signatures_loaded[0]
        super().set_loaded(set_id, count)
        if previous != set_id:
            # the old set's series drops to 0, so "sum by (set)" shows only the set in use
            self._loaded.set(0, {"set": previous})
        self._loaded.set(count, {"set": set_id})
