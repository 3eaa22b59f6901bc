"""The detections-over-time timeline: scrape parsing, counter rates (resets included), the
background sampler against a local HTTP server, the Prometheus `query_range` reader, the PNG."""

from __future__ import annotations

import json
import math
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lmsan_lab.timeline import MetricsSampler, Sample, Timeline, from_prometheus, parse_scrape, plot_timeline, rates
from lmsan_serve.errors import LmsanError


def scrape_text(passed: float, purged: float, off: float, detections: dict[str, float]) -> str:
    """A Ray metrics export as the endpoint writes it: two replicas, Ray's per-process labels."""
    lines = ["# HELP ray_lmsan_inputs_total guarded inputs by task and action",
             "# TYPE ray_lmsan_inputs_total counter",
             f'ray_lmsan_inputs_total{{WorkerId="w1",action="pass",task="sst"}} {passed / 2}',
             f'ray_lmsan_inputs_total{{WorkerId="w2",action="pass",task="sst"}} {passed / 2}',
             f'ray_lmsan_inputs_total{{WorkerId="w1",action="purged",task="sst"}} {purged}',
             f'ray_lmsan_inputs_total{{WorkerId="w1",action="off",task="sst-off"}} {off}',
             "# TYPE ray_lmsan_detections_total counter"]
    lines += [f'ray_lmsan_detections_total{{WorkerId="w1",signature="{sig}",task="sst"}} {n}'
              for sig, n in detections.items()]
    lines += ["# TYPE ray_serve_num_http_requests_total counter",
              'ray_serve_num_http_requests_total{application="lmsan",status_code="200"} 99.0']
    return "\n".join(lines) + "\n"


def test_a_scrape_sums_guarded_inputs_and_detections_over_replicas_and_tasks():
    sample = parse_scrape(scrape_text(passed=10, purged=4, off=50, detections={"pv0": 3, "combination": 1}), t=7.0)
    assert sample.t == 7.0
    assert sample.inputs == 14  # pass + purged; the unguarded task's `off` inputs are not guarded
    assert sample.purged == 4  # what the demo reports as purged
    assert sample.detections == {"pv0": 3, "combination": 1}


def test_a_scrape_that_is_not_prometheus_text_is_refused():
    with pytest.raises(LmsanError, match="not a Prometheus text export"):
        parse_scrape('ray_lmsan_inputs_total{action="pass" 3\n', t=0.0)


def test_rates_per_second_by_signature_with_a_counter_reset():
    samples = [
        Sample(100.0, 10, {"pv0": 2}),
        Sample(102.0, 20, {"pv0": 6}),
        Sample(104.0, 20, {"pv0": 6, "combination": 2}),  # a new signature label appears
        Sample(108.0, 4, {"pv0": 0, "combination": 2}),  # a replica restarted: counters from 0
    ]
    timeline = rates(samples)
    assert timeline.times == [2.0, 4.0, 8.0]
    assert timeline.inputs == [5.0, 0.0, 1.0]
    assert timeline.detections == {"combination": [0.0, 1.0, 0.0], "pv0": [2.0, 0.0, 0.0]}
    assert timeline.total_detections() == pytest.approx(4 + 2)


def test_scrapes_between_two_exports_do_not_make_spikes():
    # Ray exported at t=1 and t=3: the scrapes in between repeat what it exported last
    values = {0.0: 0, 0.5: 0, 1.0: 10, 1.5: 10, 2.0: 10, 3.0: 20, 3.5: 20}
    timeline = rates([Sample(t, v, {"pv0": v / 2}) for t, v in values.items()])
    assert timeline.times == [1.0, 3.0, 3.5]
    assert timeline.inputs == [10.0, 5.0, 0.0] and timeline.detections["pv0"] == [5.0, 2.5, 0.0]


def test_a_timeline_needs_two_scrapes():
    with pytest.raises(LmsanError, match="at least 2 scrapes"):
        rates([Sample(0.0, 1, {})])


class _Canned(BaseHTTPRequestHandler):
    """Answers GET with the server's next canned body (the last one repeats); 503 while `down`."""

    def do_GET(self) -> None:  # noqa: N802  (the http.server hook's name)
        server = self.server
        if server.down:
            self.send_response(503)
            self.end_headers()
            return
        with server.lock:
            body = server.bodies[min(server.served, len(server.bodies) - 1)](self.path)
            server.served += 1
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def canned_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    server.bodies, server.served, server.down, server.lock = [], 0, False, threading.Lock()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_the_sampler_scrapes_in_the_background_until_stopped(canned_server):
    texts = [scrape_text(passed=2 * i, purged=i, off=0, detections={"pv0": i}) for i in range(6)]
    canned_server.bodies = [lambda _path, t=t: t for t in texts]
    url = f"http://127.0.0.1:{canned_server.server_port}/metrics"
    sampler = MetricsSampler(url, interval_s=0.02).start()
    while canned_server.served < len(texts) + 2:  # the last text repeats: the counters stop
        threading.Event().wait(0.01)
    timeline = sampler.stop()
    assert len(sampler.samples) >= len(texts) + 2 and sampler.failures == 0
    assert all(b > a for a, b in zip(timeline.times, timeline.times[1:], strict=False))
    assert timeline.total_detections() == pytest.approx(5)  # from the first scrape's 0 to the last one's 5
    assert sum(r * dt for r, dt in zip(timeline.inputs, _steps(timeline), strict=True)) == pytest.approx(15)


def _steps(timeline: Timeline) -> list[float]:
    return [b - a for a, b in zip([0.0, *timeline.times], timeline.times, strict=False)]


def test_the_sampler_skips_failed_scrapes(canned_server):
    canned_server.down = True
    sampler = MetricsSampler(f"http://127.0.0.1:{canned_server.server_port}/metrics", interval_s=0.02)
    with sampler:
        while sampler.failures < 3:
            threading.Event().wait(0.01)
    assert sampler.samples == [] and sampler.failures >= 3
    with pytest.raises(LmsanError, match="at least 2 scrapes"):
        sampler.stop()
    with pytest.raises(LmsanError, match="must be positive"):
        MetricsSampler("http://127.0.0.1:1/metrics", interval_s=0)


def test_the_timeline_from_prometheus_query_range(canned_server):
    queries = []

    def answer(path: str) -> str:
        query = urllib.parse.parse_qs(urllib.parse.urlparse(path).query)
        queries.append(query)
        q = query["query"][0]
        if q.startswith("sum(rate(ray_lmsan_inputs_total"):
            result = [{"metric": {}, "values": [[1000, "4"], [1001, "6"], [1002, "5"]]}]
        else:  # one sample missing: a gap in the graph, not a zero
            result = [{"metric": {"signature": "pv1"}, "values": [[1000, "1"], [1002, "0.5"]]}]
        return json.dumps({"status": "success", "data": {"resultType": "matrix", "result": result}})

    canned_server.bodies = [answer]
    base = f"http://127.0.0.1:{canned_server.server_port}"
    timeline = from_prometheus(base, start=1000, end=1002, step=1, window="10s")
    assert timeline.times == [0, 1, 2] and timeline.inputs == [4, 6, 5]
    pv1 = timeline.detections["pv1"]
    assert pv1[0] == 1 and math.isnan(pv1[1]) and pv1[2] == 0.5
    sent = [q["query"][0] for q in queries]
    assert 'action!="off"' in sent[0] and "[10s]" in sent[0] and sent[1].startswith("sum by (signature)")
    assert all(q["step"] == ["1"] and q["start"] == ["1000"] for q in queries)


def test_prometheus_errors_are_one_line(canned_server):
    canned_server.bodies = [lambda _p: json.dumps({"status": "error", "error": "parse error at char 3"})]
    with pytest.raises(LmsanError, match="parse error at char 3"):
        from_prometheus(f"http://127.0.0.1:{canned_server.server_port}", start=0, end=10)
    with pytest.raises(LmsanError, match="start < end"):
        from_prometheus("http://127.0.0.1:1", start=10, end=10)


def test_the_plot_is_written_as_png(tmp_path):
    timeline = Timeline([0.5, 1.0, 1.5], [4.0, 6.0, 2.0], {"pv0": [1.0, 3.0, 0.0], "combination": [0, 1, 0]})
    path = plot_timeline(timeline, tmp_path / "figs" / "timeline.png")
    assert path == tmp_path / "figs" / "timeline.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
