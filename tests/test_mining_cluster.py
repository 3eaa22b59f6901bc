"""`lmsan mine` on a real two-node Ray cluster on this machine: rounds run on both nodes, each
resolving `--device auto` where it runs, and the signature file equals a serial run's. The KubeRay
RayJob in mining/ runs the same command line.

The cluster is two `ray start` nodes with temp dirs of their own (lmsan_serve.raycluster), joined
over the head's address; both are stopped in a finally, by their own processes, never `ray stop`.
Run it under `flock /tmp/ray-tests.lock` (one Ray cluster on the machine at a time)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmsan_serve.cli import build_parser, main
from lmsan_serve.mining.probe import probe_key
from lmsan_serve.signatures import SignatureSet

from .deploy_files import REPO, load_yaml

# The cluster run: search mode with waves of 2 (rounds started from the same PVs, so both nodes
# are busy at once and the result does not depend on which finishes first), on tiny rounds, at every
# position (no --position: [CLS], the pooler and [MASK] in turn, on the one cluster).
MINE = ["--mode", "search", "--max-rounds", "4", "--wave", "2", "--lines", "128", "--resume", "--json"]
CLUSTER = ["--workers", "2", "--device", "auto"]
# What the RayJob may set otherwise than the test: where things are, and how much work it does.
# Budgets scale with the cluster (the result of a round does not depend on them).
WHERE = {"model", "out", "ray_address", "corpus"}
HOW_MUCH = {"max_rounds", "workers", "wave", "lines"}
# A round's numbers on two processes differ only by float reduction order (Ray workers run with
# one thread); an order of magnitude above the PV tolerance of test_ray_fan_out_equals_the_serial_run.
DISTANCE_RTOL = 1e-4
POSITIONS = ("cls", "pooler", "mask")


def _rounds(out: Path) -> dict[str, list[dict]]:
    """Every round of each position, from that position's checkpoint beside `out`."""
    return {p: json.loads(out.with_name(f"{out.name}.{p}.ckpt.json").read_text())["candidates"] for p in POSITIONS}


def _mine_cmd(model: Path, out: Path, address: str) -> list[str]:
    return ["lmsan", "mine", "--model", str(model), "--out", str(out), *MINE, *CLUSTER, "--ray-address", address]


def _alive_nodes(address: str, env: dict[str, str]) -> set[str]:
    """The cluster's alive node ids, asked by a driver of its own (this test process stays off Ray)."""
    code = (f"import json, ray; ray.init(address={address!r}, log_to_driver=False); "
            "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']])); ray.shutdown()")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def _wait_for_nodes(address: str, env: dict[str, str], count: int, timeout_s: float = 30.0) -> set[str]:
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = _alive_nodes(address, env)
        if len(nodes) >= count or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


def test_mining_on_two_nodes_equals_the_serial_run(tiny_por, tmp_path, monkeypatch, capsys):
    from lmsan_serve.raycluster import start_node

    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # nodes, the CLI's driver and the probe share it
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}  # auto resolves to cpu everywhere
    started = time.monotonic()
    nodes = []
    try:
        head = start_node(num_cpus=1, num_gpus=0, object_store_bytes=100_000_000)
        nodes.append(head)
        nodes.append(start_node(join=head.address, num_cpus=1, num_gpus=0, object_store_bytes=100_000_000))
        node_ids = _wait_for_nodes(head.address, env, 2)
        assert len(node_ids) == 2, f"the second node did not join: {node_ids}"
        out = tmp_path / "cluster.safetensors"
        cmd = _mine_cmd(tiny_por, out, head.address)
        done = subprocess.run([sys.executable, "-m", "lmsan_serve.cli", *cmd[1:]], env=env, capture_output=True,
                              text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        for node in reversed(nodes):
            node.stop()
    assert all(not n.temp_dir.exists() for n in nodes)
    by_position = _rounds(out)
    assert list(summary["positions"]) == list(POSITIONS)
    for position_rounds in by_position.values():
        fuzz = [r for r in position_rounds if r["seed"] >= 0]
        assert [r["seed"] for r in fuzz] == [0, 1, 2, 3]
        # then one aimed round per PV the fuzz rounds kept (mining.probe), on the cluster too
        aimed = {r["seed"] for r in position_rounds if r["seed"] < 0}
        assert aimed <= {probe_key(r["seed"]) for r in fuzz if not r["filters"]}
    rounds = [r for p in POSITIONS for r in by_position[p]]
    assert {r["node"] for r in rounds} == node_ids, "every round ran on a node of the cluster, and both nodes ran some"
    assert {r["device"] for r in rounds} == {"cpu"}

    serial_out = tmp_path / "serial.safetensors"
    argv = ["mine", "--model", str(tiny_por), "--out", str(serial_out), *MINE, "--quiet", "--device", "cpu"]
    assert main(argv) == 0
    serial = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["verdict"] == serial["verdict"] and summary["pvs"] == serial["pvs"]
    assert summary["rounds"] == serial["rounds"] == len(rounds)
    serial_rounds = [r for p in POSITIONS for r in _rounds(serial_out)[p]]
    assert {r["node"] for r in serial_rounds} == {"local"}
    for ours, theirs in zip(rounds, serial_rounds, strict=True):
        assert (ours["seed"], ours["kept"], ours["filters"], ours["epochs"]) == \
            (theirs["seed"], theirs["kept"], theirs["filters"], theirs["epochs"])
        assert ours["distance"] == pytest.approx(theirs["distance"], rel=DISTANCE_RTOL)
    mined, reference = SignatureSet.load(out), SignatureSet.load(serial_out)
    assert [(r.position, r.seed) for r in mined.meta.pvs] == [(r.position, r.seed) for r in reference.meta.pvs]
    assert [r["pvs"] for r in summary["positions"].values()] == [r["pvs"] for r in serial["positions"].values()]
    assert torch.allclose(mined.pvs, reference.pvs, atol=1e-5)
    assert time.monotonic() - started < 150, "the two-node test outgrew its time bound"


def test_mining_rayjob_runs_the_real_cli():
    """The RayJob's entrypoint parses with the real CLI parser and is the command the two-node
    test runs, apart from where things are and how much work it does."""

    job = load_yaml(REPO / "mining" / "rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "lmsan"
    parser = build_parser()
    theirs = vars(parser.parse_args(argv[1:]))
    ours = vars(parser.parse_args(_mine_cmd(Path("/m"), Path("/o.safetensors"), "127.0.0.1:6379")[1:]))
    assert theirs["command"] == "mine" and theirs["ray_address"] == "auto" and theirs["device"] == "auto"
    differ = {k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)}
    assert differ <= WHERE | HOW_MUCH, f"the RayJob runs another command: {sorted(differ - WHERE - HOW_MUCH)}"
    assert theirs["workers"] > 1 and theirs["wave"] >= theirs["workers"] and theirs["resume"]
    assert job["spec"]["backoffLimit"] >= 1  # a retry resumes from the checkpoint beside --out
    cluster = job["spec"]["rayClusterSpec"]
    # the Ray the image ships (constraints/image.txt), not whichever Ray this venv happens to hold
    image_pins = Path(__file__).resolve().parents[1] / "constraints" / "image.txt"
    pins = dict(line.split("==") for line in image_pins.read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert cluster["rayVersion"] == pins["ray"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head only schedules
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    group = cluster["workerGroupSpecs"][0]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    worker = group["template"]["spec"]["containers"][0]
    gpus = int(worker["resources"]["limits"]["nvidia.com/gpu"])
    assert worker["image"].endswith(":cuda") and head["image"] == worker["image"]  # one image: the driver's torch
    assert theirs["workers"] <= gpus * group["maxReplicas"]  # every round in flight can hold a GPU


def test_a_gpu_index_is_refused_with_ray_before_any_work(capsys):
    """A Ray task gets the GPU Ray assigns it: `cuda:1` names one machine's GPU, refused in one line."""
    assert main(["mine", "--model", "minilm", "--out", "/nonexistent/x.safetensors", "--workers", "2",
                 "--device", "cuda:1"]) == 2
    err = capsys.readouterr().err
    assert "cannot be used with Ray workers" in err and "use cuda" in err and "Traceback" not in err


def _processes_using(path: Path) -> list[int]:
    """Processes whose command line names `path` (a node's temp dir: its raylet, GCS, workers)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(path) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process command lines from /proc")
def test_a_killed_owner_leaves_no_node_behind(tmp_path):
    """`lmsan mine` killed with SIGKILL runs no cleanup of its own, and `timeout` or a closed terminal
    signals its whole process group: the watchdog must survive that and stop the node."""
    import shutil
    import signal

    code = ("import time; from lmsan_serve.raycluster import start_node; "
            "n = start_node(num_cpus=1, object_store_bytes=100_000_000); print(n.temp_dir, flush=True); "
            "time.sleep(300)")
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "RAY_AUTH_MODE": "token"}, start_new_session=True)
    temp_dir = None
    try:
        line = owner.stdout.readline().strip()
        assert line, "the node did not start"
        temp_dir = Path(line)
        assert temp_dir.is_dir() and _processes_using(temp_dir), "the node did not start"
        os.killpg(owner.pid, signal.SIGKILL)  # the owner's group: what it started in it dies with it
        owner.wait(10)
        deadline = time.monotonic() + 60  # a node drains for a moment before its processes exit
        while _processes_using(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _processes_using(temp_dir), "the node outlived its owner"
    finally:
        if owner.poll() is None:
            owner.kill()
        if temp_dir is not None:
            for pid in _processes_using(temp_dir):  # only what this test's node started
                os.kill(pid, signal.SIGKILL)
            shutil.rmtree(temp_dir, ignore_errors=True)
