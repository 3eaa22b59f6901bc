"""Start and stop the guarded endpoint on a local (or existing) Ray cluster: what `lmsan serve`,
the demo and the live tests share."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from ..errors import LmsanError
from ..guard import GuardResult
from ..raycluster import RayNode, choose_auth, free_port, start_local  # noqa: F401  (free_port: re-exported)
from .config import ServeConfig

APP_NAME = "lmsan"
# A request still unanswered after this long is answered by Ray Serve's proxy with a timeout
# (408) rather than held open: a client waiting longer has given up, and its slot serves others.
REQUEST_TIMEOUT_S = 60.0


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class Endpoint:
    url: str
    metrics_url: str | None
    started_ray: bool
    ray_node: RayNode | None = None  # the local Ray node `start` started, stopped with the endpoint

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, dict]:
        return http_json("GET", self.url + path, None, timeout)

    def post(self, path: str, body: dict, timeout: float = 60.0) -> tuple[int, dict]:
        return http_json("POST", self.url + path, body, timeout)

    def classify(self, task: str, inputs: list[str | dict], timeout: float = 300.0) -> list[GuardResult]:
        """POST /v1/classify through `GuardClient` (the documented retry policy); one `GuardResult`
        per input, as `Guard.classify` returns them locally; a final non-200 raises an EndpointError."""
        from ..client import GuardClient

        with GuardClient(self.url, timeout=timeout) as client:
            return client.classify(task, inputs)


def http_json(method: str, url: str, body: dict | None, timeout: float) -> tuple[int, dict]:
    """One JSON request: (status, body); a body that is not JSON comes back as {"reason": its text}.
    No answer (refused, reset, timed out) raises ConnectionError, an OSError as socket errors are."""
    try:
        resp = httpx.request(method, url, json=body, timeout=timeout)
    except httpx.TransportError as exc:
        raise ConnectionError(f"{method} {url}: {exc or type(exc).__name__}") from exc
    try:
        return resp.status_code, resp.json() if resp.content else {}
    except ValueError:
        return resp.status_code, {"reason": resp.text}


def start(
    config: ServeConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    metrics_port: int | None = 8080,
    replicas: int | None = None,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    replica_cpus: int | None = None,
    ready_timeout_s: float = 300.0,
) -> Endpoint:
    """Deploy the app and wait until /healthz answers 200. Starts a one-node Ray on this machine
    (`raycluster.start_local`, exporting metrics on `metrics_port`), stopped with the endpoint,
    unless Ray is already connected or `ray_address` names a running cluster (then `metrics_port`
    is that cluster's business). `replica_cpus`: what each classifier replica asks for; default
    `local_replica_cpus` on a node started here, the deployment's own setting elsewhere."""
    if not ray_address:
        choose_auth()
    import ray
    from ray import serve

    from .app import make_app

    if not 0 < port < 65536:
        raise LmsanError(f"port {port} is out of range")
    if not port_free(host, port):
        raise LmsanError(f"{host}:{port} is already in use (choose another --port)")
    node = None
    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address, log_to_driver=False)
        else:
            if metrics_port is not None and not port_free("127.0.0.1", metrics_port):
                raise LmsanError(f"metrics port {metrics_port} is already in use (choose another --metrics-port)")
            node = start_local(num_cpus=num_cpus, metrics_port=metrics_port)
            replica_cpus = replica_cpus or local_replica_cpus(num_cpus, replicas)
    try:
        serve.start(http_options={"host": host, "port": port, "request_timeout_s": REQUEST_TIMEOUT_S})
        serve.run(make_app(config, replicas, replica_cpus), name=APP_NAME, route_prefix="/", blocking=False)
    except BaseException:
        if node is not None:
            node.stop()
        raise
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    endpoint = Endpoint(f"http://{shown}:{port}", None if metrics_port is None or ray_address else
                        f"http://127.0.0.1:{metrics_port}/metrics", node is not None, node)
    deadline = time.monotonic() + ready_timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            status, body = endpoint.get("/healthz", timeout=5)
            if status == 200:
                return endpoint
            last = body.get("reason", f"HTTP {status}")
        except OSError as exc:
            last = str(exc)
        time.sleep(0.5)
    stop(endpoint)
    raise LmsanError(f"the endpoint did not become healthy within {ready_timeout_s:.0f} s: {last}")


def local_replica_cpus(node_cpus: int | None, replicas: int | None) -> int:
    """CPUs each classifier replica asks for on the one-node Ray that `start` runs: the node's CPUs
    shared out between the replicas. Ray sets a replica's torch threads to what it asked for, and
    the deployment's default of 1 leaves all but one core of the machine idle under load. The
    proxy and the ingress ask for none, so they still get scheduled."""
    cpus = node_cpus or os.cpu_count() or 1
    return max(1, cpus // max(1, replicas or 1))


def stop(endpoint: Endpoint | None = None) -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        if endpoint is not None and endpoint.ray_node is not None:
            endpoint.ray_node.stop()  # disconnects, then stops the node it started
        elif endpoint is None or endpoint.started_ray:
            ray.shutdown()


def serve_until_stopped(endpoint: Endpoint, say: Callable[[str], None]) -> None:
    """Block until SIGTERM or Ctrl-C, then stop the endpoint."""
    done = threading.Event()
    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Ctrl-C must still stop it
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    try:
        while not done.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        say("shutting down ...")
        stop(endpoint)
