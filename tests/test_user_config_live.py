"""An invalid `user_config`, live: Ray on 127.0.0.1, the app on a loopback port, the tiny
backdoored BERT and its victim prompt, guarded with the set mined from it (conftest's `tiny_por_mined`).

Raising in `reconfigure` would make Ray Serve stop the replica being updated and retry on fresh
ones, which fail the same way: the application goes DEPLOY_FAILED with no replica left and every
request is answered 503. So the replica refuses an invalid user_config and keeps serving on the
settings it had, and says so where an operator looks: /healthz (200, `degraded`, with the reason),
`ray_lmsan_config_valid 0` in the metrics export, and an error line in the replica's log. A later
valid user_config recovers all three. Flagged inputs also go as JSON lines to the replica's stdout.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest

from .test_serve_live import CLEAN, triggered_inputs, wait_for

ACTIONS = {"enforce": "purged", "block": "blocked"}  # what a triggered input gets in each mode


def deploy(args: dict, user_config) -> None:
    """Deploy the app from a Serve config, as `serve deploy` and KubeRay do: the import path, the
    app's `args`, and GuardedClassifier's `user_config` as given, unvalidated. With args unchanged,
    Ray Serve applies a new user_config to the running replicas (`reconfigure`) instead of
    replacing them, which is what an operator's edit of user_config does."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from lmsan_serve.serving.run import APP_NAME

    app = {"name": APP_NAME, "route_prefix": "/", "import_path": "lmsan_serve.serving.app:build_app",
           "args": args, "deployments": [{"name": "GuardedClassifier", "user_config": user_config}]}
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}))


def app_status() -> tuple[str, str]:
    from ray import serve

    app = serve.status().applications.get("lmsan")
    if app is None:
        return "absent", "absent"
    classifier = app.deployments.get("GuardedClassifier")
    return app.status.value, classifier.status.value if classifier else "absent"


@pytest.fixture(scope="module")
def live(tiny_por, tiny_por_prompt, tiny_por_mined):
    from lmsan_serve.raycluster import choose_auth, start_local
    from lmsan_serve.serving import parse_config
    from lmsan_serve.serving.run import Endpoint, free_port, stop

    config = parse_config({
        "model": str(tiny_por), "signatures": str(tiny_por_mined.path), "watch_interval_s": 0,
        "tasks": {"sst": str(tiny_por_prompt)},
    })
    args = config.model_dump(mode="json", exclude={"base_dir"})
    # Ray exports metrics every 10 s by default; each step below waits for one export
    old = os.environ.get("RAY_metrics_report_interval_ms")
    os.environ["RAY_metrics_report_interval_ms"] = "1000"
    choose_auth()  # before Ray is imported: it reads the auth mode once
    from ray import serve

    port, metrics_port = free_port(), free_port()
    node = start_local(num_cpus=2, metrics_port=metrics_port)
    endpoint = Endpoint(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", True, node)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(args, config.reloadable() | {"mode": "block"})
        wait_for(lambda: healthz(endpoint).get("status") == "ok", "the app to start", timeout=240)
        yield {"endpoint": endpoint, "args": args, "good": config.reloadable() | {"mode": "block"},
               "triggered": triggered_inputs(tiny_por_mined.caught)}
    finally:
        stop(endpoint)
        if old is None:
            os.environ.pop("RAY_metrics_report_interval_ms", None)
        else:
            os.environ["RAY_metrics_report_interval_ms"] = old


def healthz(endpoint) -> dict:
    try:
        return endpoint.get("/healthz")[1]
    except OSError:
        return {}


def triggered_action(live) -> list[str]:
    status, body = live["endpoint"].post("/v1/classify", {"task": "sst", "inputs": [CLEAN[0], live["triggered"][0]]})
    assert status == 200, body
    return [r["guard"]["action"] for r in body["results"]]


def config_valid(endpoint) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(endpoint.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    values = [s.value for f in text_string_to_metric_families(text) for s in f.samples
              if s.name == "ray_lmsan_config_valid"]
    return min(values) if values else None


def replica_logs(pattern: str = "*") -> str:
    """What the cluster's processes wrote to the log files named like `pattern` (Ray keeps each
    worker's stdout in `worker-*.out`, its stderr in `worker-*.err`, Serve's logs in `*.log`)."""
    import ray._private.worker

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return "\n".join(p.read_text(errors="replace") for p in logs.rglob(pattern) if p.is_file()
                     and p.suffix in (".out", ".err", ".log"))


def test_an_invalid_user_config_is_refused_visibly_and_the_last_good_settings_serve(live):
    ep, args, good = live["endpoint"], live["args"], live["good"]
    # the user_config in use (mode block) differs from the args' (enforce): what serves is visible
    assert triggered_action(live) == ["pass", ACTIONS["block"]]
    wait_for(lambda: config_valid(ep) == 1, "ray_lmsan_config_valid 1")
    loaded_at = ep.get("/v1/signatures")[1]["loaded_at"]

    deploy(args, good | {"mode": "strict"})  # an invalid mode: Serve applies it to the replica ...
    wait_for(lambda: healthz(ep).get("status") == "degraded", "/healthz degraded")
    status, health = ep.get("/healthz")
    assert status == 200 and "invalid user_config at mode" in health["reason"], health
    assert "previous settings keep serving" in health["reason"]
    info = ep.get("/v1/signatures")[1]
    assert "invalid user_config at mode" in info["config_error"] and info["loaded_at"] == loaded_at  # same replica
    wait_for(lambda: app_status() == ("RUNNING", "HEALTHY"), "the app to stay RUNNING")
    # ... which keeps guarding on the last good settings (block, not the args' enforce)
    assert triggered_action(live) == ["pass", ACTIONS["block"]]
    wait_for(lambda: config_valid(ep) == 0, "ray_lmsan_config_valid 0")
    wait_for(lambda: "refused, the previous settings keep serving" in replica_logs(), "the refusal in the log")

    deploy(args, good | {"mode": "enforce"})  # a valid one recovers
    wait_for(lambda: healthz(ep).get("status") == "ok", "/healthz ok")
    assert ep.get("/v1/signatures")[1]["config_error"] is None
    assert triggered_action(live) == ["pass", ACTIONS["enforce"]]
    wait_for(lambda: config_valid(ep) == 1, "ray_lmsan_config_valid back to 1")


def test_audit_lines_reach_the_replica_stdout_as_json(live):
    ep = live["endpoint"]
    req = urllib.request.Request(ep.url + "/v1/classify", method="POST",
                                 data=json.dumps({"task": "sst", "inputs": [live["triggered"][1]]}).encode(),
                                 headers={"content-type": "application/json", "x-request-id": "audit-live-1"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert json.loads(resp.read())["results"][0]["guard"]["flagged"]

    def line() -> dict | None:
        for text in replica_logs("worker-*.out").splitlines():  # stdout only
            if '"audit-live-1"' in text and text.lstrip().startswith("{"):
                return json.loads(text[text.index("{"):])
        return None

    wait_for(lambda: line() is not None, "the audit line in the replica's stdout")
    found = line()
    assert found["task"] == "sst" and found["signature"] == found["matched"] and found["time"].endswith("Z")
    assert found["action"] == "purged" and "text" not in found
