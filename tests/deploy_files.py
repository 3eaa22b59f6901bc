"""Helpers to read the shipped deployment files (deployments/), shared by the tests that check them."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOYMENTS = REPO / "deployments"
DASHBOARD = DEPLOYMENTS / "grafana" / "dashboards" / "lmsan.json"
PROMETHEUS_CONFIG = DEPLOYMENTS / "prometheus" / "prometheus.yml"
ALERTS = DEPLOYMENTS / "prometheus" / "alerts.yml"

_METRIC = re.compile(r"\bray_lmsan_[a-z0-9_]+")


def prometheus_required() -> bool:
    """Whether this environment must run the Prometheus checks: in CI (`CI=true`, as CI services
    set it) or where `LMSAN_REQUIRE_PROMETHEUS=1` (which .ci/run sets after installing Prometheus)."""
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("LMSAN_REQUIRE_PROMETHEUS") == "1"


def prometheus_tool(name: str) -> str:
    """The path of the Prometheus binary `name` (`prometheus`, `promtool`). A missing one skips the
    calling test on a developer's machine, but fails it where `prometheus_required()`: a CI run
    that silently skipped the checks would pass without having made them."""
    found = shutil.which(name)
    if found is not None:
        return found
    if prometheus_required():
        pytest.fail(f"{name} is required here (CI or LMSAN_REQUIRE_PROMETHEUS=1) but not installed: "
                    "apt-get install -y prometheus")
    pytest.skip(f"{name} is not installed (apt-get install -y prometheus; CI installs it)")


def load_yaml(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def dashboard_exprs() -> list[str]:
    """Every PromQL query of the dashboard: panel targets and template variable queries."""
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", []) if "expr" in t]
    for var in board.get("templating", {}).get("list", []):
        query = var.get("query")
        exprs.append(query.get("query", "") if isinstance(query, dict) else query or "")
    return exprs


def alert_rules() -> list[dict]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def shipped_metric_names() -> set[str]:
    """The `ray_lmsan_*` series names, exactly as written, in the dashboard queries and alert rules."""
    exprs = dashboard_exprs() + [rule["expr"] for rule in alert_rules()]
    return {name for expr in exprs for name in _METRIC.findall(expr)}


def prometheus_config_for(targets: list[str], rules_dir: str | Path) -> dict:
    """The shipped prometheus.yml scraping `targets` instead of the compose service, with its rule
    files looked up in `rules_dir` (Prometheus resolves relative rule paths against the config's folder,
    which a test's temporary config does not share with the shipped alerts)."""
    config = copy.deepcopy(load_yaml(PROMETHEUS_CONFIG))
    config["rule_files"] = [str(Path(rules_dir) / Path(p).name) for p in config.get("rule_files", [])]
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": list(targets)}]
    return config
