"""Detections over time, the picture the Grafana dashboard shows, drawn without Grafana.

`MetricsSampler` scrapes the endpoint's metrics URL (Prometheus text format) in a background
thread while traffic runs; `rates` turns the cumulative counters into guarded inputs and detections
per second, by signature. `from_prometheus` reads the same series from a Prometheus server's
`query_range` API instead, for traffic a Prometheus already recorded. `plot_timeline` draws either.
"""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from lmsan_serve.errors import LmsanError
from lmsan_serve.kinds import Action

from .plots import pyplot, require_plotting

INPUTS = "ray_lmsan_inputs_total"
DETECTIONS = "ray_lmsan_detections_total"


def inputs_query(window: str) -> str:
    """Guarded inputs per second as PromQL, aggregated as the dashboard's panels do."""
    return f'sum(rate({INPUTS}{{action!="{Action.OFF.value}"}}[{window}]))'


def detections_query(window: str) -> str:
    return f"sum by (signature) (rate({DETECTIONS}[{window}]))"


@dataclass
class Sample:
    """One scrape: when (seconds, monotonic clock) and the counters summed over tasks and replicas."""

    t: float
    inputs: float  # guarded inputs: every action but `off`
    detections: dict[str, float] = field(default_factory=dict)  # signature label -> flagged inputs
    purged: float = 0.0  # guarded inputs answered after a purge


@dataclass
class Timeline:
    """Per-second rates at `times` (seconds from the first sample)."""

    times: list[float]
    inputs: list[float]
    detections: dict[str, list[float]]

    def total_detections(self) -> float:
        """Detections the timeline accounts for: the rates integrated over its steps."""
        steps = [b - a for a, b in zip([0.0, *self.times], self.times, strict=False)]
        return sum(r * dt for rates in self.detections.values() for r, dt in zip(rates, steps, strict=True))


def parse_scrape(text: str, t: float) -> Sample:
    """The guard's counters in one Prometheus text export, summed over tasks and Ray's per-process labels."""
    from prometheus_client.parser import text_string_to_metric_families

    inputs = purged = 0.0
    detections: dict[str, float] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as exc:
        raise LmsanError(f"not a Prometheus text export: {exc}") from exc
    for family in families:
        for s in family.samples:
            if s.name == INPUTS and s.labels.get("action") != Action.OFF.value:
                inputs += s.value
                purged += s.value if s.labels.get("action") == Action.PURGED.value else 0.0
            elif s.name == DETECTIONS:
                label = s.labels.get("signature", "")
                detections[label] = detections.get(label, 0.0) + s.value
    return Sample(t, inputs, detections, purged)


def _increase(before: float, after: float) -> float:
    # a counter that went down was reset (a replica restarted): it counted `after` since then
    return after - before if after >= before else after


def exports(samples: list[Sample]) -> list[Sample]:
    """The samples where a counter moved, plus the first and the last. Ray exports its counters
    every few seconds, so the scrapes between two exports repeat the same values; a rate taken
    between two such scrapes would read 0, then a spike as tall as the sampling is fine."""
    kept = samples[:1]
    for s in samples[1:-1]:
        if (s.inputs, s.detections) != (kept[-1].inputs, kept[-1].detections):
            kept.append(s)
    return kept + samples[-1:] if len(samples) > 1 else kept


def rates(samples: list[Sample]) -> Timeline:
    """Per-second rates between consecutive exports (see `exports`), each placed at the later
    sample's time: the rate holds over the interval that ends there."""
    if len(samples) < 2:
        raise LmsanError(f"a timeline needs at least 2 scrapes, got {len(samples)}")
    t0 = samples[0].t
    samples = exports(samples)
    signatures = sorted({sig for s in samples for sig in s.detections})
    times, inputs = [], []
    detections: dict[str, list[float]] = {sig: [] for sig in signatures}
    for a, b in zip(samples, samples[1:], strict=False):
        dt = b.t - a.t
        if dt <= 0:
            continue
        times.append(b.t - t0)
        inputs.append(_increase(a.inputs, b.inputs) / dt)
        for sig in signatures:
            detections[sig].append(_increase(a.detections.get(sig, 0.0), b.detections.get(sig, 0.0)) / dt)
    return Timeline(times, inputs, detections)


class MetricsSampler:
    """Scrapes `url` every `interval_s` in a daemon thread until stopped; use it as a context manager
    around the traffic. A failed scrape (endpoint busy or restarting) is skipped and counted."""

    def __init__(self, url: str, interval_s: float = 0.5, timeout_s: float = 5.0) -> None:
        if interval_s <= 0:
            raise LmsanError(f"the sampling interval must be positive, got {interval_s}")
        self.url, self.interval_s, self.timeout_s = url, interval_s, timeout_s
        self.samples: list[Sample] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmsan-metrics-sampler", daemon=True)

    def scrape(self) -> None:
        t = time.monotonic()
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout_s) as resp:
                text = resp.read().decode("utf-8", errors="replace")
            self.samples.append(parse_scrape(text, t))
        except (OSError, LmsanError):
            self.failures += 1

    def _run(self) -> None:
        while True:
            self.scrape()
            if self._stop.wait(self.interval_s):
                return

    def start(self) -> MetricsSampler:
        self._thread.start()
        return self

    def stop(self) -> Timeline:
        """Stop sampling, take one last scrape (Ray exports counters every few seconds, so the tail
        of the traffic may land after the last periodic one) and return the rates."""
        self._stop.set()
        self._thread.join(timeout=self.timeout_s + self.interval_s + 1)
        self.scrape()
        return rates(self.samples)

    def __enter__(self) -> MetricsSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.timeout_s + self.interval_s + 1)


def _query_range(base: str, query: str, start: float, end: float, step: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": query, "start": start, "end": end, "step": step})
    url = f"{base.rstrip('/')}/api/v1/query_range?{params}"
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise LmsanError(f"Prometheus refused {query!r}: HTTP {exc.code}") from exc
    except (OSError, ValueError) as exc:
        raise LmsanError(f"cannot read {base}: {exc}") from exc
    if body.get("status") != "success":
        raise LmsanError(f"Prometheus refused {query!r}: {body.get('error', body)}")
    return body["data"]["result"]


def from_prometheus(base: str, start: float, end: float, step: float = 1.0, window: str = "15s") -> Timeline:
    """The same timeline from a Prometheus server at `base` (http://host:9090) between the Unix
    times `start` and `end`; `window` is the rate window, a few scrape intervals long."""
    if end <= start or step <= 0:
        raise LmsanError(f"need start < end and step > 0, got start={start} end={end} step={step}")
    grid = [start + i * step for i in range(int((end - start) / step) + 1)]

    def on_grid(values: list) -> list[float]:
        got = {round(float(t), 3): float(v) for t, v in values}
        return [got.get(round(t, 3), math.nan) for t in grid]

    inputs = _query_range(base, inputs_query(window), start, end, step)
    detections = _query_range(base, detections_query(window), start, end, step)
    return Timeline([t - start for t in grid], on_grid(inputs[0]["values"]) if inputs else [math.nan] * len(grid),
                    {r["metric"].get("signature", ""): on_grid(r["values"]) for r in detections})


def plot_timeline(timeline: Timeline, out: str | Path, title: str = "guarded inputs and detections") -> Path:
    """Guarded inputs per second (grey) and detections per second by signature, as a PNG."""
    require_plotting()
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    try:
        # steps: each rate holds over the interval that ends at its time
        times, style = [0.0, *timeline.times], {"drawstyle": "steps-pre", "linewidth": 1.5}
        ax.plot(times, [0.0, *timeline.inputs], color="0.55", label="guarded inputs", **style)
        for sig, values in sorted(timeline.detections.items()):
            ax.plot(times, [0.0, *values], label=f"detections: {sig or '?'}", **style)
        ax.set_xlabel("seconds")
        ax.set_ylabel("inputs per second")
        ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize="small")
        fig.tight_layout()
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path
