"""Ray nodes on this machine that this process starts with the public `ray start` CLI and stops:
what `lmsan serve` and `lmsan mine --workers N` run on when no cluster address is given, and what
the multi-node tests build their clusters from.

Why `ray start` and not `ray.init()` with options: the options that pin a local cluster's node IP
and metrics port are private arguments of `ray.init`; `ray start` takes them as public flags. Each
node gets its own temp dir (session, sockets, logs), and the fixed default ports of `ray start`
(dashboard, dashboard agent, Ray client) are replaced by free ones, so that two clusters on one
machine, or two nodes of one cluster, do not collide.

A node's `ray start --block` process is owned by a small watchdog that stops it when the
watchdog's stdin closes: when the owner calls `RayNode.stop`, or when the owner dies, even by
SIGKILL of its whole process group, so a killed `lmsan mine` leaves no cluster behind. `ray stop`
is never used: it stops every Ray on the machine, other users' clusters included.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LmsanError

AUTH_MODE = "RAY_AUTH_MODE"
# `ray start` on 127.0.0.1: Ray itself maps loopback to the machine's routable address and its
# servers listen on every interface, so token authentication is what keeps others out.
NODE_IP = "127.0.0.1"
# A node drains for up to 30 s on SIGTERM (Ray's default) before its processes exit.
STOP_TIMEOUT_S = 45.0

# Runs `ray start --block` in a session of its own and stops it (SIGTERM, then SIGKILL of its
# process group) once stdin reaches EOF, a signal asks it to, or the node exits by itself; exits
# with the node's code. It runs in a session of its own too, so that a signal to the owner's
# process group (`timeout`, a closed terminal) cannot kill it before it has stopped the node.
_WATCHDOG = """
import os, signal, subprocess, sys, threading
proc = subprocess.Popen(sys.argv[1:], start_new_session=True)
stop = threading.Event()
for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    signal.signal(sig, lambda *_: stop.set())
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
try:
    while not stop.wait(0.5) and proc.poll() is None:
        pass
finally:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(float(os.environ["LMSAN_RAY_STOP_TIMEOUT_S"]))
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
sys.exit(proc.wait())
"""


def free_port(host: str = NODE_IP) -> int:
    """A port free on `host` now; another process may take it before it is bound, hence asked for
    just before the process that binds it starts."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def auth_mode() -> str:
    """The token-authentication mode this process and the nodes it starts share.

    Ray reads RAY_AUTH_MODE once, when it is imported (a local `ray.init()` sets it to `token`
    in the environment when it turns authentication on). So: the environment's mode when set;
    `token` while Ray is not imported yet (what a local `ray.init()` picks); otherwise this
    process already runs Ray without authentication, and nodes that required a token could not
    be reached from it: they run without, with Ray's own warning, as `ray start` does where no
    token exists."""
    mode = os.environ.get(AUTH_MODE, "").strip().lower()
    if mode:
        return mode
    if "ray" in sys.modules:
        warnings.warn(f"Ray was imported before {AUTH_MODE} was set, so this process runs Ray without token "
                      f"authentication and the local Ray node it starts does too; set {AUTH_MODE}=token before "
                      "importing Ray", RuntimeWarning, stacklevel=2)
        return "disabled"
    os.environ[AUTH_MODE] = "token"
    return "token"


def choose_auth() -> None:
    """Turn token authentication on for this process while that is still possible (before Ray is
    imported), unless the environment already chose a mode: call it first where this process may
    start its own nodes."""
    if not os.environ.get(AUTH_MODE, "").strip() and "ray" not in sys.modules:
        os.environ[AUTH_MODE] = "token"


def _ray_cli() -> list[str]:
    """`ray` of this interpreter's installation, also where its bin folder is not on PATH."""
    return [sys.executable, "-m", "ray.scripts.scripts"]


def _ensure_token(env: dict[str, str]) -> None:
    """Token mode needs a token; make the default one (~/.ray/auth_token) as `ray.init()` would."""
    if env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH"):
        return
    if (Path.home() / ".ray" / "auth_token").is_file():
        return
    done = subprocess.run([*_ray_cli(), "get-auth-token", "--generate"], env=env, capture_output=True, text=True,
                          timeout=120)
    if done.returncode != 0:
        raise LmsanError(f"could not create a Ray auth token: {_last_line(done.stderr or done.stdout)}")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["no output"])[-1][:400]


@dataclass
class RayNode:
    """One running node: its watchdog process, temp dir and the cluster's GCS address."""

    process: subprocess.Popen
    temp_dir: Path
    address: str
    log: Path
    connected: bool = field(default=False)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S + 15) -> None:
        """Disconnect this process if it connected through `start_local`, then stop the node and
        remove its temp dir. Safe to call twice."""
        if self.connected:
            import ray

            ray.shutdown()
            self.connected = False
        if self.process.stdin and not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_node(*, join: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
               metrics_port: int | None = None, object_store_bytes: int | None = None,
               timeout_s: float = 90.0) -> RayNode:
    """Start a head node (or, with `join`, a worker node of the cluster at that address) on
    this machine, and wait until it runs."""
    mode = auth_mode()
    env = {**os.environ, AUTH_MODE: mode, "LMSAN_RAY_STOP_TIMEOUT_S": str(STOP_TIMEOUT_S)}
    if mode == "token":
        _ensure_token(env)
    temp_dir = Path(tempfile.mkdtemp(prefix="lmsan-ray-"))
    cmd = [*_ray_cli(), "start", "--block", "--disable-usage-stats", "--node-ip-address", NODE_IP,
           "--temp-dir", str(temp_dir), "--dashboard-agent-listen-port", str(free_port())]
    if join:
        cmd += ["--address", join]
    else:
        cmd += ["--head", "--port", "0", "--include-dashboard", "false", "--dashboard-port", str(free_port()),
                "--ray-client-server-port", str(free_port())]
    for flag, value in (("--num-cpus", num_cpus), ("--num-gpus", num_gpus), ("--metrics-export-port", metrics_port),
                        ("--object-store-memory", object_store_bytes)):
        if value is not None:
            cmd += [flag, str(value)]
    log = temp_dir / "ray-start.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", _WATCHDOG, *cmd], stdin=subprocess.PIPE, stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    node = RayNode(proc, temp_dir, "", log)
    address_file = temp_dir / "ray_current_cluster"  # `ray start` writes it once the node runs
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if address_file.is_file() and address_file.read_text().strip():
            node.address = address_file.read_text().strip()
            return node
        time.sleep(0.2)
    why = "exited" if proc.poll() is not None else f"did not start within {timeout_s:.0f} s"
    reason = _last_line(log.read_text(errors="replace"))
    node.stop(timeout_s=STOP_TIMEOUT_S)
    raise LmsanError(f"the local Ray node {why}: {reason}")


def start_local(num_cpus: int | None = None, metrics_port: int | None = None,
                object_store_bytes: int | None = None) -> RayNode:
    """A one-node cluster on this machine, with this process connected to it as the driver."""
    node = start_node(num_cpus=num_cpus, metrics_port=metrics_port, object_store_bytes=object_store_bytes)
    try:
        import ray

        ray.init(address=node.address, log_to_driver=False)
        node.connected = True
    except BaseException:
        node.stop()
        raise
    return node
