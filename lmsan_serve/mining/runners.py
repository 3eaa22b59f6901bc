"""Where fuzz rounds run: in this process, or as Ray tasks on a local or remote cluster.

A runner takes round keys and the PVs found so far and yields `(key, Candidate, Placement)` as rounds
finish; the job decides what the results mean, so the result is the same whichever runner ran them.
A key is a fuzz round's seed, or a negative `probe.probe_key` whose aim is in `aims`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch

from ..backbone import Backbone, load_backbone
from ..errors import LmsanError
from .config import MiningConfig
from .model import Candidate, Prepared
from .probe import probed_seed, run_round


class Placement(NamedTuple):
    """Where a round ran: the Ray node id ("local" in a serial run) and the device it used."""

    node: str
    device: str


# What a runner yields per finished round.
Finished = tuple[int, Candidate, Placement]

# --device values a Ray run accepts; a GPU index names a GPU of one machine, while a task gets the
# GPU that Ray assigned to it.
RAY_DEVICES = ("auto", "cpu", "cuda")


def round_device(device: str) -> str:
    """The --device of a Ray run, checked here so that a bad value fails before any work."""
    if device not in RAY_DEVICES:
        hint = " (a Ray task uses the GPU Ray assigns it: use cuda)" if device.startswith("cuda:") else ""
        raise LmsanError(f"--device {device} cannot be used with Ray workers{hint}; use one of "
                         + ", ".join(RAY_DEVICES))
    return device


def driver_device(device: str) -> str:
    """Where the driver of a Ray run prepares the data and calibrates: the requested device when
    this machine has it, else the CPU. The driver needs no GPU; the rounds check theirs."""
    if device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return "cuda" if device.startswith("cuda") else "auto"


class SerialRunner:
    """Rounds one after another in this process, in seed order."""

    workers = 1

    def __init__(self, backbone: Backbone, prepared: Prepared, config: MiningConfig, held: Prepared | None = None):
        self.backbone = backbone
        self.retarget(prepared, config, held)

    def retarget(self, prepared: Prepared, config: MiningConfig, held: Prepared | None = None) -> None:
        """Run the next rounds on another position's data and settings (`mine` covers several)."""
        self.prepared, self.config, self.held = prepared, config, held

    def run(self, seeds: list[int], found: torch.Tensor | None,
            may_start: Callable[[], bool] = lambda: True, aims: dict[int, torch.Tensor] | None = None
            ) -> Iterator[Finished]:
        where = Placement("local", str(self.backbone.device))
        for key in seeds:
            if not may_start():
                return
            seed, aim = _round_of(key, aims)
            yield key, run_round(self.backbone, self.prepared, self.config, seed, found, self.held, aim), where

    def close(self) -> None:
        pass


def _round_of(key: int, aims: dict[int, torch.Tensor] | None) -> tuple[int, torch.Tensor | None]:
    """The seed a round starts from and its aim (None for a fuzz round)."""
    probed = probed_seed(key)
    if probed is None:
        return key, None
    if not aims or key not in aims:
        raise LmsanError(f"internal: aimed round {key} has no aim")
    return probed, aims[key]


# Each Ray worker process loads a backbone once and keeps it for the rounds it runs.
_WORKER_BACKBONES: dict[tuple[str, str], Backbone] = {}


def _to(prepared: Prepared, device: torch.device) -> Prepared:
    return Prepared(prepared.input_ids.to(device), prepared.attention_mask.to(device),
                    prepared.token_type_ids.to(device) if prepared.token_type_ids is not None else None,
                    prepared.monitor_index.to(device), prepared.word_starts, prepared.clean.to(device), prepared.scale)


def _task_device(requested: str) -> str:
    """The device of one round, decided on the node that runs it: a GPU only when Ray assigned the
    task one (a GPU nobody reserved may be busy with another task), the CPU otherwise; an
    explicit cuda without a usable GPU here is an error."""
    import ray

    if requested == "cpu":
        return "cpu"
    if ray.get_gpu_ids() and torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        node = ray.util.get_node_ip_address()
        raise LmsanError(f"--device cuda: the Ray worker on {node} has no usable CUDA GPU (Ray assigned "
                         f"{ray.get_gpu_ids() or 'none'}; torch.cuda.is_available() is {torch.cuda.is_available()})")
    return "cpu"


def _round_task(model: str, device: str, fingerprint: str, prepared: Prepared, held: Prepared | None,
                config: MiningConfig, seed: int, found: torch.Tensor | None,
                aim: torch.Tensor | None = None) -> tuple[Candidate, Placement]:
    import ray

    key = (model, _task_device(device))
    backbone = _WORKER_BACKBONES.get(key)
    if backbone is None:
        backbone = load_backbone(model, key[1])
        _WORKER_BACKBONES[key] = backbone
    if backbone.fingerprint != fingerprint:
        raise LmsanError(f"worker loaded other weights for {model} (fingerprint {backbone.fingerprint[:12]})")
    on = backbone.device
    cand = run_round(backbone, _to(prepared, on), config, seed, found.to(on) if found is not None else None,
                     _to(held, on) if held is not None else None, aim.to(on) if aim is not None else None)
    cand.pv = cand.pv.cpu() if cand.pv is not None else None
    cand.trigger = cand.trigger.cpu() if cand.trigger is not None else None
    return cand, Placement(ray.get_runtime_context().get_node_id(), str(on))


class RayRunner:
    """Rounds as Ray tasks, at most `workers` in flight; on a one-node cluster started on this
    machine unless `address` names a cluster. Workers load the backbone by name, so it must be
    reachable from every node (a hub id, or a path on shared storage).

    `device` (auto, cpu or cuda) is resolved by each task on its node (`_task_device`). A round
    asks Ray for `gpus_per_round` GPUs when the device is cuda, and with auto whenever the
    cluster has GPUs at the time it is submitted (nodes may join later, as an autoscaler adds them)."""

    def __init__(self, backbone: Backbone, prepared: Prepared, config: MiningConfig, workers: int,
                 address: str | None = None, device: str = "auto", gpus_per_round: float = 1.0,
                 held: Prepared | None = None):
        if workers < 1:
            raise LmsanError("--workers must be at least 1")
        self.workers = workers
        self._device = round_device(device)
        self._gpus = gpus_per_round
        self._node = None
        if not address:
            from ..raycluster import choose_auth

            choose_auth()
        import ray

        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                from ..raycluster import start_local

                self._node = start_local(num_cpus=workers)
        self._ray = ray
        if self._device == "cuda" and self._node is not None and not ray.cluster_resources().get("GPU"):
            self.close()  # its rounds would wait forever for a GPU that this machine does not have
            raise LmsanError("--device cuda: this machine has no GPU that Ray can use (use --device auto or cpu)")
        self._task = ray.remote(num_cpus=1, max_retries=2)(_round_task)
        self._args: tuple[Any, ...] = (backbone.name, self._device, backbone.fingerprint)
        self.retarget(prepared, config, held)

    def retarget(self, prepared: Prepared, config: MiningConfig, held: Prepared | None = None) -> None:
        """Run the next rounds on another position's data and settings, on the same cluster (`mine`
        covers several positions in turn)."""
        self._prepared = self._ray.put(_to(prepared, torch.device("cpu")))
        self._held = self._ray.put(_to(held, torch.device("cpu"))) if held is not None else None
        self._config = config

    def _round_gpus(self) -> float:
        if self._device == "cuda" or (self._device == "auto" and self._ray.cluster_resources().get("GPU", 0) > 0):
            return self._gpus
        return 0.0

    def run(self, seeds: list[int], found: torch.Tensor | None,
            may_start: Callable[[], bool] = lambda: True, aims: dict[int, torch.Tensor] | None = None
            ) -> Iterator[Finished]:
        ray = self._ray
        found_cpu = found.cpu() if found is not None else None
        queue = list(seeds)
        pending: dict[Any, int] = {}
        try:
            while queue or pending:
                while queue and len(pending) < self.workers and may_start():
                    key = queue.pop(0)
                    seed, aim = _round_of(key, aims)
                    task = self._task.options(num_gpus=self._round_gpus())
                    pending[task.remote(*self._args, self._prepared, self._held, self._config, seed, found_cpu,
                                        aim.cpu() if aim is not None else None)] = key
                if not pending:
                    return
                ready, _ = ray.wait(list(pending), num_returns=1)
                seed = pending.pop(ready[0])
                try:
                    cand, where = ray.get(ready[0])
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.as_instanceof_cause()
                    if isinstance(cause, LmsanError):
                        raise LmsanError(str(cause).splitlines()[-1]) from None
                    raise LmsanError(f"mining round {seed} failed on a Ray worker: {cause}") from None
                yield seed, cand, where
        finally:  # the consumer stopped early (detect mode has its verdict): drop the rest
            for ref in pending:
                ray.cancel(ref, force=True)

    def close(self) -> None:
        if self._node is not None:
            self._node.stop()
            self._node = None
