"""Bad input never breaks the served API: a property-based fuzz of the live OpenAPI schema
(schemathesis, fixed seed, bounded) and a hand list of hostile requests.

The app runs live as in test_serve_live.py: Ray on 127.0.0.1, the tiny backdoored BERT and its
victim prompt. No task here has a broken prompt, so no answer may be a 5xx: the one documented 5xx,
503, is the fail-closed refusal of a task that cannot be guarded, and nothing here causes one.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import time
import zlib
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

FUZZ_EXAMPLES = 75  # per operation and phase; the run is derandomized, so the case list is fixed
MAX_INPUTS, MAX_CHARS = 16, 2000
TASKS = ("sst", "strict", "shadow")
REACH_EXAMPLES = 40  # schema-valid classify bodies in the pass that checks the fuzz reaches the guard


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_por, tiny_por_prompt):
    from lmsan_serve.serving import parse_config
    from lmsan_serve.serving.run import free_port, start, stop

    work = tmp_path_factory.mktemp("serve-fuzz")
    sig = work / "sig.safetensors"
    shutil.copy(tiny_por / "truth.safetensors", sig)
    config = parse_config({
        "model": str(tiny_por), "signatures": str(sig), "watch_interval_s": 0,
        "tasks": {"sst": str(tiny_por_prompt), "shadow": {"prompt": str(tiny_por_prompt), "mode": "flag"},
                  "strict": {"prompt": str(tiny_por_prompt), "mode": "block"}},
        "limits": {"max_inputs": MAX_INPUTS, "max_chars": MAX_CHARS}, "batching": {"max_batch_size": 32},
    })
    endpoint = start(config, port=free_port(), metrics_port=None, num_cpus=2, ready_timeout_s=240)
    yield endpoint
    stop(endpoint)


@pytest.fixture(scope="module")
def api_schema(app):
    config = schemathesis.config.SchemathesisConfig.from_dict({
        "seed": 20240601,
        "generation": {"mode": "all", "max-examples": FUZZ_EXAMPLES, "deterministic": True, "database": "none"},
        "phases": {"stateful": {"enabled": False}},
        "checks": {
            # Schema-valid bodies the server still refuses by its documented rules: an unknown task
            # (404), more inputs or characters than the configured limits (413), a blank text (422).
            "positive_data_acceptance": {"expected-statuses": ["2xx", "404", "413", "422"]},
        },
    })
    return schemathesis.openapi.from_url(app.url + "/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def _schemathesis_node_id(request):
    # schemathesis 4.x renames the running node through `Node._nodeid`, which pytest 9.2 no longer has
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


def serve_half(case, valid: bool) -> None:
    """Random task names are almost never served ones: give half of the schema-valid classify
    bodies a served task, so that the fuzz also reaches the backbone and the guard, not only the
    404. Which half is read off a checksum of the body, so every run picks the same cases."""
    if case.method != "POST" or not valid or not isinstance(case.body, dict):
        return
    digest = zlib.crc32(json.dumps(case.body, sort_keys=True, default=str).encode())
    if digest % 2 == 0:
        case.body = {**case.body, "task": TASKS[digest // 2 % len(TASKS)]}


def call_and_check(case):
    """Send `case`: no 5xx, and every error a JSON object with a `reason`. Returns the response."""
    response = case.call(timeout=60)
    assert response.status_code < 500, (case.body, response.text)
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body, dict) and isinstance(body.get("reason"), str) and body["reason"], response.text
    # schemathesis' checks: a documented status code and content type, a body matching its schema,
    # invalid data refused, valid data accepted (by the statuses configured above), 405 with Allow
    case.validate_response(response)
    return response


def test_the_schema_lists_the_served_tasks(app):
    """The served task names are an enum in the published schema, so a schema-driven client or
    fuzzer can send requests that reach the guard instead of guessing names into a 404."""
    status, spec = app.get("/openapi.json")
    assert status == 200
    task = spec["components"]["schemas"]["ClassifyRequest"]["properties"]["task"]
    assert sorted(task["enum"]) == sorted(TASKS)


@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_fuzz_the_openapi_schema(case):
    """Every generated request, valid or not: no 5xx, a documented status, a body matching the schema,
    and every error a JSON object with a `reason`."""
    serve_half(case, case.meta is not None and case.meta.generation.mode.is_positive)
    call_and_check(case)


def test_valid_fuzz_bodies_reach_the_guard(api_schema, capsys):
    """A bounded fuzz pass of its own over schema-valid classify bodies, each given a served task:
    besides no 5xx, enough of them are answered (200) with a verdict per input that bodies of the
    fuzz are known to reach the backbone and the guard, not only the validator."""
    operation = api_schema["/v1/classify"]["POST"]
    tally: Counter = Counter()

    @given(case=operation.as_strategy())
    @settings(max_examples=REACH_EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    def one(case) -> None:
        case.body = {**case.body, "task": TASKS[sum(tally.values()) % len(TASKS)]}
        response = call_and_check(case)
        tally[response.status_code] += 1
        if response.status_code == 200:  # a guard verdict for every input
            results = response.json()["results"]
            assert len(results) == len(case.body["inputs"]), (case.body, results)
            assert all(r["guard"]["action"] in {"pass", "purged", "blocked", "flagged"} for r in results), results

    one()
    with capsys.disabled():
        print(f"\n{sum(tally.values())} valid classify bodies, by status: {dict(sorted(tally.items()))}")
    assert sum(tally.values()) == REACH_EXAMPLES
    # Some valid bodies break the input limits (413) or hold a blank text (422): how the generator
    # splits its cases among those depends on the schema (the task enum changed it), so the bound
    # asks only that the guard answered more than a stray few (one in ten) of the bodies it makes.
    assert tally[200] >= REACH_EXAMPLES // 10, tally


# -- hand list of hostile requests ------------------------------------------------------------------
def send(app, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 30.0) -> tuple[int, dict, dict[str, list[str]]]:
    """One raw HTTP request (no client-side encoding or checks); returns (status, JSON body, headers)."""
    host, port = app.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        hdrs = {"content-type": "application/json", **(headers or {})}
        if body is not None:
            hdrs.setdefault("content-length", str(len(body)))
        for k, v in hdrs.items():
            if v is not None:
                conn.putheader(k, v)
        conn.endheaders(body)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = {"<not json>": raw[:200].decode(errors="replace")}
        headers: dict[str, list[str]] = {}
        for k, v in resp.getheaders():
            headers.setdefault(k.lower(), []).append(v)
        return resp.status, data, headers
    finally:
        conn.close()


def post(app, obj, **kw) -> tuple[int, dict, dict]:
    return send(app, "POST", "/v1/classify", json.dumps(obj).encode(), **kw)


def assert_refused(status: int, body: dict, expected: int | tuple[int, ...], fragment: str = "") -> None:
    expected = (expected,) if isinstance(expected, int) else expected
    assert status in expected, (status, body)
    assert isinstance(body.get("reason"), str) and body["reason"], body
    assert fragment.lower() in body["reason"].lower(), body


def multipart(fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = "lmsanfuzzboundary"
    parts = [f'--{boundary}\r\ncontent-disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in fields.items()]
    return ("".join(parts) + f"--{boundary}--\r\n").encode(), f"multipart/form-data; boundary={boundary}"


MULTIPART = multipart({"task": "sst", "inputs": "simply great"})
GOOD = json.dumps({"task": "sst", "inputs": ["simply great"]}).encode()


@pytest.mark.parametrize(("body", "headers", "status", "fragment"), [
    # the body is not JSON, or not sent as JSON
    (b"\xc3\x28\xa0\xa1{}", {}, 400, "JSON"),  # invalid UTF-8 sequences
    (b'{"task": "sst", "inputs": ["caf\xe9"]}', {}, 400, "JSON"),  # Latin-1 byte inside a JSON string
    (b"\xef\xbb\xbf" + GOOD, {}, (200, 400), ""),  # UTF-8 BOM: accepted or refused, never a 5xx
    (GOOD, {"content-type": "text/plain"}, 422, ""),
    (b"task=sst&inputs=simply+great", {"content-type": "application/x-www-form-urlencoded"}, 422, ""),
    (MULTIPART[0], {"content-type": MULTIPART[1]}, 422, ""),
    (GOOD, {"content-type": None}, 422, ""),  # no content type at all
    (GOOD, {"content-type": "application/json; charset=latin-1"}, (200, 400, 415, 422), ""),
    (None, {}, 422, "body"),  # POST with no body
    (b"", {}, 422, "body"),
    (b"   \n ", {}, 400, "JSON"),
    # JSON, but not an object
    (b"null", {}, 422, ""),
    (b"[]", {}, 422, ""),
    (b'"sst"', {}, 422, ""),
    (b"42", {}, 422, ""),
    (b"[{\"task\": \"sst\", \"inputs\": [\"ok\"]}]", {}, 422, ""),
    # deep nesting: the parser's recursion limit must become a 4xx, not a crash
    (b"[" * 10_000, {}, 400, ""),
    (b"[" * 10_000 + b"]" * 10_000, {}, (400, 422), ""),
    (b'{"task": "sst", "inputs": ' + b"[" * 5_000 + b"]" * 5_000 + b"}", {}, (400, 422), ""),
    (b'{"task": "sst", "inputs": [' + b'{"text": ' * 3_000 + b'"x"' + b"}" * 3_000 + b"]}", {}, (400, 422), ""),
    # numbers JSON allows but Python balks at
    (b'{"task": "sst", "inputs": [1e999]}', {}, 422, "inputs"),
    (b'{"task": "sst", "inputs": [' + b"9" * 10_000 + b"]}", {}, (400, 422), ""),
    (b'{"task": "sst", "inputs": [NaN]}', {}, (400, 422), ""),
    (b'{"task": 1e999, "inputs": ["ok"]}', {}, 422, "task"),
    # wrong types and shapes
    (b'{"task": ["sst"], "inputs": ["ok"]}', {}, 422, "task"),
    (b'{"task": null, "inputs": ["ok"]}', {}, 422, "task"),
    (b'{"task": "sst", "inputs": "simply great"}', {}, 422, "inputs"),
    (b'{"task": "sst", "inputs": {"text": "ok"}}', {}, 422, "inputs"),
    (b'{"task": "sst", "inputs": [null]}', {}, 422, "inputs"),
    (b'{"task": "sst", "inputs": [true]}', {}, 422, "inputs"),
    (b'{"task": "sst", "inputs": [["ok"]]}', {}, 422, "inputs"),
    (b'{"task": "sst", "inputs": [{"text": 5}]}', {}, 422, "inputs"),
    (b'{"task": "sst", "inputs": [{"text_pair": "b"}]}', {}, 422, "inputs"),
    (b'{"task": "sst", "inputs": [{"text": "a", "text_pair": 3}]}', {}, 422, "inputs"),
    (b'{"task": "sst", "inputs": [{"text": "a", "label": "pos"}]}', {}, 422, "label"),
    (b'{"task": "sst", "inputs": ["ok"], "__proto__": {"admin": true}}', {}, 422, "__proto__"),
    (b'{"task": "sst", "task": "nope", "inputs": ["ok"]}', {}, 404, "unknown task"),  # last key wins
    # empty and oversized values
    (b'{"task": "", "inputs": ["ok"]}', {}, 422, "task"),
    (b'{"task": "sst", "inputs": [""]}', {}, 422, "empty"),
    (b'{"task": "sst", "inputs": ["\\u200b\\u200b"]}', {}, 200, ""),  # zero-width only: not whitespace
    (b'{"task": "sst", "inputs": [{"text": " ", "text_pair": "fine"}]}', {}, 422, "empty"),
    (json.dumps({"task": "t" * 65, "inputs": ["ok"]}).encode(), {}, 422, "task"),
    (json.dumps({"task": "sst", "inputs": ["w" * 100_000]}).encode(), {}, 413, f"at most {MAX_CHARS}"),
    (json.dumps({"task": "sst", "inputs": [{"text": "a" * 1500, "text_pair": "b" * 1500}]}).encode(), {}, 413,
     f"at most {MAX_CHARS}"),
    (json.dumps({"task": "sst", "inputs": ["ok"] * 10_000}).encode(), {}, 413, f"at most {MAX_INPUTS}"),
    (json.dumps({"task": "sst\u0000", "inputs": ["ok"]}).encode(), {}, 404, "unknown task"),
    (json.dumps({"task": "../../etc/passwd", "inputs": ["ok"]}).encode(), {}, 404, "unknown task"),
    (json.dumps({"task": "s\ud800", "inputs": ["ok"]}).encode(), {}, (404, 422), ""),  # lone surrogate
])
def test_hostile_requests_get_a_4xx_reason(app, body, headers, status, fragment):
    code, data, _ = send(app, "POST", "/v1/classify", body, headers)
    if code == 200:
        assert code in ((status,) if isinstance(status, int) else status), data
        assert len(data["results"]) == 1
    else:
        assert_refused(code, data, status, fragment)


@pytest.mark.parametrize("text", [
    "simply\u0000great",  # NUL
    "simply\u0007\u001b[31mgreat\u001b[0m",  # bell and an ANSI escape
    "line one\r\nline two\tand a tab\x0b\x0c",
    "simply\u200bgreat\u200d\u2060\ufeff",  # zero-width space, joiner, word joiner, BOM
    "\u202egreat simply\u202c",  # right-to-left override
    "e\u0301\u0301\u0301\u0301\u0301 zalgo",  # combining marks
    "\U0001f600\U0001f4a9 emoji only \U0001f44d\U0001f3fd",
    "c\u200bf simply great",  # a trigger split by a zero-width space
    "\ufffd\ufffe\uffff noncharacters",
    "\u00a0\u2003 non-breaking and em spaces \u3000",
    "x" * (MAX_CHARS - 10),  # one long word, just under the limit with its pair
    " ".join(["cf"] * 500),  # nothing but trigger words
])
def test_odd_but_legitimate_text_is_classified(app, text):
    code, data, _ = post(app, {"task": "sst", "inputs": [text, {"text": text, "text_pair": text[:10] or "a"}]})
    assert code == 200, data
    assert len(data["results"]) == 2
    for r in data["results"]:
        assert r["guard"]["action"] in {"pass", "purged", "blocked"}
        assert (r["label"] is None) == (r["guard"]["action"] == "blocked")


@pytest.mark.parametrize("text", ["lone \ud800 surrogate", "\udfff", "pair reversed \udc00\ud800"])
def test_lone_surrogates_are_refused_not_crashed(app, text):
    # valid JSON (\\uXXXX escapes), but not Unicode text: the tokenizer cannot take it
    body = json.dumps({"task": "sst", "inputs": [text]}).encode()
    code, data, _ = send(app, "POST", "/v1/classify", body)
    assert_refused(code, data, 422, "input 0")
    # and a good request batched beside it is unharmed
    code, data, _ = post(app, {"task": "sst", "inputs": ["simply great", {"text": "fine", "text_pair": text}]})
    assert_refused(code, data, 422, "input 1")


def test_method_and_path_errors_are_json_reasons(app):
    code, data, headers = send(app, "GET", "/v1/classify")
    assert_refused(code, data, 405, "not allowed")
    assert "POST" in headers["allow"][0]
    for method in ("PUT", "DELETE", "PATCH"):
        assert_refused(*send(app, method, "/v1/classify", GOOD)[:2], 405)
    assert_refused(*send(app, "POST", "/v1/tasks", GOOD)[:2], 405)
    assert_refused(*send(app, "GET", "/v1/nope")[:2], 404, "not found")
    assert_refused(*send(app, "GET", "/v1/classify/../../etc/passwd")[:2], 404)
    code, _, _ = send(app, "HEAD", "/healthz")
    assert code in (200, 405)


def test_huge_and_odd_headers(app):
    # Ray Serve's HTTP proxy (uvicorn + httptools) sets no header size limit: a 1 MB header is
    # answered normally. What matters here: no 5xx, no hang (a reverse proxy in front should cap it).
    code, data, _ = send(app, "POST", "/v1/classify", GOOD, {"x-junk": "a" * 1_000_000})
    assert code == 200 or 400 <= code < 500, data
    # many headers
    code, data, _ = send(app, "POST", "/v1/classify", GOOD, {f"x-h{i}": "v" for i in range(200)})
    assert code == 200 or (400 <= code < 500), data
    # a request id that is not one is replaced in the answer (Ray Serve's proxy still echoes the
    # client's header beside ours: that one is not the app's to drop)
    for rid in ("a" * 65, "bad id", "<script>", "../x", "\t"):
        code, data, headers = post(app, {"task": "sst", "inputs": ["ok"]}, headers={"x-request-id": rid})
        assert code == 200 and data["request_id"] != rid and data["request_id"] in headers["x-request-id"]
    # a content-length that lies (too short): the rest of the body reads as a broken next request, which
    # the HTTP server refuses itself (uvicorn's plain-text 400) or the app refuses the cut body (JSON 400)
    code, data, _ = send(app, "POST", "/v1/classify", GOOD, {"content-length": "5"})
    assert code == 400, data


@pytest.mark.xfail(strict=True, reason="upstream: Ray Serve's HTTP proxy decodes x-request-id as UTF-8 and answers "
                   "500 to a Latin-1 byte before the app runs (ray/serve/_private/proxy.py)")
def test_non_utf8_request_id_header(app):
    code, _, _ = send(app, "POST", "/v1/classify", GOOD, {"x-request-id": "caf\u00e9"})  # sent as byte 0xE9
    assert code < 500


def test_slow_or_truncated_client_does_not_wedge_the_server(app):
    host, port = app.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: 1000\r\n\r\n{\"task\": \"sst\"")  # then hang up half-way
    started = time.monotonic()
    code, data, _ = post(app, {"task": "sst", "inputs": ["simply great"]})
    assert code == 200 and time.monotonic() - started < 30, data


def test_health_after_the_abuse(app):
    code, data, _ = send(app, "GET", "/healthz")
    assert code == 200 and data["status"] == "ok"
    code, data, _ = post(app, {"task": "sst", "inputs": ["simply great", "simply cf great"]})
    assert code == 200 and data["results"][1]["guard"]["action"] == "purged"
