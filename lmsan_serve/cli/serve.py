"""`lmsan serve`: the guarded HTTP endpoint (Ray Serve) in the foreground."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import LmsanError
from ..kinds import AuditSink, Mode
from .common import add_common, add_trusted_flag, emit, say, trusted_keys


def _task_flags(values: list[str]) -> dict[str, str]:
    tasks: dict[str, str] = {}
    for v in values:
        name, sep, folder = v.partition("=")
        if not sep or not name or not folder:
            raise LmsanError(f"--task expects NAME=PROMPT_DIR, got {v!r}")
        if name in tasks:
            raise LmsanError(f"task {name!r} is given twice")
        if not Path(folder).is_dir():
            raise LmsanError(f"prompt folder not found for task {name!r}: {folder}")
        tasks[name] = folder
    return tasks


def _calibration_flags(values: list[str], tasks: dict[str, str]) -> dict[str, dict]:
    """--calibration NAME=FILE pairs as task settings, each file read now so that a bad one fails
    before a cluster starts."""
    from ..data import load_examples

    out: dict[str, dict] = {name: {"prompt": folder} for name, folder in tasks.items()}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise LmsanError(f"--calibration expects NAME=FILE, got {v!r}")
        if name not in tasks:
            raise LmsanError(f"--calibration names task {name!r}, which no --task gives")
        load_examples(path, require_label=False)
        out[name]["calibration"] = path
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    from ..serving import parse_config
    from ..serving.run import serve_until_stopped, start
    from ..signatures import SignatureSet

    if args.mode != "off" and not args.signatures:
        raise LmsanError(f"--signatures is required in mode {args.mode!r}")
    if args.signatures:
        # fail fast on a bad file or key, before a cluster starts
        SignatureSet.load(args.signatures, trusted_keys=trusted_keys(args))
    else:
        trusted_keys(args)
    values = {
        "model": args.model, "tasks": _calibration_flags(args.calibration or [], _task_flags(args.task)),
        "signatures": args.signatures, "mode": args.mode,
        "threshold": args.threshold, "device": args.device, "watch_interval_s": args.watch_interval,
        "limits": {"max_inputs": args.max_inputs, "max_chars": args.max_chars},
        "batching": {"max_batch_size": max(args.max_batch_size, args.max_inputs),
                     "batch_wait_timeout_s": args.batch_wait_ms / 1000},
        "audit": args.audit, "audit_text": args.audit_text,
        "allow_fingerprint_mismatch": args.allow_fingerprint_mismatch,
        "trusted_keys": args.trusted_key or [], "fail_open": args.fail_open,
    }
    config = parse_config(values)
    if args.replicas is not None and args.replicas < 1:
        raise LmsanError("--replicas must be at least 1")
    say(args, f"starting the guarded endpoint ({len(config.tasks)} task(s), mode {config.mode}) ...")
    endpoint = start(config, host=args.host, port=args.port, metrics_port=args.metrics_port,
                     replicas=args.replicas, ray_address=args.ray_address, ready_timeout_s=args.ready_timeout)
    task = next(iter(config.tasks))
    info = {"url": endpoint.url, "metrics": endpoint.metrics_url, "docs": endpoint.url + "/docs",
            "tasks": list(config.tasks)}
    emit(args, "\n".join([
        f"serving on {endpoint.url}  (OpenAPI: {endpoint.url}/docs)",
        f"metrics:   {endpoint.metrics_url or 'exported by the Ray cluster'}",
        f"try:       curl -s {endpoint.url}/v1/classify -H 'content-type: application/json' "
        f"-d '{{\"task\": \"{task}\", \"inputs\": [\"a gripping, funny film\"]}}'",
        "Ctrl-C stops it.",
    ]), info)
    sys.stdout.flush()
    serve_until_stopped(endpoint, lambda m: say(args, m))
    return 0


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run the guarded HTTP endpoint (Ray Serve) in the foreground",
                       description="Serve one backbone with one or more soft prompts over HTTP, every request "
                       "guarded by the signature file; Prometheus metrics on --metrics-port. The same app is "
                       "in deployments/serve-demo.yaml for `serve run` / `serve deploy`.")
    add_common(p)
    p.add_argument("--task", action="append", required=True, metavar="NAME=PROMPT_DIR",
                   help="a task and its prompt folder (repeat for more tasks)")
    p.add_argument("--calibration", action="append", metavar="NAME=FILE", help=(
        "clean inputs of task NAME (JSONL with text, optional text_pair): its thresholds are raised on them "
        "before serving, so that at most 0.5%% of them flag (repeat per task)"))
    p.add_argument("--signatures", help="signature file (SIG.safetensors); hot-reloaded when it changes")
    p.add_argument("--mode", choices=Mode.values(), default=Mode.ENFORCE.value)
    p.add_argument("--threshold", type=float, help="override every PV's threshold")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8080, help="Prometheus export port of the local Ray")
    p.add_argument("--replicas", type=int, help="classifier replicas (default 1)")
    p.add_argument("--ray-address", help="deploy to a running Ray cluster instead of starting one")
    p.add_argument("--max-inputs", type=int, default=32, help="inputs per request (default 32)")
    p.add_argument("--max-chars", type=int, default=4000, help="characters per input (default 4000)")
    p.add_argument("--max-batch-size", type=int, default=64, help="inputs per backbone batch (default 64)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="batch gathering window (default 5 ms)")
    p.add_argument("--watch-interval", type=float, default=5.0, help="seconds between signature file checks")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the app to be healthy")
    p.add_argument("--audit", choices=AuditSink.values(), default=AuditSink.STDOUT.value,
                   help="where audit lines (one JSON line per flagged input) go: stdout (default, where a "
                        "cluster collects logs), log (the lmsan.audit logger) or off")
    p.add_argument("--audit-text", action="store_true", help="include input text in audit log lines")
    p.add_argument("--fail-open", action="store_true",
                   help="on a guard error answer unguarded (action 'unguarded', logged and counted) instead of "
                        "503; for availability-first teams")
    p.add_argument("--allow-fingerprint-mismatch", action="store_true",
                   help="use signatures made for other weights (not recommended)")
    add_trusted_flag(p)
    p.set_defaults(func=cmd_serve)


def cmd_check_config(args: argparse.Namespace) -> int:
    from ..serving.check import check_config_file

    apps = check_config_file(args.config, base=args.base)
    lines = []
    for app in apps:
        guard = f"{app.pvs} PV(s), verdict {app.verdict}" if app.signatures else "no signature file"
        lines.append(f"ok: application {app.name!r}: model {app.model}, task(s) {', '.join(app.tasks)}; {guard}")
        lines += [f"  note: {n}" for n in app.notes]
    emit(args, "\n".join(lines), {"config": str(args.config), "applications": [a.to_dict() for a in apps]})
    return 0


def add_check_config(sub) -> None:
    p = sub.add_parser("check-config", help="check a Serve config and every file it names, offline",
                       description="Validate the lmsan applications of a Ray Serve config (or a bare `args` "
                       "mapping) as the app will read them: args and the GuardedClassifier user_config, unknown "
                       "fields refused; then the model folder, prompts, calibration files, signature file and "
                       "trusted keys they name. Loads no model. Exit 0 when all hold, 2 with the first problem.")
    p.add_argument("config", metavar="FILE", help="Serve config YAML, e.g. deployments/serve-demo.yaml")
    p.add_argument("--base", help="folder relative paths resolve against (default: the current folder, as for "
                   "`serve run`)")
    add_common(p, model=False)
    p.set_defaults(func=cmd_check_config)


def register(sub) -> None:
    add_serve(sub)
    add_check_config(sub)
