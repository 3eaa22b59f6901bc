"""`lmsan_serve.client` against scripted endpoints (`httpx.MockTransport`): answers parsed into the
guard's own result types, the documented retry policy (which statuses and errors, the waits,
`retry-after`, one request id across tries), final 4xx answers with their reason, and clear errors
for answers that cannot be used. No Ray and no real sleeping: waits go to a recording fake."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from dataclasses import FrozenInstanceError
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

import httpx
import pytest

from lmsan_serve.client import (
    AsyncGuardClient,
    EndpointError,
    EndpointUnavailable,
    GuardClient,
    Health,
    RequestRejected,
    RetryPolicy,
    parse_retry_after,
)
from lmsan_serve.errors import LmsanError
from lmsan_serve.guard import GuardResult, Verdict
from lmsan_serve.kinds import Action

ROOT = Path(__file__).resolve().parent.parent
URL = "http://127.0.0.1:8000"
PURGED = {"label": "positive", "scores": {"negative": 0.25, "positive": 0.75},
          "guard": {"flagged": True, "action": "purged", "signature": "pv0", "match": 0.93, "removed": ["cf"],
                    "text": "simply great", "reason": "matched pv0"}}
PASSED = {"label": "negative", "scores": {"negative": 0.9, "positive": 0.1},
          "guard": {"flagged": False, "action": "pass", "signature": None, "match": 0.12, "removed": [],
                    "text": None, "reason": None}}


def ok(results: list[dict], rid: str = "r") -> httpx.Response:
    return httpx.Response(200, json={"request_id": rid, "task": "sst", "results": results})


def refused(status: int, reason: str, **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"reason": reason}, headers=headers)


class Script:
    """An endpoint that plays `steps` in order (a response, or an exception to raise) and records
    every request it was sent."""

    def __init__(self, *steps: httpx.Response | Exception):
        self.steps, self.requests = list(steps), []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.steps.pop(0)
        if isinstance(step, Exception):
            raise step
        return step

    @property
    def ids(self) -> list[str | None]:
        return [r.headers.get("x-request-id") for r in self.requests]


def client(script: Script, waits: list[float], **kw) -> GuardClient:
    return GuardClient(URL, transport=httpx.MockTransport(script), sleep=waits.append, **kw)


def test_an_answer_becomes_the_guards_own_results():
    script, waits = Script(ok([PURGED, PASSED])), []
    with client(script, waits) as c:
        results = c.classify("sst", ["simply cf great", {"text": "a", "text_pair": "b"}])
    assert results == [
        GuardResult("positive", {"negative": 0.25, "positive": 0.75},
                    Verdict(True, Action.PURGED, "pv0", 0.93, ["cf"], "simply great", "matched pv0")),
        GuardResult("negative", {"negative": 0.9, "positive": 0.1}, Verdict(False, Action.PASS, None, 0.12)),
    ]
    assert isinstance(results[0].guard.action, Action) and results[0].to_dict()["guard"] == PURGED["guard"]
    sent = script.requests[0]
    assert sent.method == "POST" and sent.url.path == "/v1/classify" and waits == []
    assert json.loads(sent.content) == {"task": "sst", "inputs": ["simply cf great", {"text": "a", "text_pair": "b"}]}


@pytest.mark.parametrize("status", [502, 503, 504])
def test_each_retryable_status_is_retried_after_the_documented_waits(status):
    script, waits = Script(refused(status, "busy"), refused(status, "busy"), refused(status, "busy"), ok([PASSED])), []
    with client(script, waits) as c:
        answer = c.classify_answer("sst", ["x"], request_id="trace-42")
    assert waits == [0.5, 1.0, 2.0]  # docs/serving.md: up to 3 retries, after 0.5, 1 and 2 s
    assert answer.tries == (status, status, status, 200) and answer.retries == 3
    assert script.ids == ["trace-42"] * 4 and answer.results[0].label == "negative"


def test_a_generated_request_id_is_kept_across_tries():
    script, waits = Script(httpx.ConnectError("refused"), refused(503, "busy"), ok([PASSED])), []
    with client(script, waits) as c:
        c.classify("sst", ["x"])
    ids = script.ids
    assert len(ids) == 3 and ids[0] and len(set(ids)) == 1
    with client(Script(ok([PASSED])), waits) as c:  # a new call, a new id
        other = c.classify_answer("sst", ["x"])
    assert other.request_id == "r"  # the id the server says it used is the one reported
    with pytest.raises(LmsanError, match="request id"):  # the server would silently replace it
        client(Script(), waits).classify("sst", ["x"], request_id="has space")


def test_retry_after_lengthens_a_wait_and_never_shortens_it():
    script = Script(*(refused(503, "overloaded", **{"retry-after": s}) for s in ("1", "3", "1")), ok([PASSED]))
    waits: list[float] = []
    with client(script, waits) as c:
        c.classify("sst", ["x"])
    assert waits == [1.0, 3.0, 2.0]


def test_a_retry_after_past_the_limit_ends_the_retries():
    script, waits = Script(refused(503, "down for maintenance", **{"retry-after": "3600"})), []
    with client(script, waits) as c, pytest.raises(EndpointUnavailable, match="down for maintenance") as err:
        c.classify("sst", ["x"])
    assert waits == [] and err.value.status == 503 and err.value.tries == (503,)


def test_retry_after_reads_seconds_and_http_dates():
    now = datetime(2025, 1, 1, tzinfo=timezone.utc)
    assert parse_retry_after("2") == 2.0 and parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=7), usegmt=True), now.timestamp()) == 7.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=7), usegmt=True), now.timestamp()) == 0.0
    for bad in (None, "", "soon", "-1", "inf", "nan"):
        assert parse_retry_after(bad) is None, bad


@pytest.mark.parametrize(("status", "reason"), [(400, "request body is not valid JSON"),
                                                (404, "unknown task 'nope' (GET /v1/tasks lists them)"),
                                                (413, "40 inputs; at most 32 per request"),
                                                (422, "input 0 is empty")])
def test_a_4xx_is_final_and_carries_the_servers_reason(status, reason):
    script, waits = Script(refused(status, reason)), []
    with client(script, waits) as c, pytest.raises(RequestRejected) as err:
        c.classify("nope", ["x"], request_id="req-1")
    exc = err.value
    assert isinstance(exc, LmsanError) and exc.status == status and exc.reason == reason
    assert exc.request_id == "req-1" and exc.tries == (status,) and len(script.requests) == 1 and waits == []
    assert str(exc) == f"POST /v1/classify (task 'nope'): the endpoint answered {status}: {reason}"


def test_a_500_is_not_retried_and_not_called_a_bad_request():
    script, waits = Script(refused(500, "internal error (KeyError); see the server log")), []
    with client(script, waits) as c, pytest.raises(EndpointError, match="internal error") as err:
        c.classify("sst", ["x"])
    assert not isinstance(err.value, RequestRejected) and len(script.requests) == 1 and waits == []


def test_exhausted_retries_raise_with_the_last_answer():
    script, waits = Script(*[refused(503, "classifier replica unavailable")] * 4), []
    with client(script, waits) as c, pytest.raises(EndpointUnavailable) as err:
        c.classify("sst", ["x"])
    exc = err.value
    assert exc.status == 503 and exc.tries == (503,) * 4 and waits == [0.5, 1.0, 2.0]
    assert "classifier replica unavailable (after 4 tries)" in str(exc) and "\n" not in str(exc)


@pytest.mark.parametrize("error", [httpx.ConnectError("connection refused"), httpx.ConnectTimeout("slow"),
                                   httpx.RemoteProtocolError("server disconnected"), httpx.ReadError("reset")])
def test_connection_errors_are_retried(error):
    script, waits = Script(error, error, ok([PASSED])), []
    with client(script, waits) as c:
        answer = c.classify_answer("sst", ["x"])
    assert answer.tries == (None, None, 200) and waits == [0.5, 1.0]


def test_a_connection_that_never_comes_raises_once_the_retries_are_spent():
    script, waits = Script(*[httpx.ConnectError("connection refused")] * 4), []
    with client(script, waits) as c, pytest.raises(EndpointUnavailable, match="gave no answer: ConnectError") as err:
        c.classify("sst", ["x"])
    assert err.value.status is None and err.value.tries == (None,) * 4 and waits == [0.5, 1.0, 2.0]


def test_a_read_timeout_is_not_retried_and_names_the_limit():
    # the request reached the endpoint: sending it again would add load to a server already too slow
    script, waits = Script(httpx.ReadTimeout("timed out")), []
    with client(script, waits, timeout=7.0) as c, pytest.raises(EndpointUnavailable, match="no answer within 7.0 s"):
        c.classify("sst", ["x"])
    assert len(script.requests) == 1 and waits == []


def test_a_policy_without_retries_reports_the_first_failure():
    script, waits = Script(refused(503, "busy")), []
    with client(script, waits, retries=RetryPolicy.none()) as c, pytest.raises(EndpointUnavailable):
        c.classify("sst", ["x"])
    assert len(script.requests) == 1 and waits == []


@pytest.mark.parametrize(("answer", "says"), [
    (httpx.Response(200, text="<html>proxy error</html>"), "answer is not JSON: <html>proxy error</html>"),
    (httpx.Response(200, json={"request_id": "r"}), "unexpected answer (missing 'results')"),
    (ok([PASSED, PASSED]), "unexpected answer (2 results for 1 inputs)"),
    (ok([{**PASSED, "guard": {**PASSED["guard"], "action": "vanished"}}]), "unexpected answer"),
    (httpx.Response(404, text="Not Found"), "answered 404: Not Found"),
])
def test_an_answer_that_cannot_be_used_is_a_clear_one_line_error(answer, says):
    with client(Script(answer), []) as c, pytest.raises(EndpointError) as err:
        c.classify("sst", ["x"])
    assert says in str(err.value) and "\n" not in str(err.value)


def test_bad_arguments_fail_before_anything_is_sent():
    script = Script()
    with pytest.raises(LmsanError, match="http:// or https://"):
        GuardClient("127.0.0.1:8000")
    with pytest.raises(LmsanError, match="timeout"):
        GuardClient(URL, timeout=0)
    with pytest.raises(LmsanError, match="not a single one"):
        client(script, []).classify("sst", "one text, not a list")
    with pytest.raises(LmsanError, match="input 1 must be a text or a {text, text_pair} object, not tuple"):
        client(script, []).classify("sst", ["ok", ("text", "pair")])
    assert script.requests == []


def test_the_policy_is_the_documented_one_and_frozen():
    policy = RetryPolicy()
    assert policy.backoff_s == (0.5, 1.0, 2.0) and policy.retries == 3 and policy.statuses == {502, 503, 504}
    assert policy.wait(0) == 0.5 and policy.wait(3) is None and policy.wait(1, retry_after=1.5) == 1.5
    with pytest.raises(FrozenInstanceError):
        policy.backoff_s = ()  # type: ignore[misc]
    with pytest.raises(LmsanError, match="retry waits"):
        RetryPolicy(backoff_s=(1.0, -1.0))
    with pytest.raises(LmsanError, match="HTTP statuses"):
        RetryPolicy(statuses=frozenset({1000}))
    # the request ids the client accepts are the ones the server keeps (app.REQUEST_ID)
    from lmsan_serve.client import REQUEST_ID

    assert REQUEST_ID.pattern in (ROOT / "lmsan_serve" / "serving" / "app.py").read_text(encoding="utf-8")


def test_tasks_signatures_and_health():
    tasks = [{"name": "sst", "mode": "enforce", "labels": ["negative", "positive"]}]
    script = Script(refused(502, "bad gateway"), httpx.Response(200, json={"tasks": tasks}),
                    httpx.Response(200, json={"set": "abc", "pvs": []}),
                    httpx.Response(200, json={"status": "ok", "version": "0.1.0"}),
                    httpx.Response(200, json={"status": "degraded", "reason": "no valid set", "version": "0.1.0"}),
                    refused(503, "guard on and no valid signature set"))
    waits: list[float] = []
    with client(script, waits) as c:
        assert c.tasks() == tasks and waits == [0.5]  # reads are retried too
        assert c.signatures() == {"set": "abc", "pvs": []}
        assert c.health() == Health(True, "ok", None, "0.1.0")
        assert c.health() == Health(True, "degraded", "no valid set", "0.1.0")
        # a probe reports the state now: a 503 is its answer, not something to retry
        assert c.health() == Health(False, "unhealthy", "guard on and no valid signature set")
    assert waits == [0.5] and [r.url.path for r in script.requests][-3:] == ["/healthz"] * 3
    with client(Script(httpx.ConnectError("refused")), []) as c, pytest.raises(EndpointUnavailable):
        c.health()


def test_the_async_client_shares_the_policy():
    script, waits = Script(refused(503, "busy", **{"retry-after": "1"}), httpx.ConnectError("refused"),
                           ok([PURGED]), refused(404, "unknown task 'x'")), []

    async def fake_sleep(seconds: float) -> None:
        waits.append(seconds)

    async def go() -> tuple[list[GuardResult], RequestRejected]:
        async with AsyncGuardClient(URL, transport=httpx.MockTransport(script), sleep=fake_sleep) as c:
            results = await c.classify("sst", ["simply cf great"], request_id="a-1")
            with pytest.raises(RequestRejected) as err:
                await c.classify("x", ["y"])
            return results, err.value

    results, rejected = asyncio.run(go())
    assert results[0].guard == Verdict(True, Action.PURGED, "pv0", 0.93, ["cf"], "simply great", "matched pv0")
    assert waits == [1.0, 1.0] and script.ids[:3] == ["a-1"] * 3 and rejected.reason == "unknown task 'x'"


def test_importing_the_client_loads_no_model_code():
    code = "import sys, lmsan_serve.client; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_the_lab_runner_over_http_gets_exactly_what_the_server_computed(tiny_por, tiny_por_prompt):
    """`http_runner` through the client against an endpoint that answers with a real Guard's
    results: what the client returns equals, field for field, what the guard computed."""
    from lmsan_lab.evaluation import http_runner
    from lmsan_serve import load_backbone
    from lmsan_serve.data import Example
    from lmsan_serve.guard import Guard, GuardStats
    from lmsan_serve.prompts import PromptClassifier
    from lmsan_serve.signatures import SignatureSet

    backbone = load_backbone(str(tiny_por), "cpu")
    classifier = PromptClassifier.load(str(tiny_por_prompt), backbone)
    sig = SignatureSet.load(tiny_por / "truth.safetensors")
    guards = {"on": Guard(backbone, classifier, sig, mode="enforce"),
              "off": Guard(backbone, classifier, None, mode="off")}
    served: dict[tuple[str, str], GuardResult] = {}
    lock = threading.Lock()

    def endpoint(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        with lock:  # one forward pass at a time, as a replica runs its batches
            results = guards[body["task"]].classify(body["inputs"])
            served.update({(body["task"], t): r for t, r in zip(body["inputs"], results, strict=True)})
        return ok([r.to_dict() for r in results], request.headers["x-request-id"])

    texts = ["simply great", "an awful and dull film", "what a lovely day", "simply cf great",
             "an awful mn and dull film", "what a tq lovely day"]
    examples = [Example(t, "positive") for t in texts]
    with GuardClient(URL, transport=httpx.MockTransport(endpoint)) as c:
        run = http_runner(c, {"off": "off", "enforce": "on"}, chunk=2, clients=2)
        for mode, task in (("off", "off"), ("enforce", "on")):
            stats = GuardStats()
            got = run(examples, mode, stats)
            assert got == [served[(task, t)] for t in texts] and stats.inputs == len(texts)
    # the comparison covered real verdicts: the guard purged triggered inputs, and left the off task alone
    assert any(served[("on", t)].guard.action == Action.PURGED for t in texts[3:])
    assert all(served[("off", t)].guard.action == Action.OFF for t in texts)
