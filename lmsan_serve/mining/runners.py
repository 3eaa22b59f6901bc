"""Where fuzz rounds run: in this process, or as Ray tasks on a local or remote cluster.

A runner takes seeds and the PVs found so far and yields `(seed, Candidate)` as rounds finish;
the job decides what the results mean, so the result is the same whichever runner ran them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..backbone import Backbone, load_backbone
from ..errors import LmsanError
from .config import MiningConfig
from .model import Candidate, Prepared, fuzz_round


class SerialRunner:
    """Rounds one after another in this process, in seed order."""

    workers = 1

    def __init__(self, backbone: Backbone, prepared: Prepared, config: MiningConfig, held: Prepared | None = None):
        self.backbone, self.prepared, self.config, self.held = backbone, prepared, config, held

    def run(self, seeds: list[int], found: torch.Tensor | None,
            may_start: Callable[[], bool] = lambda: True) -> Iterator[tuple[int, Candidate]]:
        for seed in seeds:
            if not may_start():
                return
            yield seed, fuzz_round(self.backbone, self.prepared, self.config, seed, found, self.held)

    def close(self) -> None:
        pass


# Each Ray worker process loads a backbone once and keeps it for the rounds it runs.
_WORKER_BACKBONES: dict[tuple[str, str], Backbone] = {}


def _to(prepared: Prepared, device: torch.device) -> Prepared:
    return Prepared(prepared.input_ids.to(device), prepared.attention_mask.to(device),
                    prepared.token_type_ids.to(device) if prepared.token_type_ids is not None else None,
                    prepared.monitor_index.to(device), prepared.word_starts, prepared.clean.to(device), prepared.scale)


def _round_task(model: str, device: str, fingerprint: str, prepared: Prepared, held: Prepared | None,
                config: MiningConfig, seed: int, found: torch.Tensor | None) -> Candidate:
    key = (model, device)
    backbone = _WORKER_BACKBONES.get(key)
    if backbone is None:
        backbone = load_backbone(model, None if device == "auto" else device)
        _WORKER_BACKBONES[key] = backbone
    if backbone.fingerprint != fingerprint:
        raise LmsanError(f"worker loaded other weights for {model} (fingerprint {backbone.fingerprint[:12]})")
    on = backbone.device
    cand = fuzz_round(backbone, _to(prepared, on), config, seed, found.to(on) if found is not None else None,
                      _to(held, on) if held is not None else None)
    cand.pv = cand.pv.cpu() if cand.pv is not None else None
    cand.trigger = cand.trigger.cpu() if cand.trigger is not None else None
    return cand


class RayRunner:
    """Rounds as Ray tasks, at most `workers` in flight; a local Ray on 127.0.0.1 unless `address`
    names a cluster. Workers load the backbone by name, so it must be reachable from every node
    (a hub id, or a path on shared storage)."""

    def __init__(self, backbone: Backbone, prepared: Prepared, config: MiningConfig, workers: int,
                 address: str | None = None, device: str = "auto", gpus_per_round: float = 0.0,
                 held: Prepared | None = None):
        import ray

        if workers < 1:
            raise LmsanError("--workers must be at least 1")
        self.workers = workers
        self._started = False
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(_node_ip_address="127.0.0.1", num_cpus=workers, include_dashboard=False,
                         log_to_driver=False)
                self._started = True
        self._ray = ray
        self._prepared = ray.put(_to(prepared, torch.device("cpu")))
        self._held = ray.put(_to(held, torch.device("cpu"))) if held is not None else None
        self._task = ray.remote(num_cpus=1, num_gpus=gpus_per_round, max_retries=2)(_round_task)
        self._args: tuple[Any, ...] = (backbone.name, device, backbone.fingerprint)
        self._config = config

    def run(self, seeds: list[int], found: torch.Tensor | None,
            may_start: Callable[[], bool] = lambda: True) -> Iterator[tuple[int, Candidate]]:
        ray = self._ray
        found_cpu = found.cpu() if found is not None else None
        queue = list(seeds)
        pending: dict[Any, int] = {}
        try:
            while queue or pending:
                while queue and len(pending) < self.workers and may_start():
                    seed = queue.pop(0)
                    ref = self._task.remote(*self._args, self._prepared, self._held, self._config, seed, found_cpu)
                    pending[ref] = seed
                if not pending:
                    return
                ready, _ = ray.wait(list(pending), num_returns=1)
                seed = pending.pop(ready[0])
                try:
                    cand = ray.get(ready[0])
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.as_instanceof_cause()
                    if isinstance(cause, LmsanError):
                        raise LmsanError(str(cause).splitlines()[-1]) from None
                    raise LmsanError(f"mining round {seed} failed on a Ray worker: {cause}") from None
                yield seed, cand
        finally:  # the consumer stopped early (detect mode has its verdict): drop the rest
            for ref in pending:
                ray.cancel(ref, force=True)

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
