"""The monitoring that ships in deployments/: Prometheus config and alert rules (parsed, checked by
promtool, and unit-tested with `promtool test rules`) and the Grafana dashboard (datasource variable,
layout, metric names and label values). test_serve_live runs the same queries against a real
Prometheus scraping a live endpoint."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from lmsan_serve.kinds import Action
from lmsan_serve.serving.run import APP_NAME

from .deploy_files import (
    ALERTS,
    DASHBOARD,
    DEPLOYMENTS,
    PROMETHEUS_CONFIG,
    alert_rules,
    dashboard_exprs,
    load_yaml,
    prometheus_config_for,
    prometheus_tool,
    shipped_metric_names,
)

_HISTOGRAMS = ("ray_lmsan_match_ratio", "ray_lmsan_guard_seconds")
KNOWN_METRICS = {
    "ray_lmsan_inputs_total",
    "ray_lmsan_detections_total",
    "ray_lmsan_purge_failures_total",
    "ray_lmsan_guard_errors_total",
    "ray_lmsan_signatures_loaded",
    "ray_lmsan_signature_reloads_total",
    "ray_lmsan_config_valid",
} | {f"{h}{s}" for h in _HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
# Ray Serve's own series the dashboard reads, as the installed Ray exports them: Ray renames them
# between versions, so test_serve_live proves each one against a real scrape.
SERVE_METRICS = {
    "ray_serve_num_http_requests_total",
    "ray_serve_num_http_error_requests_total",
    "ray_serve_http_request_latency_ms_bucket",
    "ray_serve_deployment_replica_healthy",
    "ray_serve_autoscaling_target_replicas",
}
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}


# -- Prometheus -----------------------------------------------------------------------------------
def test_prometheus_config_and_alert_rules_parse():
    config = load_yaml(PROMETHEUS_CONFIG)
    assert config["global"]["scrape_interval"] == "5s"
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS_CONFIG.parent / rule_file).is_file()
    rules = alert_rules()
    assert rules
    for rule in rules:
        assert rule["expr"].strip() and "for" in rule, rule["alert"]
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
    # The alerts the runbook promises: detection spike, purge failures, no signatures, guard errors.
    covered = {name for rule in rules for name in re.findall(r"ray_lmsan_\w+", rule["expr"])}
    assert {"ray_lmsan_detections_total", "ray_lmsan_purge_failures_total",
            "ray_lmsan_signatures_loaded", "ray_lmsan_guard_errors_total"} <= covered


def test_prometheus_config_for_replaces_targets_and_rules(tmp_path):
    config = prometheus_config_for(["127.0.0.1:9999"], tmp_path)
    assert [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]] == \
        ["127.0.0.1:9999"]
    assert config["rule_files"] == [str(tmp_path / "alerts.yml")]
    assert load_yaml(PROMETHEUS_CONFIG)["scrape_configs"][0]["static_configs"][0]["targets"] == ["app:8080"]


def test_a_missing_prometheus_tool_skips_locally_and_fails_in_ci(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no binary found
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("LMSAN_REQUIRE_PROMETHEUS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="promtool is not installed"):
        prometheus_tool("promtool")
    for name, value in (("CI", "true"), ("LMSAN_REQUIRE_PROMETHEUS", "1")):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            with pytest.raises(pytest.fail.Exception, match="promtool is required here"):
                prometheus_tool("promtool")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        prometheus_tool("prometheus")


def _promtool(*args: str) -> None:
    done = subprocess.run([prometheus_tool("promtool"), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_accepts_config_and_rules():
    _promtool("check", "config", str(PROMETHEUS_CONFIG))
    _promtool("check", "rules", str(ALERTS))


# Scenarios for `promtool test rules`, one minute per sample. Annotations are stripped from the
# rules under test so that the cases pin the expressions, `for:` and labels, not the wording.
_RULE_CASES = [
    {   # a counter that appears at its first failure is caught although increase() sees no change
        "input_series": [{"series": 'ray_lmsan_purge_failures_total{task="sst2",WorkerId="w1"}',
                          "values": "_x15 1x30"},
                         {"series": 'up{job="lmsan",instance="app:8080"}', "values": "1x45"}],
        "alert_rule_test": [
            {"eval_time": "17m", "alertname": "LmsanPurgeFailures",
             "exp_alerts": [{"exp_labels": {"severity": "warning", "task": "sst2"}}]},
            {"eval_time": "40m", "alertname": "LmsanPurgeFailures", "exp_alerts": []},
            {"eval_time": "17m", "alertname": "LmsanMetricsDown", "exp_alerts": []},
        ],
    },
    {
        "input_series": [{"series": 'ray_lmsan_guard_errors_total{task="sst2",WorkerId="w1"}',
                          "values": "0x10 0+1x10"}],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "LmsanGuardErrors", "exp_alerts": []},
            {"eval_time": "15m", "alertname": "LmsanGuardErrors",
             "exp_alerts": [{"exp_labels": {"severity": "critical", "task": "sst2"}}]},
        ],
    },
    {   # fail_open served inputs unguarded on sst2 from minute 10; guarded traffic on other only
        "input_series": [
            {"series": 'ray_lmsan_inputs_total{task="sst2",action="unguarded",WorkerId="w1"}',
             "values": "_x10 3+3x10"},
            {"series": 'ray_lmsan_inputs_total{task="other",action="pass",WorkerId="w1"}', "values": "0+5x20"},
        ],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "LmsanAnsweredUnguarded", "exp_alerts": []},
            {"eval_time": "12m", "alertname": "LmsanAnsweredUnguarded",
             "exp_alerts": [{"exp_labels": {"severity": "critical", "task": "sst2"}}]},
        ],
    },
    {   # 10% of guarded inputs flagged on sst2, 1% on other
        "input_series": [
            {"series": 'ray_lmsan_inputs_total{task="sst2",action="pass",WorkerId="w1"}', "values": "0+90x20"},
            {"series": 'ray_lmsan_inputs_total{task="sst2",action="purged",WorkerId="w1"}', "values": "0+10x20"},
            {"series": 'ray_lmsan_detections_total{task="sst2",signature="pv0",WorkerId="w1"}',
             "values": "0+10x20"},
            {"series": 'ray_lmsan_inputs_total{task="other",action="pass",WorkerId="w1"}', "values": "0+99x20"},
            {"series": 'ray_lmsan_inputs_total{task="other",action="flagged",WorkerId="w1"}', "values": "0+1x20"},
            {"series": 'ray_lmsan_detections_total{task="other",signature="pv0",WorkerId="w1"}',
             "values": "0+1x20"},
        ],
        "alert_rule_test": [
            {"eval_time": "15m", "alertname": "LmsanDetectionSpike",
             "exp_alerts": [{"exp_labels": {"severity": "warning", "task": "sst2"}}]},
        ],
    },
    {
        "input_series": [{"series": 'ray_lmsan_signatures_loaded{set="0123456789ab",WorkerId="w1"}',
                          "values": "0x10"}],
        "alert_rule_test": [
            {"eval_time": "3m", "alertname": "LmsanNoSignatures", "exp_alerts": []},
            {"eval_time": "8m", "alertname": "LmsanNoSignatures",
             "exp_alerts": [{"exp_labels": {"severity": "critical"}}]},
        ],
    },
    {
        "input_series": [{"series": 'ray_lmsan_signatures_loaded{set="0123456789ab",WorkerId="w1"}',
                          "values": "6x10"}],
        "alert_rule_test": [{"eval_time": "8m", "alertname": "LmsanNoSignatures", "exp_alerts": []}],
    },
    {   # the second replica refused its user_config at minute 5 and keeps the old settings
        "input_series": [{"series": 'ray_lmsan_config_valid{WorkerId="w1"}', "values": "1x10"},
                         {"series": 'ray_lmsan_config_valid{WorkerId="w2"}', "values": "1x4 0x6"}],
        "alert_rule_test": [
            {"eval_time": "3m", "alertname": "LmsanConfigRefused", "exp_alerts": []},
            {"eval_time": "6m", "alertname": "LmsanConfigRefused",
             "exp_alerts": [{"exp_labels": {"severity": "warning"}}]},
        ],
    },
    {   # nothing reports at all
        "input_series": [{"series": 'up{job="lmsan",instance="app:8080"}', "values": "0x10"}],
        "alert_rule_test": [
            {"eval_time": "8m", "alertname": "LmsanNoSignatures",
             "exp_alerts": [{"exp_labels": {"severity": "critical"}}]},
            {"eval_time": "8m", "alertname": "LmsanMetricsDown",
             "exp_alerts": [{"exp_labels": {"severity": "critical", "job": "lmsan", "instance": "app:8080"}}]},
        ],
    },
]


def test_alert_rules_fire_on_the_intended_series(tmp_path):
    prometheus_tool("promtool")  # before any file is written
    groups = load_yaml(ALERTS)["groups"]
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": groups}))
    tests = [{"interval": "1m", **case} for case in _RULE_CASES]
    (tmp_path / "tests.yml").write_text(yaml.safe_dump({"rule_files": ["rules.yml"], "tests": tests}))
    _promtool("test", "rules", str(tmp_path / "tests.yml"))


# -- Grafana --------------------------------------------------------------------------------------
def test_grafana_provisioning_matches_compose():
    datasource = load_yaml(DEPLOYMENTS / "grafana/provisioning/datasources/prometheus.yml")["datasources"][0]
    assert datasource["uid"] == "prometheus" and datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    services = load_yaml(DEPLOYMENTS / "docker-compose.yml")["services"]
    assert "9090:9090" in services["prometheus"]["ports"]

    provider = load_yaml(DEPLOYMENTS / "grafana/provisioning/dashboards/lmsan.yml")["providers"][0]
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]


def _board() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def test_dashboard_panels_query_prometheus_through_the_datasource_variable():
    board = _board()
    assert board["uid"] == "lmsan-guard" and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    # a variable, not the provisioned uid, so that the board imports into any Grafana
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    uses_variable = {"type": "prometheus", "uid": "${datasource}"}
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for panel in panels:
        assert panel["datasource"] == uses_variable, panel["title"]
        assert all(t["datasource"] == uses_variable for t in panel["targets"]), panel["title"]
        assert all(t.get("expr", "").strip() for t in panel["targets"]), panel["title"]
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
    for var in variables.values():
        assert var["type"] == "datasource" or var["datasource"] == uses_variable, var["name"]
    assert '"uid": "prometheus"' not in DASHBOARD.read_text(encoding="utf-8")
    # every $variable of a query is one of the board's or one Grafana provides
    used = {m for e in dashboard_exprs() for m in re.findall(r"\$\{?(\w+)", e)}
    assert used <= set(variables) | GRAFANA_BUILTINS, used


def test_dashboard_covers_the_guard_and_serve_metrics():
    used = {n for e in dashboard_exprs() for n in re.findall(r"ray_(?:lmsan|serve)_\w+", e)}
    assert KNOWN_METRICS - used == {"ray_lmsan_match_ratio_sum", "ray_lmsan_match_ratio_count",
                                    "ray_lmsan_guard_seconds_sum", "ray_lmsan_guard_seconds_count"}
    assert used & SERVE_METRICS == SERVE_METRICS
    titles = " ".join(p["title"] for p in _board()["panels"])
    for quantile in ("p50", "p95", "p99"):  # the request latency panel shows all three
        assert quantile in titles


def test_shipped_metric_names_are_the_exported_ones():
    names = shipped_metric_names()
    assert "ray_lmsan_match_ratio_bucket" in names and "ray_lmsan_inputs_total" in names
    assert names <= KNOWN_METRICS, sorted(names - KNOWN_METRICS)
    exprs = dashboard_exprs() + [rule["expr"] for rule in alert_rules()]
    serve_names = {n for e in exprs for n in re.findall(r"\bray_serve_\w+", e)}
    assert serve_names <= SERVE_METRICS, sorted(serve_names - SERVE_METRICS)
    # label values the queries match on are the ones the code exports
    actions = {v for e in exprs for v in re.findall(r'action!?=~?"([^"]*)"', e)}
    assert actions <= set(Action.values()), actions
    apps = {v for e in exprs for v in re.findall(r'application="([^"]*)"', e)}
    serve_apps = {a["name"] for a in load_yaml(DEPLOYMENTS / "serve-demo.yaml")["applications"]}
    assert apps == {APP_NAME} == serve_apps
