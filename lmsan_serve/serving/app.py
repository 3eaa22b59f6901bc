"""The Ray Serve application: a FastAPI ingress and the guarded classifier behind it.

    serve run lmsan_serve.serving.app:build_app model=... (or a config in deployments/)

The ingress validates and limits requests; `GuardedClassifier` owns the one frozen backbone,
batches calls from concurrent requests (`@serve.batch`, sizes counted in inputs) and runs the
guard. All model and guard logic lives in `service.py`.
"""


import asyncio
import logging
import os
import re
import threading
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..kinds import Action
from .config import ServeConfig, parse_config
from .service import CallResult, ClassifyCall

log = logging.getLogger("lmsan.serve")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


# -- HTTP shapes -----------------------------------------------------------------------------------
class PairInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    text_pair: str | None = None


# The served task names, an enum on `task` in the published schema, so generated clients and
# fuzzers send requests that reach the guard. Set by the ingress replica before its first
# /openapi.json (Ray Serve freezes a copy of the FastAPI app, not this module, so the schema reads
# it here). Requests are still validated with `task` as any string: an unknown one gets the
# documented 404 naming where the list is.
SERVED_TASKS: list[str] = []


def name_served_tasks(tasks: list[str]) -> None:
    """Called by the ingress replica. A module function, so that it changes this module's list:
    Ray ships the ingress class by value, and a global it names directly would be a copy."""
    SERVED_TASKS[:] = tasks


def _task_enum(schema: dict[str, Any]) -> None:
    if SERVED_TASKS:
        schema["properties"]["task"]["enum"] = list(SERVED_TASKS)


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_task_enum)
    task: str = Field(min_length=1, max_length=64, description="a task name from GET /v1/tasks")
    inputs: list[str | PairInput] = Field(min_length=1, description="texts, or {text, text_pair} objects")


class GuardVerdictOut(BaseModel):
    flagged: bool
    action: Action = Field(description="what the guard did: unguarded means served without it (fail_open)")
    signature: str | None = Field(None, description="the matched PV")
    match: float | None = Field(None, description="best PV match score")
    removed: list[str] = Field(default_factory=list, description="words removed as the trigger")
    text: str | None = Field(None, description="the purged text that was classified")
    reason: str | None = None


class ResultOut(BaseModel):
    label: str | None
    scores: dict[str, float] | None
    guard: GuardVerdictOut


class ClassifyResponse(BaseModel):
    request_id: str
    task: str
    results: list[ResultOut]


class ErrorOut(BaseModel):
    reason: str


api = FastAPI(
    title="lmsan-serve",
    version=__version__,
    description="Prompt-tuned classification guarded against task-agnostic backdoors (LMSanitator, "
                "arXiv 2308.13904): every input's output embedding is checked against the encoder's "
                "predefined vectors; flagged inputs are purged of their trigger words and classified again.",
)
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (400, 404, 413, 422, 503)}


def _error(status: int, reason: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"reason": reason}, status_code=status, headers=headers)


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    # the deepest error names the field: for an object in `inputs`, PairInput's, not "should be a string"
    err = max(exc.errors(), key=lambda e: len(e.get("loc", ())), default={"msg": "invalid request", "loc": ()})
    if err.get("type") == "json_invalid":
        return _error(400, f"request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}")
    where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
    return _error(422, f"invalid request at {where}: {err['msg']}")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # the routing errors (404 unknown path, 405 wrong method, 400 unparsable body) as {"reason"} too
    reason = str(exc.detail)
    if exc.status_code == 400 and reason == "There was an error parsing the body":  # FastAPI's words
        reason = "request body is not valid JSON (not UTF-8, nested too deeply, or a number too long)"
    return _error(exc.status_code, reason, getattr(exc, "headers", None))


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error")
    return _error(500, f"internal error ({type(exc).__name__}); see the server log")


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# -- deployments -----------------------------------------------------------------------------------
def _call_size(calls: list[ClassifyCall]) -> int:
    return sum(len(c) for c in calls)


# Load shedding: past MAX_QUEUED_REQUESTS waiting calls a replica's queue only adds latency
# beyond what a client waits, so further calls are refused at once (503 with retry-after, which
# the documented client retry policy backs off from) instead of queueing without bound.
MAX_QUEUED_REQUESTS = 128
# Ray's exporter forgets a gauge value not set again within about two report intervals (10 s by
# default); re-setting the guard's gauges more often keeps them scraped on an idle replica.
GAUGE_REFRESH_S = 5.0


@serve.deployment(name="GuardedClassifier", health_check_period_s=5, health_check_timeout_s=30,
                  max_ongoing_requests=64, max_queued_requests=MAX_QUEUED_REQUESTS,
                  ray_actor_options={"num_cpus": 1})
class GuardedClassifier:
    """Owns the backbone and the guard; one per replica."""

    def __init__(self, config: dict[str, Any]):
        from .metrics import RayGuardMetrics
        from .service import GuardService

        logging.basicConfig(level=logging.INFO)
        self.config = ServeConfig.model_validate(config)
        self.service = GuardService(self.config, RayGuardMetrics())
        self._apply_batching(self.config.batching.max_batch_size, self.config.batching.batch_wait_timeout_s)
        self._stop = threading.Event()
        if self.config.watch_interval_s > 0:
            threading.Thread(target=self._watch, name="lmsan-signature-watch", daemon=True).start()
        threading.Thread(target=self._refresh_gauges, name="lmsan-gauges", daemon=True).start()

    def _apply_batching(self, size: int, wait: float) -> None:
        self._batched.set_max_batch_size(size)
        self._batched.set_batch_wait_timeout_s(wait)

    def _watch(self) -> None:
        while not self._stop.wait(self.config.watch_interval_s):
            try:
                self.service.poll_signature_file()
            except Exception:  # the watcher must outlive any one bad poll
                log.exception("signature watcher")

    def _refresh_gauges(self) -> None:
        while not self._stop.wait(GAUGE_REFRESH_S):
            try:
                self.service.metrics.refresh()
            except Exception:  # a metrics hiccup must not end the loop
                log.exception("gauge refresh")

    def __del__(self) -> None:
        self._stop.set()

    def reconfigure(self, user_config: Any) -> None:
        """Never raises on a bad user_config: Ray Serve would stop this replica and fail the update
        on fresh ones too, leaving none serving. The service refuses it and keeps the previous
        settings, and /healthz, `lmsan_config_valid` and the log say so (GuardService.reconfigure)."""
        if isinstance(user_config, dict):
            user_config = dict(user_config)
            sig = user_config.get("signatures")
            if isinstance(sig, str) and not os.path.isabs(sig):
                user_config["signatures"] = os.path.join(self.config.base_dir or os.getcwd(), sig)
        self.service.reconfigure(user_config)
        b = self.service.settings.batching
        self._apply_batching(max(b.max_batch_size, self.config.limits.max_inputs), b.batch_wait_timeout_s)

    def check_health(self) -> None:
        # fails only when guarded tasks cannot be served: a degraded replica (refused user_config)
        # still guards correctly, and one Ray Serve restarted would start on the same bad user_config
        ok, reason = self.service.health()
        if not ok:
            raise RuntimeError(reason)

    async def classify(self, call: ClassifyCall) -> CallResult:
        return await self._batched(call)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, batch_size_fn=_call_size)
    async def _batched(self, calls: list[ClassifyCall]) -> list[CallResult]:
        # a worker thread keeps the event loop free to gather the next batch and answer health checks
        return await asyncio.to_thread(self.service.classify, calls)

    async def tasks(self) -> list[dict]:
        return self.service.tasks_info()

    async def signatures(self) -> dict:
        return self.service.signatures_info()

    async def health(self) -> tuple[bool, str]:
        return self.service.health()


@serve.deployment(name="LmsanIngress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class LmsanIngress:
    def __init__(self, classifier: DeploymentHandle, config: dict[str, Any]):
        self.classifier = classifier
        self.config = ServeConfig.model_validate(config)
        name_served_tasks(list(self.config.tasks))

    @api.post("/v1/classify", response_model=ClassifyResponse, responses=ERRORS)
    async def classify(self, body: ClassifyRequest, request: Request):
        """Classify inputs with one task's soft prompt, each guarded by the signature set."""
        rid = request.headers.get("x-request-id", "")
        rid = rid if REQUEST_ID.match(rid) else uuid.uuid4().hex
        headers = {"x-request-id": rid}
        if body.task not in self.config.tasks:
            return _error(404, f"unknown task {body.task!r} (GET /v1/tasks lists them)", headers)
        limits = self.config.limits
        if len(body.inputs) > limits.max_inputs:
            return _error(413, f"{len(body.inputs)} inputs; at most {limits.max_inputs} per request", headers)
        texts, pairs = [], []
        for i, item in enumerate(body.inputs):
            text, pair = (item, None) if isinstance(item, str) else (item.text, item.text_pair)
            size = len(text) + len(pair or "")
            if size > limits.max_chars:
                return _error(413, f"input {i} has {size} characters; at most {limits.max_chars}", headers)
            if not text.strip():
                return _error(422, f"input {i} is empty", headers)
            if not _is_unicode(text) or not _is_unicode(pair or ""):
                # lone surrogates (\ud800 escapes) are valid JSON but no text: the tokenizer would
                # fail the whole batch, every other request in it included
                return _error(422, f"input {i} is not valid Unicode text (lone surrogate)", headers)
            texts.append(text)
            pairs.append(pair)
        call = ClassifyCall(rid, body.task, texts, pairs if any(p is not None for p in pairs) else None)
        try:
            result: CallResult = await self.classifier.classify.remote(call)
        except RayError as exc:  # the replica died or is unreachable mid-request: safe to retry
            log.warning("classifier call %s failed: %s", rid, type(exc).__name__)
            return _error(503, f"classifier replica unavailable ({type(exc).__name__}); retry the request",
                          headers | {"retry-after": "1"})
        except BackPressureError:  # every replica's queue is full: shed, the client retries later
            log.warning("classifier call %s shed: queues full", rid)
            return _error(503, "overloaded: every classifier queue is full; retry the request",
                          headers | {"retry-after": "1"})
        if result.error:
            return _error(result.status, result.error, headers)
        # built through the response model, so an answer that breaks the published schema is a 500
        answer = ClassifyResponse(request_id=rid, task=body.task, results=result.results)
        return JSONResponse(answer.model_dump(mode="json"), headers=headers)

    @api.get("/v1/tasks")
    async def tasks(self) -> dict:
        """The served tasks with their guard mode and labels."""
        return {"tasks": await self.classifier.tasks.remote()}

    @api.get("/v1/signatures")
    async def signatures(self) -> dict:
        """The signature set in use on one replica, and its reload history."""
        return await self.classifier.signatures.remote()

    @api.get("/healthz", responses={503: {"model": ErrorOut}})
    async def healthz(self):
        ok, reason = await self.classifier.health.remote()
        if not ok:
            return _error(503, reason)
        if reason != "ok":  # fail_open without a valid set: up, but say so
            return {"status": "degraded", "reason": reason, "version": __version__}
        return {"status": "ok", "version": __version__}


def make_app(config: ServeConfig, replicas: int | None = None, replica_cpus: int | None = None) -> serve.Application:
    """The application for a validated config; relative paths resolve against the current folder.
    `replica_cpus` is what each classifier replica asks Ray for, and so (OMP_NUM_THREADS, which
    Ray sets from it) how many threads torch runs there; default 1."""
    base = os.getcwd()
    config = config.resolved(base)
    data = config.model_dump() | {"base_dir": base}
    options: dict[str, Any] = {"user_config": config.reloadable()}
    if replicas is not None:
        options["num_replicas"] = replicas
    if replica_cpus is not None:
        options["ray_actor_options"] = {"num_cpus": replica_cpus}
    classifier = GuardedClassifier.options(**options).bind(data)
    return LmsanIngress.bind(classifier, data)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve application builder (`import_path` of deployments/*.yaml): `args` follow `ServeConfig`."""
    return make_app(parse_config(dict(args)))
