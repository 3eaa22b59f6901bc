"""The shipped deployment files parse, validate against the schemas that will read them, and agree
with each other (paths, ports). The Prometheus and Grafana files are checked in test_monitoring."""

from __future__ import annotations

import importlib
import shlex
from pathlib import Path

import yaml
from ray import serve
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

from lmsan_serve.cli import build_parser, subcommands
from lmsan_serve.serving.config import Reloadable, ServeConfig, parse_config

from .deploy_files import (
    DEPLOYMENTS,
    PROMETHEUS_CONFIG,
    REPO,
    load_yaml,
)

IMPORT_PATH = "lmsan_serve.serving.app:build_app"
DEPLOYMENT_NAMES = {"GuardedClassifier", "LmsanIngress"}
# What `lmsan demo --out DIR` writes, relative to DIR.
DEMO_LAYOUT = {"model": "por", "tasks": {"sst2": "prompt-sst2"}, "signatures": "mined/search.safetensors"}

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


def test_local_replicas_share_out_the_node_cpus():
    """`lmsan serve` and the demo run one Ray node: each classifier replica asks for its share of
    the node's CPUs, which Ray turns into torch's thread count there; the deployment's default of
    one CPU would leave the other cores of a single-replica machine idle."""
    from lmsan_serve.serving.app import GuardedClassifier, make_app
    from lmsan_serve.serving.run import local_replica_cpus

    assert local_replica_cpus(2, None) == 2 and local_replica_cpus(16, 4) == 4 and local_replica_cpus(2, 3) == 1
    args = load_yaml(DEPLOYMENTS / "serve-demo.yaml")["applications"][0]["args"]
    app = make_app(parse_config(dict(args)), replica_cpus=2)
    classifier = app._bound_deployment.init_args[0]  # the ingress is bound to the classifier
    assert classifier._bound_deployment.ray_actor_options["num_cpus"] == 2
    assert GuardedClassifier.ray_actor_options["num_cpus"] == 1  # a cluster's own default is untouched


def test_replicas_may_hold_a_full_batch_of_requests():
    """Ray Serve batches the requests ongoing on a replica at once, so a `max_ongoing_requests`
    below `batching.max_batch_size` keeps batches of one-sentence requests short of their size."""
    rayservice = load_yaml(DEPLOYMENTS / "kuberay" / "rayservice.yaml")
    for config in (load_yaml(DEPLOYMENTS / "serve-demo.yaml"), yaml.safe_load(rayservice["spec"]["serveConfigV2"])):
        app = config["applications"][0]
        classifier = next(d for d in app["deployments"] if d["name"] == "GuardedClassifier")
        batch = classifier["user_config"]["batching"]["max_batch_size"]
        assert classifier["max_ongoing_requests"] >= batch, app["name"]


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


# -- Dockerfile -----------------------------------------------------------------------------------
def _dockerfile_instructions() -> list[str]:
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    lines = [ln for ln in text.replace("\\\n", " ").splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [" ".join(ln.split()) for ln in lines]


def _dockerfile_exposed() -> set[int]:
    return {int(p.split("/")[0]) for ln in _dockerfile_instructions() if ln.startswith("EXPOSE ")
            for p in ln.split()[1:]}

