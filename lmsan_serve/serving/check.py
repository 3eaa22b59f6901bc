"""`lmsan check-config`: a Serve config checked offline, before `serve deploy` finds its faults.

Ray Serve starts a replica and only then reads what its `args` and `user_config` point at; a
wrong path or an unknown key then shows as a replica that never gets healthy, or, for a reload,
as a log line while the old settings keep serving. This reads the same file the way the app
will: the lmsan applications' `args` through `ServeConfig` (unknown fields refused), each
GuardedClassifier `user_config` through `Reloadable`, relative paths against the folder `serve
run` is started from, and then every file they name: the model folder, each prompt artifact,
calibration file, the signature file (format, checksum, signature against the trusted keys) and
the keys. It loads no model, so it runs anywhere the files are, in a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LmsanError, first_problem
from ..kinds import Mode, Position, readable_positions
from .config import Reloadable, ServeConfig, parse_config, task_mode

if TYPE_CHECKING:
    from ..signatures import SignatureSet

IMPORT_PATH = "lmsan_serve.serving.app:build_app"
CLASSIFIER = "GuardedClassifier"


@dataclass
class AppCheck:
    """What one lmsan application of the file serves, once every check has passed."""

    name: str
    model: str
    tasks: list[str]
    signatures: str | None
    pvs: int = 0
    verdict: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "model": self.model, "tasks": self.tasks, "signatures": self.signatures,
                "pvs": self.pvs, "verdict": self.verdict, "notes": self.notes}


def check_config_file(path: str | Path, base: str | Path | None = None) -> list[AppCheck]:
    """Check every lmsan application in a Serve config (or a bare `args` mapping); relative paths
    resolve against `base` (default: the current folder, as for `serve run`). LmsanError names
    the first problem."""
    data = _read_yaml(Path(path))
    apps = data.get("applications") if "applications" in data else [{"name": "lmsan", "args": data,
                                                                      "import_path": IMPORT_PATH}]
    if not isinstance(apps, list):
        raise LmsanError(f"{path}: 'applications' must be a list")
    ours = [a for a in apps if isinstance(a, dict) and a.get("import_path") == IMPORT_PATH]
    if not ours:
        raise LmsanError(f"{path}: no application with import_path {IMPORT_PATH}")
    root = Path(base) if base is not None else Path.cwd()
    return [_check_app(app, root) for app in ours]


def _read_yaml(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise LmsanError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise LmsanError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from exc
    if not isinstance(data, dict):
        raise LmsanError(f"{path}: a Serve config is a mapping, not {type(data).__name__}")
    return data


def _check_app(app: dict, root: Path) -> AppCheck:
    name = str(app.get("name", "lmsan"))
    try:
        config = _app_config(app)
    except LmsanError as exc:
        raise LmsanError(f"application {name!r}: {exc}") from exc
    config = config.resolved(root)
    check = AppCheck(name, config.model, list(config.tasks), config.signatures)
    try:
        _check_files(config, check)
    except LmsanError as exc:
        raise LmsanError(f"application {name!r}: {exc}") from exc
    return check


def _app_config(app: dict) -> ServeConfig:
    """The app's `args` merged with its classifier's `user_config`, as the replica sees them."""
    args = app.get("args") or {}
    if not isinstance(args, dict):
        raise LmsanError("'args' must be a mapping")
    from pydantic import ValidationError

    user_config = _user_config(app)
    try:
        Reloadable.model_validate(user_config)
    except ValidationError as exc:
        raise LmsanError(f"invalid user_config of {CLASSIFIER} at {first_problem(exc, default='user_config')}") from exc
    return parse_config({**args, **user_config})


def _user_config(app: dict) -> dict[str, Any]:
    for deployment in app.get("deployments") or []:
        if isinstance(deployment, dict) and deployment.get("name") == CLASSIFIER:
            found = deployment.get("user_config") or {}
            if not isinstance(found, dict):
                raise LmsanError(f"user_config of {CLASSIFIER} must be a mapping")
            return found
    return {}


def _check_files(config: ServeConfig, check: AppCheck) -> None:
    from ..signatures import SignatureSet
    from ..signing import load_public_keys

    _check_model(config.model, check)
    keys = load_public_keys(config.trusted_keys) if config.trusted_keys else None
    sig = None
    if config.signatures:
        if not Path(config.signatures).is_file():
            raise LmsanError(f"signature file not found: {config.signatures}")
        sig = SignatureSet.load(config.signatures, trusted_keys=keys)
        check.pvs, check.verdict = len(sig), sig.meta.verdict
    for task in config.tasks:
        _check_task(config, task, sig)


def _check_model(model: str, check: AppCheck) -> None:
    path = Path(model)
    if path.is_absolute():  # `resolved` makes a model absolute only where it found the folder
        if not (path / "config.json").is_file():
            raise LmsanError(f"model folder {model} has no config.json (save_pretrained layout)")
    elif model.startswith((".", "~", "/")) or model.count("/") > 1:  # no hub id looks like this
        raise LmsanError(f"model folder not found: {model}")
    elif model != "minilm":
        check.notes.append(f"model {model!r} is no local folder here: a hub id, fetched when a replica starts")


def _check_task(config: ServeConfig, task: str, sig: SignatureSet | None) -> None:
    from ..data import load_examples
    from ..prompts.model import read_manifest

    settings = config.task(task)
    folder = Path(settings.prompt)
    if not folder.is_dir():
        raise LmsanError(f"task {task!r}: prompt folder not found: {folder}")
    manifest, prompt_config, _ = read_manifest(folder)
    mode = task_mode(config, settings, task)
    if mode != Mode.OFF and sig is None:
        raise LmsanError(f"task {task!r} is guarded (mode {mode}) but no signature file is given")
    trained_on = manifest["backbone"].get("fingerprint")
    if sig is not None and trained_on != sig.meta.backbone.fingerprint and not config.allow_fingerprint_mismatch:
        raise LmsanError(f"task {task!r}: its prompt was trained on other weights than the signature file "
                         f"was mined on ({str(trained_on)[:12]} vs {sig.meta.backbone.fingerprint[:12]})")
    if sig is not None and not readable_positions(sig.positions, prompt_config.position == Position.MASK):
        raise LmsanError(f"task {task!r}: the signatures watch [MASK], but its prompt has no cloze template")
    if settings.calibration:
        load_examples(settings.calibration, require_label=False)
