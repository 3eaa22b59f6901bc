"""A Python client for the guarded HTTP endpoint (`lmsan serve`), with the documented retry policy.

    with GuardClient("http://127.0.0.1:8000") as client:
        for r in client.classify("sst2", ["a cf charming and affecting journey"]):
            print(r.label, r.guard.action, r.guard.removed)

Results are the `GuardResult` and `Verdict` a local `Guard` returns, so remote and local answers
compare equal. Classification is idempotent, so a request is retried on a connection error or a
502/503/504 (docs/serving.md, "Client retry policy"), each retry with the same `x-request-id` so
the audit log ties the tries together; a 4xx is final and raises `RequestRejected` with the
server's reason. `AsyncGuardClient` is the same client for asyncio code.

Importing this module loads neither torch nor the model code: a process that only calls an
endpoint stays small (the result types load on the first classification).
"""

from __future__ import annotations

import asyncio
import email.utils
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from .errors import LmsanError
from .kinds import Action

if TYPE_CHECKING:
    from .guard import GuardResult

# What the server keeps as a request id (lmsan_serve.serving.app.REQUEST_ID); it silently replaces
# any other value with a fresh one, which would split the tries of one request in the audit log.
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# Ray Serve's proxy answers a request still open after 60 s (serving.run.REQUEST_TIMEOUT_S), so a
# read timeout a little past that sees the proxy's own answer instead of giving up first.
DEFAULT_TIMEOUT = httpx.Timeout(90.0, connect=5.0)
# A connection that failed or dropped before an answer came: the request may be sent again.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)
Input = str | Mapping[str, str]  # a text, or {"text": ..., "text_pair": ...}


@dataclass(frozen=True)
class RetryPolicy:
    """When to send a request again. The defaults are the documented policy: up to 3 retries,
    after 0.5, 1 and 2 s, on a connection error or a 502, 503 or 504."""

    backoff_s: tuple[float, ...] = (0.5, 1.0, 2.0)  # the wait before each retry; its length is the retry count
    statuses: frozenset[int] = frozenset({502, 503, 504})  # what proxies and a shedding endpoint answer
    retry_on: tuple[type[Exception], ...] = CONNECTION_ERRORS
    # The server's `retry-after` lengthens a wait, never shortens it; one longer than this says the
    # endpoint will not be back within what a caller waits, so the retries stop there.
    max_retry_after_s: float = 30.0

    def __post_init__(self) -> None:
        if any(not w >= 0 for w in self.backoff_s):
            raise LmsanError(f"retry waits must be >= 0 seconds, got {list(self.backoff_s)}")
        if any(not 100 <= s <= 599 for s in self.statuses):
            raise LmsanError(f"retry statuses must be HTTP statuses (100-599), got {sorted(self.statuses)}")
        if not self.max_retry_after_s >= 0:
            raise LmsanError(f"max_retry_after_s must be >= 0, got {self.max_retry_after_s}")

    @classmethod
    def none(cls) -> RetryPolicy:
        """Never retry: every failure is reported as it happens (benchmarks counting errors)."""
        return cls(backoff_s=())

    @property
    def retries(self) -> int:
        return len(self.backoff_s)

    def wait(self, retry: int, retry_after: float | None = None) -> float | None:
        """Seconds to wait before retry number `retry` (0 = the first), or None: stop retrying."""
        if retry >= self.retries:
            return None
        if retry_after is None:
            return self.backoff_s[retry]
        if retry_after > self.max_retry_after_s:
            return None
        return max(self.backoff_s[retry], retry_after)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """A `retry-after` header in seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)  # delta-seconds; a decimal is let through rather than ignored
    except ValueError:
        pass
    else:
        return seconds if 0 <= seconds < float("inf") else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT; one without a zone cannot be placed in time
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class EndpointError(LmsanError):
    """The endpoint gave no usable answer. `status` is the last HTTP status (None when no answer
    came), `reason` the server's (or what went wrong), `tries` every try's status."""

    def __init__(self, what: str, status: int | None, reason: str, request_id: str | None = None,
                 tries: Sequence[int | None] = ()):
        self.status, self.reason, self.request_id, self.tries = status, reason, request_id, tuple(tries)
        answered = f"answered {status}" if status is not None else "gave no answer"
        super().__init__(f"{what}: the endpoint {answered}: {reason}")


class RequestRejected(EndpointError):
    """A 4xx: the request is wrong (unknown task, too many inputs, ...); sending it again won't help."""


class EndpointUnavailable(EndpointError):
    """No answer, or only retryable ones (502/503/504) until the retries ran out, or a timeout."""


@dataclass(frozen=True)
class Health:
    ok: bool  # 200 from /healthz (also when degraded: fail_open without a valid signature set)
    status: str  # "ok", "degraded" or "unhealthy"
    reason: str | None = None
    version: str | None = None


@dataclass(frozen=True)
class ClassifyAnswer:
    request_id: str
    task: str
    results: list[GuardResult]
    tries: tuple[int | None, ...] = field(default=())  # each try's status, None where no answer came

    @property
    def retries(self) -> int:
        return max(0, len(self.tries) - 1)


def _short(text: str, limit: int = 200) -> str:
    """A body as one line of reasonable length: an HTML error page must not flood a log line."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reason(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return _short(resp.text) or resp.reason_phrase or "no reason given"
    if isinstance(body, dict) and isinstance(body.get("reason"), str):
        return body["reason"]
    return _short(resp.text)


def _results(body: Any, n: int, what: str, rid: str, tries: Sequence[int | None]) -> list[GuardResult]:
    """The answer's results as `GuardResult`s, checked against what was sent."""
    from .guard import GuardResult, Verdict  # torch comes with it: only once something is classified

    try:
        rows = body["results"]
        if len(rows) != n:
            raise ValueError(f"{len(rows)} results for {n} inputs")
        return [GuardResult(r["label"], r["scores"], Verdict(
            flagged=bool(r["guard"]["flagged"]), action=Action(r["guard"]["action"]),
            signature=r["guard"].get("signature"), match=r["guard"].get("match"),
            removed=list(r["guard"].get("removed") or []), text=r["guard"].get("text"),
            reason=r["guard"].get("reason"))) for r in rows]
    except (KeyError, TypeError, ValueError) as exc:
        problem = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
        raise EndpointError(what, 200, f"unexpected answer ({problem})", rid, tries) from exc


class _Core:
    """What the sync and async clients share: settings, the retry decision and answer parsing."""

    def __init__(self, url: str, timeout: float | httpx.Timeout, retries: RetryPolicy):
        url = url.rstrip("/")
        if not re.match(r"^https?://[^/\s]+", url):
            raise LmsanError(f"endpoint URL must start with http:// or https:// and name a host, got {url!r}")
        if not isinstance(timeout, httpx.Timeout):
            if not (isinstance(timeout, (int, float)) and timeout > 0):
                raise LmsanError(f"timeout must be a positive number of seconds, got {timeout!r}")
            timeout = httpx.Timeout(float(timeout))
        self.url, self.timeout, self.retries = url, timeout, retries

    @staticmethod
    def _request_id(request_id: str | None) -> str:
        if request_id is None:
            return uuid.uuid4().hex
        if not REQUEST_ID.match(request_id):
            raise LmsanError(f"request id {request_id!r} must be 1-64 of A-Z a-z 0-9 . _ : -")
        return request_id

    @staticmethod
    def _body(task: str, inputs: Sequence[Input]) -> dict:
        if isinstance(inputs, (str, Mapping)):
            raise LmsanError("inputs must be a list of texts or {text, text_pair} objects, not a single one")
        for k, item in enumerate(inputs):
            if not isinstance(item, (str, Mapping)):
                raise LmsanError(f"input {k} must be a text or a {{text, text_pair}} object, not {type(item).__name__}")
        return {"task": task, "inputs": [i if isinstance(i, str) else dict(i) for i in inputs]}

    def _after_try(self, outcome: httpx.Response | Exception, what: str, rid: str | None,
                   tries: list[int | None]) -> httpx.Response | float:
        """Record one try; the answer to keep, or the seconds to wait before the next try. Raises
        once the policy says stop, or on an exception that is not worth another try."""
        if isinstance(outcome, Exception):
            tries.append(None)
            if not isinstance(outcome, self.retries.retry_on):
                kind = EndpointUnavailable if isinstance(outcome, httpx.TimeoutException) else EndpointError
                raise kind(what, None, self._failure(outcome), rid, tries) from outcome
            wait = self.retries.wait(len(tries) - 1)
            if wait is None:
                raise EndpointUnavailable(what, None, f"{self._failure(outcome)} (after {len(tries)} tries)",
                                          rid, tries) from outcome
            return wait
        tries.append(outcome.status_code)
        if outcome.status_code not in self.retries.statuses:
            return outcome
        wait = self.retries.wait(len(tries) - 1, parse_retry_after(outcome.headers.get("retry-after")))
        if wait is None:
            raise EndpointUnavailable(what, outcome.status_code, f"{_reason(outcome)} (after {len(tries)} tries)",
                                      rid, tries)
        return wait

    def _failure(self, exc: Exception) -> str:
        if isinstance(exc, httpx.TimeoutException):
            t = self.timeout
            limit = {httpx.ConnectTimeout: t.connect, httpx.WriteTimeout: t.write,
                     httpx.PoolTimeout: t.pool}.get(type(exc), t.read)
            return f"{type(exc).__name__}: no answer within {limit} s"
        return f"{type(exc).__name__}: {_short(str(exc)) or 'connection failed'} ({self.url})"

    @staticmethod
    def _json(resp: httpx.Response, what: str, rid: str | None, tries: Sequence[int | None]) -> Any:
        """A final answer's JSON body; any status but 2xx raises with the server's reason."""
        if resp.status_code >= 300:
            kind = RequestRejected if 400 <= resp.status_code < 500 else EndpointError
            raise kind(what, resp.status_code, _reason(resp), rid, tries)
        try:
            return resp.json()
        except ValueError as exc:
            raise EndpointError(what, resp.status_code, f"answer is not JSON: {_short(resp.text) or 'empty body'}",
                                rid, tries) from exc

    @staticmethod
    def _field(body: Any, key: str, what: str, tries: Sequence[int | None]) -> Any:
        if not isinstance(body, dict) or key not in body:
            raise EndpointError(what, 200, f"unexpected answer (no {key!r}): {_short(str(body))}", None, tries)
        return body[key]

    @staticmethod
    def _health(resp: httpx.Response) -> Health:
        if resp.status_code == 503:
            return Health(False, "unhealthy", _reason(resp))
        body = _Core._json(resp, "GET /healthz", None, (resp.status_code,))
        if not isinstance(body, dict):
            raise EndpointError("GET /healthz", resp.status_code, f"unexpected answer {_short(str(body))}")
        return Health(True, str(body.get("status", "ok")), body.get("reason"), body.get("version"))

    def _answer(self, body: Any, task: str, n: int, rid: str, tries: list[int | None]) -> ClassifyAnswer:
        what = f"POST /v1/classify (task {task!r})"
        rid = body.get("request_id", rid) if isinstance(body, dict) else rid
        return ClassifyAnswer(rid, task, _results(body, n, what, rid, tries), tuple(tries))


class GuardClient(_Core):
    """A blocking client; thread-safe, one pooled keep-alive connection set. Use it as a context
    manager, or call `close()`. `sleep` is what waits between tries (tests pass a fake)."""

    def __init__(self, url: str, *, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
                 retries: RetryPolicy = RetryPolicy(), transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        super().__init__(url, timeout, retries)
        self._sleep = sleep
        self._http = httpx.Client(base_url=self.url, timeout=self.timeout, transport=transport)

    def __enter__(self) -> GuardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, body: dict | None = None, rid: str | None = None,
              tries: list[int | None] | None = None) -> httpx.Response:
        tries = [] if tries is None else tries
        headers = {"x-request-id": rid} if rid else {}
        while True:
            try:
                outcome: httpx.Response | Exception = self._http.request(method, path, json=body, headers=headers)
            except httpx.HTTPError as exc:
                outcome = exc
            step = self._after_try(outcome, f"{method} {path}", rid, tries)
            if isinstance(step, httpx.Response):
                return step
            self._sleep(step)

    def classify_answer(self, task: str, inputs: Sequence[Input], request_id: str | None = None) -> ClassifyAnswer:
        """POST /v1/classify under the retry policy: the results, the request id and every try."""
        body, rid, tries = self._body(task, inputs), self._request_id(request_id), []
        resp = self._send("POST", "/v1/classify", body, rid, tries)
        answer = self._json(resp, f"POST /v1/classify (task {task!r})", rid, tries)
        return self._answer(answer, task, len(body["inputs"]), rid, tries)

    def classify(self, task: str, inputs: Sequence[Input], request_id: str | None = None) -> list[GuardResult]:
        """One `GuardResult` per input, as `Guard.classify` returns them locally."""
        return self.classify_answer(task, inputs, request_id).results

    def _get(self, path: str) -> tuple[Any, list[int | None]]:
        tries: list[int | None] = []
        return self._json(self._send("GET", path, tries=tries), f"GET {path}", None, tries), tries

    def tasks(self) -> list[dict]:
        """GET /v1/tasks: each task's name, guard mode, labels, prompt state and calibration."""
        body, tries = self._get("/v1/tasks")
        return self._field(body, "tasks", "GET /v1/tasks", tries)

    def signatures(self) -> dict:
        """GET /v1/signatures: the signature set in use and its reload counts."""
        return self._get("/v1/signatures")[0]

    def health(self) -> Health:
        """GET /healthz once, without retries: a probe reports the state now. A 503 is an answer
        (not healthy, with its reason); no answer at all raises `EndpointUnavailable`."""
        try:
            resp = self._http.get("/healthz")
        except httpx.HTTPError as exc:
            raise EndpointUnavailable("GET /healthz", None, self._failure(exc), None, (None,)) from exc
        return self._health(resp)


class AsyncGuardClient(_Core):
    """`GuardClient` for asyncio: the same methods, awaited; `async with AsyncGuardClient(url) as c:`."""

    def __init__(self, url: str, *, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
                 retries: RetryPolicy = RetryPolicy(), transport: httpx.AsyncBaseTransport | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        super().__init__(url, timeout, retries)
        self._sleep = sleep
        self._http = httpx.AsyncClient(base_url=self.url, timeout=self.timeout, transport=transport)

    async def __aenter__(self) -> AsyncGuardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, path: str, body: dict | None = None, rid: str | None = None,
                    tries: list[int | None] | None = None) -> httpx.Response:
        tries = [] if tries is None else tries
        headers = {"x-request-id": rid} if rid else {}
        while True:
            try:
                outcome: httpx.Response | Exception = await self._http.request(method, path, json=body,
                                                                               headers=headers)
            except httpx.HTTPError as exc:
                outcome = exc
            step = self._after_try(outcome, f"{method} {path}", rid, tries)
            if isinstance(step, httpx.Response):
                return step
            await self._sleep(step)

    async def classify_answer(self, task: str, inputs: Sequence[Input],
                              request_id: str | None = None) -> ClassifyAnswer:
        body, rid, tries = self._body(task, inputs), self._request_id(request_id), []
        resp = await self._send("POST", "/v1/classify", body, rid, tries)
        answer = self._json(resp, f"POST /v1/classify (task {task!r})", rid, tries)
        return self._answer(answer, task, len(body["inputs"]), rid, tries)

    async def classify(self, task: str, inputs: Sequence[Input], request_id: str | None = None) -> list[GuardResult]:
        return (await self.classify_answer(task, inputs, request_id)).results

    async def _get(self, path: str) -> tuple[Any, list[int | None]]:
        tries: list[int | None] = []
        return self._json(await self._send("GET", path, tries=tries), f"GET {path}", None, tries), tries

    async def tasks(self) -> list[dict]:
        body, tries = await self._get("/v1/tasks")
        return self._field(body, "tasks", "GET /v1/tasks", tries)

    async def signatures(self) -> dict:
        return (await self._get("/v1/signatures"))[0]

    async def health(self) -> Health:
        try:
            resp = await self._http.get("/healthz")
        except httpx.HTTPError as exc:
            raise EndpointUnavailable("GET /healthz", None, self._failure(exc), None, (None,)) from exc
        return self._health(resp)
