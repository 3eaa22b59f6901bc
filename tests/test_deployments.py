"""The shipped deployment files parse, validate against the schemas that will read them, and agree
with each other (paths, ports, metric names). promtool checks run where the binary is installed,
and must run in CI (see `deploy_files.prometheus_tool`)."""

from __future__ import annotations

import importlib
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from ray import serve
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

from lmsan_serve.cli import build_parser, subcommands
from lmsan_serve.serving.config import Reloadable, ServeConfig, parse_config

from .deploy_files import (
    ALERTS,
    DASHBOARD,
    DEPLOYMENTS,
    PROMETHEUS_CONFIG,
    REPO,
    alert_rules,
    dashboard_exprs,
    load_yaml,
    prometheus_config_for,
    prometheus_tool,
    shipped_metric_names,
)

IMPORT_PATH = "lmsan_serve.serving.app:build_app"
DEPLOYMENT_NAMES = {"GuardedClassifier", "LmsanIngress"}
# What `lmsan demo --out DIR` writes, relative to DIR.
DEMO_LAYOUT = {"model": "por", "tasks": {"sst2": "prompt-sst2"}, "signatures": "mined/search.safetensors"}

_HISTOGRAMS = ("ray_lmsan_match_ratio", "ray_lmsan_guard_seconds")
KNOWN_METRICS = {
    "ray_lmsan_requests_total",
    "ray_lmsan_detections_total",
    "ray_lmsan_purge_failures_total",
    "ray_lmsan_guard_errors_total",
    "ray_lmsan_signatures_loaded",
    "ray_lmsan_signature_reloads_total",
} | {f"{h}{s}" for h in _HISTOGRAMS for s in ("_bucket", "_sum", "_count")}


# -- Serve config (shared by serve-demo.yaml and the RayService) ----------------------------------
def _unknown_keys(data: dict, model) -> set[str]:
    # Ray's schemas ignore unknown keys, so a misspelt knob would otherwise be dropped silently.
    return set(data) - set(model.model_fields)


def check_serve_config(raw: dict) -> tuple[ServeConfig, dict]:
    """Validate a Serve config holding the lmsan app; return its app args and GuardedClassifier."""
    ServeDeploySchema(**raw)
    assert not _unknown_keys(raw, ServeDeploySchema)
    (app,) = raw["applications"]
    assert not _unknown_keys(app, ServeApplicationSchema)
    assert app["import_path"] == IMPORT_PATH
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == DEPLOYMENT_NAMES and len(app["deployments"]) == 2
    for d in app["deployments"]:
        assert not _unknown_keys(d, DeploymentSchema), d["name"]
        assert not _unknown_keys(d.get("autoscaling_config") or {}, AutoscalingConfig), d["name"]

    args = parse_config(app["args"])
    classifier = deployments["GuardedClassifier"]
    reloadable = Reloadable(**classifier["user_config"])
    # user_config replaces the reloadable part of args on the replicas: the two must not disagree,
    # and the combination must pass the cross-field checks (task_modes names, batch vs limits).
    overlap = set(app["args"]) & set(classifier["user_config"])
    for key in overlap:
        assert app["args"][key] == classifier["user_config"][key], key
    parse_config({**app["args"], **reloadable.model_dump()})
    assert deployments["LmsanIngress"].get("num_replicas", 1) >= 1
    return args, classifier


def demo_layout(args: ServeConfig, signatures: str, root: str) -> dict:
    def rel(p: str) -> str:
        return Path(p).relative_to(root).as_posix()

    return {"model": rel(args.model), "tasks": {n: rel(args.task(n).prompt) for n in args.tasks},
            "signatures": rel(signatures)}


def test_serve_demo_config_validates_and_serves_the_demo_output():
    args, classifier = check_serve_config(load_yaml(DEPLOYMENTS / "serve-demo.yaml"))
    demo_out = build_parser().parse_args(["demo"]).out
    assert demo_layout(args, classifier["user_config"]["signatures"], demo_out) == DEMO_LAYOUT
    assert not Path(args.model).is_absolute(), "serve-demo.yaml paths are relative to the repo root"


def test_import_path_resolves_to_the_app_builder():
    module, attr = IMPORT_PATH.split(":")
    builder = getattr(importlib.import_module(module), attr)
    # the builder Serve calls with the config's `args`: it builds the app graph without starting it
    args = load_yaml(DEPLOYMENTS / "serve-demo.yaml")["applications"][0]["args"]
    assert isinstance(builder(args), serve.Application)


# -- KubeRay --------------------------------------------------------------------------------------
def _cpus(quantity: str | int | float) -> float:
    q = str(quantity)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def test_rayservice_manifest():
    manifest = load_yaml(DEPLOYMENTS / "kuberay" / "rayservice.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    args, classifier = check_serve_config(serve_config)
    assert all(Path(p).is_absolute() for p in [args.model, classifier["user_config"]["signatures"]]
               + [args.task(n).prompt for n in args.tasks])

    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    (workers,) = cluster["workerGroupSpecs"]
    assert 0 <= workers["minReplicas"] <= workers.get("replicas", workers["minReplicas"]) <= workers["maxReplicas"]
    assert workers["maxReplicas"] > workers["minReplicas"], "the worker group cannot scale"

    head = cluster["headGroupSpec"]
    head_container = head["template"]["spec"]["containers"][0]
    metrics_port = int(head["rayStartParams"]["metrics-export-port"])
    assert metrics_port in {p["containerPort"] for p in head_container["ports"]}
    assert 8000 in {p["containerPort"] for p in head_container["ports"]}

    # A classifier replica must fit on one worker pod, or autoscaling adds pods that never host one.
    worker_container = workers["template"]["spec"]["containers"][0]
    worker_cpus = _cpus(workers["rayStartParams"].get("num-cpus", worker_container["resources"]["limits"]["cpu"]))
    assert classifier["ray_actor_options"]["num_cpus"] <= worker_cpus

    for group in (head, workers):
        # The CRD types rayStartParams as map[string]string: a bare number fails `kubectl apply`.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        assert group["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == "lmsan-serve"
        spec = group["template"]["spec"]
        declared = {v["name"] for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            assert container["image"] == "lmsan-serve:latest"
            assert container["resources"]["requests"] and container["resources"]["limits"]
            assert {m["name"] for m in container.get("volumeMounts", [])} <= declared


# -- docker compose -------------------------------------------------------------------------------
def _compose() -> dict:
    return load_yaml(DEPLOYMENTS / "docker-compose.yml")


def _app_commands() -> dict[str, list[str]]:
    """The app service's shell command split into its `lmsan <subcommand>` invocations."""
    app = _compose()["services"]["app"]
    script = " ".join(app["command"]) if isinstance(app["command"], list) else app["command"]
    commands = {}
    for part in script.split("&&"):
        argv = shlex.split(part)
        if argv and argv[0] == "exec":
            argv = argv[1:]
        assert argv[0] == "lmsan", part
        commands[argv[1]] = argv[1:]
    return commands


def _flag(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == name]


def test_compose_services_and_mounts():
    compose = _compose()
    services = compose["services"]
    assert {"app", "prometheus", "grafana"} <= set(services)
    build = services["app"]["build"]
    assert (DEPLOYMENTS / build["context"] / build.get("dockerfile", "Dockerfile")).is_file()
    named = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (DEPLOYMENTS / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in named, f"{name} uses undeclared volume {source}"


def test_compose_app_command_matches_the_cli_and_the_demo():
    commands = _app_commands()
    assert set(commands) == {"demo", "serve"} and set(commands) <= set(subcommands())
    parser = build_parser()
    demo = parser.parse_args(commands["demo"])
    serve = commands["serve"]
    assert parser.parse_args(serve).command == "serve"  # exits (SystemExit) on a flag the CLI does not know

    tasks = dict(t.split("=", 1) for t in _flag(serve, "--task"))
    args = ServeConfig(model=_flag(serve, "--model")[0], tasks=tasks)
    assert demo_layout(args, _flag(serve, "--signatures")[0], demo.out) == DEMO_LAYOUT
    assert any(v.endswith(":/data") for v in _compose()["services"]["app"]["volumes"])


def test_ports_agree_across_compose_prometheus_and_dockerfile():
    serve = _app_commands()["serve"]
    port, metrics_port = int(_flag(serve, "--port")[0]), int(_flag(serve, "--metrics-port")[0])
    app = _compose()["services"]["app"]
    assert f"{port}:{port}" in app["ports"]
    assert f":{port}/healthz" in " ".join(app["healthcheck"]["test"])

    config = load_yaml(PROMETHEUS_CONFIG)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "lmsan"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"app:{metrics_port}"]

    assert {port, metrics_port} <= _dockerfile_exposed()


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
            {"series": 'ray_lmsan_requests_total{task="sst2",action="unguarded",WorkerId="w1"}',
             "values": "_x10 3+3x10"},
            {"series": 'ray_lmsan_requests_total{task="other",action="pass",WorkerId="w1"}', "values": "0+5x20"},
        ],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "LmsanAnsweredUnguarded", "exp_alerts": []},
            {"eval_time": "12m", "alertname": "LmsanAnsweredUnguarded",
             "exp_alerts": [{"exp_labels": {"severity": "critical", "task": "sst2"}}]},
        ],
    },
    {   # 10% of guarded inputs flagged on sst2, 1% on other
        "input_series": [
            {"series": 'ray_lmsan_requests_total{task="sst2",action="pass",WorkerId="w1"}', "values": "0+90x20"},
            {"series": 'ray_lmsan_requests_total{task="sst2",action="purged",WorkerId="w1"}', "values": "0+10x20"},
            {"series": 'ray_lmsan_detections_total{task="sst2",signature="pv0",WorkerId="w1"}',
             "values": "0+10x20"},
            {"series": 'ray_lmsan_requests_total{task="other",action="pass",WorkerId="w1"}', "values": "0+99x20"},
            {"series": 'ray_lmsan_requests_total{task="other",action="flagged",WorkerId="w1"}', "values": "0+1x20"},
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
    assert "9090:9090" in _compose()["services"]["prometheus"]["ports"]

    provider = load_yaml(DEPLOYMENTS / "grafana/provisioning/dashboards/lmsan.yml")["providers"][0]
    mounts = dict(v.split(":")[:2] for v in _compose()["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]


def test_dashboard_panels_query_prometheus():
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert board["uid"] == "lmsan-guard" and board["schemaVersion"] >= 36
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]
        exprs = [t.get("expr", "").strip() for t in panel["targets"]]
        assert any(exprs), panel["title"]
        assert all(t["datasource"]["uid"] == "prometheus" for t in panel["targets"]), panel["title"]
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
    for var in board["templating"]["list"]:
        assert var["datasource"]["uid"] == "prometheus"
    assert all(e.strip() for e in dashboard_exprs())


def test_dashboard_covers_the_guard_metrics():
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    used = {n for p in board["panels"] for t in p["targets"] for n in re.findall(r"ray_lmsan_\w+", t["expr"])}
    assert {
        "ray_lmsan_requests_total",
        "ray_lmsan_detections_total",
        "ray_lmsan_purge_failures_total",
        "ray_lmsan_guard_errors_total",
        "ray_lmsan_match_ratio_bucket",
        "ray_lmsan_guard_seconds_bucket",
        "ray_lmsan_signatures_loaded",
        "ray_lmsan_signature_reloads_total",
    } <= used


def test_shipped_metric_names_are_the_exported_ones():
    names = shipped_metric_names()
    assert "ray_lmsan_match_ratio_bucket" in names
    assert names <= KNOWN_METRICS, sorted(names - KNOWN_METRICS)


# -- Dockerfile -----------------------------------------------------------------------------------
def _dockerfile_instructions() -> list[str]:
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    lines = [ln for ln in text.replace("\\\n", " ").splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [" ".join(ln.split()) for ln in lines]


def _dockerfile_exposed() -> set[int]:
    return {int(p.split("/")[0]) for ln in _dockerfile_instructions() if ln.startswith("EXPOSE ")
            for p in ln.split()[1:]}


def test_dockerfile_pins_cpu_torch_before_the_project():
    lines = _dockerfile_instructions()
    torch_at = next(i for i, ln in enumerate(lines) if "download.pytorch.org/whl/cpu" in ln and "torch==" in ln)
    project_at = next(i for i, ln in enumerate(lines) if re.search(r"pip install (\S+ )*\.( |$)", ln))
    assert torch_at < project_at
    pin = re.search(r"torch==[\w.+]+", lines[torch_at]).group(0)
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert f"TORCH_SPEC ?= {pin}" in makefile, "Dockerfile and Makefile pin different torch versions"
    assert 8000 in _dockerfile_exposed()
    assert any(ln.startswith("COPY deployments") for ln in lines)
    # both packages are in the image before it installs the project: the CLI's lab commands
    # (`lmsan demo`, which docker-compose runs) come from lmsan_lab through its entry point
    copied = [ln.split()[1] for ln in lines[:project_at] if ln.startswith("COPY ")]
    assert {"lmsan_serve", "lmsan_lab"} <= set(copied), copied
    # the dependencies install before any source is copied, so a source edit keeps that layer
    deps_at = next(i for i, ln in enumerate(lines) if "pip install -r" in ln)
    first_source = next(i for i, ln in enumerate(lines) if ln.startswith(("COPY lmsan_serve", "COPY lmsan_lab")))
    assert torch_at < deps_at < first_source < project_at
    assert "--no-deps" in lines[project_at]
    assert not any("HF_HUB_OFFLINE" in ln for ln in lines), "hub access is the user's choice"
    health = next(ln for ln in lines if ln.startswith("HEALTHCHECK "))
    assert "127.0.0.1:8000/healthz" in health


def test_mining_rayjob_runs_the_real_cli():
    import shlex

    import ray

    from lmsan_serve.cli import build_parser

    job = load_yaml(REPO / "mining" / "rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "lmsan"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "mine" and args.ray_address == "auto" and args.workers > 1 and args.resume
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    group = cluster["workerGroupSpecs"][0]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert args.workers <= gpus * group["maxReplicas"]  # every worker can hold a round at once
