"""Typed settings of the guarded endpoint: the `args` of the Serve application.

The same model is filled from `lmsan serve` flags, from a Serve config file
(`deployments/*.yaml`, `applications[].args`) and from the classifier deployment's `user_config`
(the part that can change without a restart: signatures, modes, threshold, batching).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import LmsanError, first_problem
from ..kinds import AuditSink, Mode


class TaskConfig(BaseModel):
    """One soft prompt served on the shared backbone."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(description="folder of a prompt artifact written by `lmsan train-prompt`")
    mode: Mode | None = Field(default=None, description="guard mode for this task; default: the app's mode")
    calibration: str | None = Field(default=None, description=(
        "clean inputs of this task (JSONL with `text`, optional `text_pair`): the monitor's thresholds are "
        "raised on them, scored through this task's prompt, so that at most `calibration_fpr` of them flag "
        "(docs/serving.md, Per-task calibration)"))
    calibration_fpr: float = Field(default=0.005, gt=0.0, lt=1.0)
    calibration_margin: bool = Field(default=False, description=(
        "fit on half the calibration inputs and add the held-out conformal margin, which bounds unseen false "
        "flags at calibration_fpr (from 398 inputs at 0.5%) but can switch off the PV combinations that catch "
        "some triggers; off: the exact fit (docs/serving.md, Per-task calibration)"))


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_inputs: int = Field(default=32, ge=1, le=4096, description="inputs per request")
    max_chars: int = Field(default=4000, ge=1, le=1_000_000, description="characters per input")


class Batching(BaseModel):
    """Dynamic batching on the backbone (`@serve.batch`); sizes count inputs, not requests."""

    model_config = ConfigDict(extra="forbid")
    max_batch_size: int = Field(default=64, ge=1, le=4096)
    batch_wait_timeout_s: float = Field(default=0.005, ge=0.0, le=10.0)


class Reloadable(BaseModel):
    """What `reconfigure` (the deployment's `user_config`) may change on a running replica."""

    model_config = ConfigDict(extra="forbid")
    signatures: str | None = Field(default=None, description="signature file (safetensors) to guard with")
    mode: Mode = Mode.ENFORCE
    task_modes: dict[str, Mode] = Field(default_factory=dict, description="per-task mode overrides")
    threshold: float | None = Field(default=None, gt=0.0, le=1.0, description="override every PV's threshold")
    batching: Batching = Field(default_factory=Batching)
    fail_open: bool = Field(
        default=False,
        description="on a guard error (or no valid signature set) answer unguarded instead of 503; every such "
                    "input says action 'unguarded', is logged and counted. For availability-first teams only",
    )


class ServeConfig(Reloadable):
    """Everything the application needs. Paths may be relative to the working folder of the replicas."""

    model: str = Field(description="backbone: local folder, hub id, or `minilm`")
    tasks: dict[str, TaskConfig | str] = Field(description="task name -> prompt folder (or {prompt, mode})")
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    limits: Limits = Field(default_factory=Limits)
    prompt_cache_size: int = Field(default=16, ge=1, description="soft prompts kept loaded per replica")
    watch_interval_s: float = Field(default=5.0, ge=0.0, description="poll the signature file for changes; 0: off")
    audit: AuditSink = Field(default=AuditSink.STDOUT, description=(
        "where each flagged input's JSON audit line goes: stdout (default: a cluster's log collector ships a "
        "replica's stdout without setup), log (the `lmsan.audit` Python logger, for deployments that route "
        "logging themselves) or off"))
    audit_text: bool = Field(default=False, description="put the input text into audit lines")
    allow_fingerprint_mismatch: bool = False
    trusted_keys: list[str] = Field(
        default_factory=list,
        description="Ed25519 public keys (PEM); when given, every signature file loaded must be signed by one",
    )
    base_dir: str | None = Field(default=None, description="where relative paths resolve (set by build_app)")

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, tasks: dict[str, TaskConfig | str]) -> dict[str, TaskConfig | str]:
        if not tasks:
            raise ValueError("at least one task is needed")
        for name in tasks:
            if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
                raise ValueError(f"task name {name!r} must be 1-64 characters of letters, digits, '-', '_', '.'")
        return tasks

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        unknown = set(self.task_modes) - set(self.tasks)
        if unknown:
            raise ValueError(f"task_modes names unknown tasks: {', '.join(sorted(unknown))}")
        if self.limits.max_inputs > self.batching.max_batch_size:
            raise ValueError(
                f"limits.max_inputs ({self.limits.max_inputs}) must not exceed "
                f"batching.max_batch_size ({self.batching.max_batch_size}): a batch holds whole requests"
            )
        return self

    def task(self, name: str) -> TaskConfig:
        t = self.tasks[name]
        return TaskConfig(prompt=t) if isinstance(t, str) else t


    def reloadable(self) -> dict:
        return Reloadable.model_validate(self.model_dump(include=set(Reloadable.model_fields))).model_dump()

    def resolved(self, base: str | Path) -> ServeConfig:
        """Paths made absolute against `base`, so replicas in other folders find the same files."""
        root = Path(base)

        def fix(p: str) -> str:
            q = Path(p).expanduser()
            return str(q if q.is_absolute() else (root / q).resolve())

        tasks = {}
        for n in self.tasks:
            t = self.task(n)
            tasks[n] = t.model_copy(update={"prompt": fix(t.prompt),
                                            "calibration": fix(t.calibration) if t.calibration else None})
        model = fix(self.model) if (root / self.model).exists() else self.model
        return self.model_copy(update={
            "tasks": tasks, "model": model, "signatures": fix(self.signatures) if self.signatures else None,
            "trusted_keys": [fix(k) for k in self.trusted_keys],
        })


def parse_config(data: dict) -> ServeConfig:
    """Validate app args; a bad value becomes one LmsanError line naming the field."""
    from pydantic import ValidationError

    try:
        return ServeConfig.model_validate(data)
    except ValidationError as exc:
        raise LmsanError(f"invalid serve config at {first_problem(exc, default='config')}") from exc


def task_mode(settings: Reloadable, task: TaskConfig, name: str) -> Mode:
    """The guard mode task `name` is served in: a `task_modes` override, else the task's own
    mode, else the app's."""
    return settings.task_modes.get(name) or task.mode or settings.mode
