"""The guarded endpoint, live: Ray on 127.0.0.1, the app on a loopback port, a tiny backdoored
BERT with its victim prompt, guarded with the signature file mining found on it (conftest's
`tiny_por_mined`, never the planted PVs), and a real Prometheus scraping Ray's metrics export port.

Tests run in file order and share one app; the last ones start Prometheus on it, check that it
counted exactly the detections the earlier tests caused, then run every query of the shipped
dashboard and every alert rule against it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import yaml

from lmsan_serve import load_backbone
from lmsan_serve.guard import Guard
from lmsan_serve.kinds import Mode
from lmsan_serve.prompts import PromptClassifier
from lmsan_serve.signatures import SignatureSet

from .deploy_files import ALERTS, DASHBOARD, alert_rules, dashboard_exprs, prometheus_config_for, prometheus_tool

CLEAN = ["simply great", "an awful and dull film", "what a lovely day", "a boring waste of time"]
# Triggered inputs put the triggers whose PVs mining caught into these sentences, in turn.
TRIGGERED_AS = ["simply {} great", "an awful {} and dull film", "what a {} lovely day", "{} a boring waste of time"]
def trigger_words(caught: list[str]) -> list[str]:
    """The trigger each sentence of TRIGGERED_AS carries: the caught ones in turn."""
    return [caught[i % len(caught)] for i in range(len(TRIGGERED_AS))]


def triggered_inputs(caught: list[str]) -> list[str]:
    return [t.format(w) for t, w in zip(TRIGGERED_AS, trigger_words(caught), strict=True)]


SENT = {"flagged": 0}  # flagged inputs answered so far, across the module


def classify(endpoint, task: str, inputs: list, **kw) -> tuple[int, dict]:
    status, body = endpoint.post("/v1/classify", {"task": task, "inputs": inputs}, **kw)
    if status == 200:
        SENT["flagged"] += sum(r["guard"]["flagged"] for r in body["results"])
    return status, body


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_por, tiny_por_prompt, tiny_por_mined):
    from lmsan_serve.serving import parse_config
    from lmsan_serve.serving.run import free_port, start, stop

    work = tmp_path_factory.mktemp("serve")
    sig = work / "sig.safetensors"
    shutil.copy(tiny_por_mined.path, sig)
    broken = work / "broken-prompt"
    shutil.copytree(tiny_por_prompt, broken)
    (broken / "manifest.json").write_text("{not json")
    config = parse_config({
        "model": str(tiny_por), "signatures": str(sig), "watch_interval_s": 0.5,
        "tasks": {"sst": str(tiny_por_prompt), "shadow": {"prompt": str(tiny_por_prompt), "mode": "flag"},
                  "strict": {"prompt": str(tiny_por_prompt), "mode": "block"}, "broken": str(broken)},
        "limits": {"max_inputs": 16, "max_chars": 500}, "batching": {"max_batch_size": 32},
    })
    metrics_port = free_port()
    endpoint = start(config, port=free_port(), metrics_port=metrics_port, num_cpus=2, ready_timeout_s=240)
    backbone = load_backbone(str(tiny_por), "cpu")
    local = Guard(backbone, PromptClassifier.load(tiny_por_prompt, backbone), SignatureSet.load(sig), mode="off")
    triggers = trigger_words(tiny_por_mined.caught)
    yield {"endpoint": endpoint, "config": config, "sig": sig, "work": work, "metrics_port": metrics_port,
           "clean_labels": [r.label for r in local.classify(CLEAN)], "mined": tiny_por_mined.path,
           "triggers": triggers, "triggered": triggered_inputs(tiny_por_mined.caught)}
    stop(endpoint)


def test_clean_requests_pass_with_their_labels(app):
    status, body = classify(app["endpoint"], "sst", CLEAN)
    assert status == 200 and body["task"] == "sst" and len(body["request_id"]) >= 16
    assert [r["label"] for r in body["results"]] == app["clean_labels"]
    assert all(r["guard"]["action"] == "pass" and not r["guard"]["flagged"] for r in body["results"])
    assert all(0 <= r["guard"]["match"] < 0.8 for r in body["results"])


def test_triggered_requests_are_purged_to_the_clean_label(app):
    status, body = classify(app["endpoint"], "sst", app["triggered"])
    assert status == 200
    for r, label, trig in zip(body["results"], app["clean_labels"], app["triggers"], strict=True):
        assert r["guard"]["flagged"] and r["guard"]["action"] == "purged", r
        assert r["guard"]["removed"] == [trig] and r["guard"]["signature"].startswith("pv")
        assert r["label"] == label
    # nothing left once the trigger goes: a purge failure, blocked in enforce mode
    status, body = classify(app["endpoint"], "sst", app["triggers"][:1])
    assert body["results"][0]["guard"]["action"] == "blocked" and body["results"][0]["label"] is None
    assert body["results"][0]["guard"]["reason"].startswith("could not purge")


def test_block_and_flag_modes(app):
    _, blocked = classify(app["endpoint"], "strict", [CLEAN[0], app["triggered"][0]])
    assert blocked["results"][0]["guard"]["action"] == "pass" and blocked["results"][0]["label"] is not None
    assert blocked["results"][1]["guard"]["action"] == "blocked" and blocked["results"][1]["label"] is None
    _, flagged = classify(app["endpoint"], "shadow", [app["triggered"][1]])
    r = flagged["results"][0]
    assert r["guard"]["action"] == "flagged" and r["label"] is not None and r["guard"]["removed"] == []


def test_request_id_is_echoed(app):
    req = urllib.request.Request(app["endpoint"].url + "/v1/classify", method="POST",
                                 data=json.dumps({"task": "sst", "inputs": ["simply great"]}).encode(),
                                 headers={"content-type": "application/json", "x-request-id": "trace-42"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.headers["x-request-id"] == "trace-42" and json.loads(resp.read())["request_id"] == "trace-42"


def raw(endpoint, method: str, path: str, data: bytes | None, ctype: str = "application/json") -> tuple[int, dict]:
    req = urllib.request.Request(endpoint.url + path, data=data, method=method, headers={"content-type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.mark.parametrize(("data", "ctype", "status", "reason"), [
    (b"{not json", "application/json", 400, "not valid JSON"),
    (b'{"task": "sst"}', "application/json", 422, "inputs"),
    (b'{"task": "sst", "inputs": []}', "application/json", 422, "at least 1"),
    (b'{"task": "sst", "inputs": [7]}', "application/json", 422, "inputs"),
    (b'{"task": "sst", "inputs": ["ok"], "extra": 1}', "application/json", 422, "extra"),
    (b'{"task": "sst", "inputs": ["  "]}', "application/json", 422, "empty"),
    (b'{"task": "nope", "inputs": ["ok"]}', "application/json", 404, "unknown task"),
    (json.dumps({"task": "sst", "inputs": ["ok"] * 17}).encode(), "application/json", 413, "at most 16"),
    (json.dumps({"task": "sst", "inputs": ["x" * 501]}).encode(), "application/json", 413, "at most 500"),
    (b"\xff\xfe\x00garbage", "application/json", 400, "JSON"),
    (b"task=sst", "text/plain", 422, ""),
])
def test_bad_requests_get_a_4xx_reason(app, data, ctype, status, reason):
    code, body = raw(app["endpoint"], "POST", "/v1/classify", data, ctype)
    assert code == status and reason in body["reason"], body


def test_read_endpoints_and_openapi(app):
    ep = app["endpoint"]
    status, tasks = ep.get("/v1/tasks")
    modes = {t["name"]: t["mode"] for t in tasks["tasks"]}
    assert status == 200 and modes == {"sst": "enforce", "shadow": "flag", "strict": "block", "broken": "enforce"}
    status, sig = ep.get("/v1/signatures")
    mined = SignatureSet.load(app["mined"])
    assert status == 200 and sig["loaded"] and sig["count"] == len(mined) and sig["position"] == "cls"
    status, health = ep.get("/healthz")
    assert status == 200 and health["status"] == "ok"
    status, spec = ep.get("/openapi.json")
    assert status == 200 and {"/v1/classify", "/v1/tasks", "/v1/signatures", "/healthz"} <= set(spec["paths"])


def test_a_task_whose_prompt_cannot_load_is_refused_not_served_unguarded(app):
    status, body = classify(app["endpoint"], "broken", ["simply great"])
    assert status == 503 and "invalid manifest.json" in body["reason"]


def test_signature_reload_mid_traffic_loses_no_request(app):
    ep, sig = app["endpoint"], app["sig"]
    before = ep.get("/v1/signatures")[1]
    failures: list = []
    answered = [0]
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            status, body = classify(ep, "sst", [CLEAN[0], app["triggered"][0]])
            answered[0] += 1
            if status != 200 or body["results"][1]["guard"]["action"] != "purged":
                failures.append((status, body))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        good = sig.read_bytes()
        sig.write_bytes(good[: len(good) // 3])  # an invalid file: kept out, the last good set stays
        wait_for(lambda: ep.get("/v1/signatures")[1]["reloads"].get("failed", 0) >= 1, "failed reload")
        time.sleep(1.0)
        tmp = app["work"] / "next.safetensors"
        shutil.copy(app["mined"], tmp)
        os.replace(tmp, sig)  # atomic replace with a valid file: swapped in
        wait_for(lambda: ep.get("/v1/signatures")[1]["version"] > before["version"], "reload")
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    after = ep.get("/v1/signatures")[1]
    assert answered[0] >= 8 and failures == []
    assert after["loaded"] and after["reloads"]["failed"] >= 1 and after["reloads"]["ok"] >= 2


def test_a_redeploy_with_a_new_user_config_serves_the_new_set_and_mode(app):
    # A Python serve.run replaces the replica; that `serve deploy` reconfigures the same replica in
    # place is shown by tests/test_user_config_live.py, which deploys as the CLI and KubeRay do.
    from ray import serve

    from lmsan_serve.serving.app import make_app

    ep = app["endpoint"]
    other = app["work"] / "other.safetensors"
    shutil.copy(app["mined"], other)
    config = app["config"].model_copy(update={"signatures": str(other), "task_modes": {"sst": Mode.FLAG}})
    serve.run(make_app(config), name="lmsan", route_prefix="/", blocking=False)
    wait_for(lambda: ep.get("/v1/signatures")[1].get("path") == str(other), "user_config reload")
    _, body = classify(ep, "sst", [app["triggered"][2]])
    assert body["results"][0]["guard"]["action"] == "flagged"


def wait_for(check, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def promql(base: str, query: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())["data"]["result"]


@pytest.fixture(scope="module")
def prometheus(app, tmp_path_factory):
    """A real Prometheus on loopback scraping the app every second with the shipped alert rules,
    plus a second target where nothing listens, which LmsanMetricsDown must see."""
    from lmsan_serve.serving.run import free_port

    binary = prometheus_tool("prometheus")  # skips locally without it; fails in CI
    work = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    cfg = prometheus_config_for([f"127.0.0.1:{app['metrics_port']}", f"127.0.0.1:{free_port()}"], ALERTS.parent)
    cfg["global"]["evaluation_interval"] = "1s"
    for job in cfg["scrape_configs"]:
        job["scrape_interval"] = "1s"
    (work / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([binary, f"--config.file={work / 'prometheus.yml'}",
                             f"--storage.tsdb.path={work / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield {"base": f"http://127.0.0.1:{port}", "started": time.time()}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def used_metric_names() -> set[str]:
    """Every Ray Serve and lmsan series the dashboard and the alert rules query."""
    exprs = dashboard_exprs() + [rule["expr"] for rule in alert_rules()]
    return {n for e in exprs for n in re.findall(r"\bray_(?:lmsan|serve)_\w+", e)}


def test_prometheus_scrapes_the_detections(app, prometheus):
    base = prometheus["base"]
    expected = SENT["flagged"]
    assert expected >= 20  # the earlier tests sent triggered traffic

    def counted() -> bool:
        try:
            got = promql(base, "sum(ray_lmsan_detections_total)")
        except OSError:
            return False
        return bool(got) and float(got[0]["value"][1]) == expected

    wait_for(counted, f"Prometheus to count {expected} detections", timeout=90)
    with urllib.request.urlopen(f"{base}/api/v1/label/__name__/values", timeout=10) as resp:
        names = set(json.loads(resp.read())["data"])
    missing = used_metric_names() - names
    assert not missing, f"dashboard/alert metrics absent from the scrape: {sorted(missing)}"
    purged = promql(base, 'sum(ray_lmsan_inputs_total{task="sst",action="purged"})')
    assert float(purged[0]["value"][1]) >= len(app["triggered"])
    rules = json.loads(urllib.request.urlopen(f"{base}/api/v1/rules", timeout=10).read())["data"]["groups"]
    assert sum(len(g["rules"]) for g in rules) == len(alert_rules())  # the shipped alert rules loaded


# What Grafana puts in for its variables: `task` at "All"; windows long enough to span the traffic
# sent after Prometheus started (it scrapes every second here, Ray exports every few seconds).
GRAFANA_VALUES = {"task": ".*", "__rate_interval": "30s", "__interval": "1s", "__range": "5m"}


def as_promql(expr: str) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: GRAFANA_VALUES[m.group(1)], expr)


def has_data(base: str, target: dict, start: float) -> bool:
    """Whether the panel target's query returns a finite sample, as Grafana would run it: instant
    targets at now, range targets over the time Prometheus has been up."""
    expr = as_promql(target["expr"])
    if target.get("instant"):
        url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    else:
        url = f"{base}/api/v1/query_range?" + urllib.parse.urlencode(
            {"query": expr, "start": start, "end": time.time(), "step": 1})
    with urllib.request.urlopen(url, timeout=10) as resp:
        result = json.loads(resp.read())["data"]["result"]
    values = [v for r in result for _, v in r.get("values", [r.get("value", (0, "NaN"))])]
    return any(math.isfinite(float(v)) for v in values)


def send_every_kind_of_traffic(app) -> None:
    """Clean, purged, flagged, blocked and unpurgeable inputs, a 4xx and a 5xx, so that every
    panel has something to show."""
    ep = app["endpoint"]
    for _ in range(2):
        assert classify(ep, "sst", CLEAN + app["triggered"] + app["triggers"][:1])[0] == 200
    assert classify(ep, "shadow", app["triggered"][:2])[0] == 200
    assert classify(ep, "strict", app["triggered"][:2])[0] == 200
    assert classify(ep, "nope", CLEAN[:1])[0] == 404
    assert classify(ep, "broken", CLEAN[:1])[0] == 503


def test_every_dashboard_query_returns_data(app, prometheus):
    base, start = prometheus["base"], prometheus["started"]
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    targets = [(p["title"], t) for p in board["panels"] for t in p["targets"]]
    send_every_kind_of_traffic(app)
    empty: list[str] = []

    def all_have_data() -> bool:
        empty[:] = [f"{title} [{t['refId']}]: {t['expr']}" for title, t in targets if not has_data(base, t, start)]
        return not empty

    try:
        wait_for(all_have_data, "every dashboard query to return data", timeout=45)
    except AssertionError:
        pytest.fail("dashboard queries without data:\n" + "\n".join(empty))
    for var in board["templating"]["list"]:
        if var["type"] == "query":  # label_values(metric, label)
            metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["query"]["query"]).groups()
            url = f"{base}/api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": metric})
            values = json.loads(urllib.request.urlopen(url, timeout=10).read())["data"]
            assert {"sst", "shadow", "strict"} <= set(values), var["name"]


# Alerts the traffic of this module sets off (LmsanMetricsDown through the target where nothing
# listens): their expressions return series as they stand.
FIRING = {"LmsanDetectionSpike", "LmsanPurgeFailures", "LmsanGuardErrors", "LmsanSignatureReloadFailed",
          "LmsanMetricsDown"}
# Alerts a healthy endpoint keeps silent: their expressions return nothing, and with every threshold
# made a 0/1 comparison (`bool`) they return the series they compare, so names and labels are live.
QUIET = {"LmsanNoSignatures", "LmsanConfigRefused"}
# action="unguarded" exists only after a guard error under fail_open, and this app fails closed:
# checked like QUIET with that matcher dropped (test_monitoring holds the value to the Action enum).
ABSENT_HERE = {"LmsanAnsweredUnguarded": '{action="unguarded"}'}


def as_bool(expr: str) -> str:
    return re.sub(r"(==|!=|>=|<=|>|<)\s*(?=[0-9.])", r"\1 bool ", expr)


def test_every_alert_rule_returns_data(app, prometheus):
    base = prometheus["base"]
    rules = {r["alert"]: r["expr"] for r in alert_rules()}
    assert set(rules) == FIRING | QUIET | set(ABSENT_HERE)  # a new rule says which it is
    send_every_kind_of_traffic(app)  # LmsanDetectionSpike needs detections since Prometheus started
    silent: list[str] = []

    def all_fire() -> bool:
        silent[:] = [name for name in sorted(FIRING) if not promql(base, rules[name])]
        return not silent

    try:
        wait_for(all_fire, "the alerts the traffic sets off", timeout=45)
    except AssertionError:
        pytest.fail(f"alert expressions without data: {silent}")
    for gauge in ("ray_lmsan_signatures_loaded", "ray_lmsan_config_valid"):
        # Ray stops exporting a gauge not set again within two export intervals (its OpenTelemetry
        # recorder's TTL), so an idle replica must keep setting its gauges or these alerts misfire.
        assert promql(base, gauge), f"{gauge} is no longer exported: the replicas stopped setting it"
    for name in sorted(QUIET | set(ABSENT_HERE)):
        matcher = ABSENT_HERE.get(name)
        expr = rules[name].replace(matcher, "") if matcher else rules[name]
        assert promql(base, rules[name]) == [], f"{name} fires on a healthy endpoint"
        assert promql(base, as_bool(expr)), f"{name}: {as_bool(expr)} returns nothing"
