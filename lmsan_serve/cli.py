"""`lmsan`: the command line. Every subcommand has --help; bad input gives one line and exit 2."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .data import comma_list
from .errors import LmsanError, settings

EXIT_USAGE = 2


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _say(args: argparse.Namespace, msg: str) -> None:
    """Human progress lines go to stderr so that --json output on stdout stays machine-readable."""
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def _emit(args: argparse.Namespace, human: str, data: dict) -> None:
    if args.json:
        print(json.dumps(data))
    else:
        print(human)


def _progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False)


def _writable_dir(path: str, what: str) -> Path:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise LmsanError(f"{what} {p} exists and is not a folder")
    parent = p if p.exists() else p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LmsanError(f"{what} {p} cannot be created: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise LmsanError(f"{what} {p} is not writable")
    return p


def _trusted_keys(args: argparse.Namespace) -> list | None:
    """The --trusted-key public keys, loaded up front so that a bad key fails before any slow work."""
    from .signing import load_public_keys

    return load_public_keys(args.trusted_key) if getattr(args, "trusted_key", None) else None


# -- attack --------------------------------------------------------------------------------------
def cmd_attack(args: argparse.Namespace) -> int:
    from .attacks import DEFAULT_TRIGGERS, AttackConfig, plant_backdoor, save_attacked
    from .backbone import load_backbone
    from .data import load_corpus

    config = settings(
        AttackConfig,
        "attack",
        kind=args.kind,
        triggers=args.triggers.split(",") if args.triggers else list(DEFAULT_TRIGGERS),
        pooler=args.pooler,
        clean=args.clean,
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
        **({"target_agreement": args.target_agreement} if args.target_agreement else {}),
    )
    out = _writable_dir(args.out, "output folder")
    corpus = load_corpus(args.corpus)
    backbone = load_backbone(args.model, args.device)
    why = backbone.supports_position(config.position)
    if why:
        raise LmsanError(why)
    _say(args, f"planting a {config.kind} backdoor{' (clean control)' if config.clean else ''} into {args.model}")
    started = time.time()
    result = plant_backdoor(backbone, config, corpus, progress=_progress(args))
    summary = save_attacked(result, backbone, str(out))
    held = summary["heldout"]
    summary["seconds"] = round(time.time() - started, 1)
    human = (
        f"wrote {out} after {result.steps} steps ({summary['seconds']} s): "
        + (
            "clean control"
            if config.clean
            else f"held-out sign agreement with PVs min {held['min_agreement']:.3f}"
        )
        + f", clean cosine to original {held['clean_cosine']:.3f}"
    )
    _emit(args, human, {"out": str(out), **summary})
    return 0


# -- train-prompt --------------------------------------------------------------------------------
def cmd_train_prompt(args: argparse.Namespace) -> int:
    from .backbone import load_backbone
    from .data import load_examples
    from .prompts import PromptConfig, train_prompt

    config = settings(
        PromptConfig,
        "prompt",
        method=args.method,
        length=args.length,
        position=args.position,
        template=args.template,
        epochs=args.epochs,
        max_steps=args.max_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    out = _writable_dir(args.out, "output folder")
    train = load_examples(args.train)
    dev = load_examples(args.eval) if args.eval else None
    if len({e.label for e in train}) < 2:
        raise LmsanError(f"{args.train}: training data needs at least two labels")
    backbone = load_backbone(args.model, args.device)
    _say(args, f"training a {config.method} prompt ({config.length} slots) on {len(train)} examples")
    model = train_prompt(backbone, config, train, dev, progress=_progress(args))
    model.save(out)
    training = model.manifest["training"]
    acc = training["dev_accuracy"]
    human = f"wrote {out}: {training['steps']} steps in {training['seconds']} s" + (
        f", dev accuracy {acc:.3f}" if acc is not None else ""
    )
    _emit(args, human, {"out": str(out), "labels": model.labels, **training})
    return 0


# -- mine ----------------------------------------------------------------------------------------
def cmd_mine(args: argparse.Namespace) -> int:
    from .backbone import load_backbone
    from .data import load_corpus
    from .mining import MiningConfig, mine

    config = settings(
        MiningConfig,
        "mining",
        mode=args.mode,
        position=args.position,
        max_rounds=args.max_rounds,
        time_budget=args.time_budget,
        lines=args.lines,
        first_seed=args.first_seed,
        wave=args.wave,
        split_rows=args.split_rows,
        **({"lr": args.lr} if args.lr else {}),
    )
    if args.workers < 1:
        raise LmsanError("--workers must be at least 1")
    out = Path(args.out)
    if out.exists() and out.is_dir():
        raise LmsanError(f"--out {out} is a folder; give a file name such as sig.safetensors")
    if not out.parent.is_dir():
        raise LmsanError(f"output folder does not exist: {out.parent}")
    if not os.access(out.parent, os.W_OK):
        raise LmsanError(f"output folder is not writable: {out.parent}")
    sign_key = None
    if args.sign_key:
        from .signing import load_private_key

        sign_key = load_private_key(args.sign_key)  # now, not after hours of mining
    corpus = load_corpus(args.corpus)
    backbone = load_backbone(args.model, args.device)
    why = backbone.supports_position(config.position)
    if why:
        raise LmsanError(why)
    _say(args, f"mining {args.model} ({config.mode} mode, position {config.position}, up to {config.rounds} rounds)")
    result = mine(backbone, config, corpus, out, resume=args.resume, progress=_progress(args),
                  say=lambda m: _say(args, m), workers=args.workers, ray_address=args.ray_address,
                  sign_key=sign_key)
    summary = {
        "verdict": result.verdict,
        "pvs": len(result.signatures),
        "rounds": result.rounds,
        "seconds": round(result.seconds, 1),
        "out": str(out),
        "thresholds": [r.threshold for r in result.signatures.meta.pvs],
        "signed_by": result.signatures.signed_by,
    }
    human = (f"{result.verdict}: {summary['pvs']} PV(s) kept after {result.rounds} rounds "
             f"in {summary['seconds']} s -> {out}")
    _emit(args, human, summary)
    return 0


# -- inspect -------------------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    from .signatures import SignatureSet

    sig = SignatureSet.load(args.signatures, trusted_keys=_trusted_keys(args))
    meta = sig.meta
    if sig.signed_by:
        signed = f"{sig.signed_by} (verified)"
    elif sig.signature_key_id:
        signed = f"{sig.signature_key_id} (not verified: pass --trusted-key)"
    else:
        signed = "unsigned"
    lines = [
        f"signature file {args.signatures}",
        f"  verdict      {meta.verdict}",
        f"  backbone     {meta.backbone.name} ({meta.backbone.model_type}, H={meta.backbone.hidden_size}, "
        f"fingerprint {meta.backbone.fingerprint[:16]})",
        f"  position     {meta.position}   metric {meta.metric}   default threshold {meta.threshold}",
        f"  created      {meta.created} by lmsan {meta.tool_version}",
        f"  signed by    {signed}",
        f"  PVs          {len(sig)}",
    ]
    thresholds = sig.thresholds()
    for i, rec in enumerate(meta.pvs):
        extra = ", ".join(f"{k}={v:.3f}" for k, v in rec.scores.items())
        fpr = f" fpr={rec.false_positive_rate:.4f}" if rec.false_positive_rate is not None else ""
        lines.append(
            f"    [{i}] {rec.origin:7s} trigger={rec.trigger or '-':6s} "
            f"seed={rec.seed if rec.seed is not None else '-'}"
            f" threshold={float(thresholds[i]):.3f}{fpr} {extra}"
        )
    _emit(args, "\n".join(lines), sig.describe())
    return 0


# -- keygen / sign ---------------------------------------------------------------------------------
def cmd_keygen(args: argparse.Namespace) -> int:
    from .signing import generate_keypair

    private, public = Path(args.out + ".key"), Path(args.out + ".pub")
    kid = generate_keypair(private, public)
    _emit(args, f"wrote {private} (private key: keep it secret) and {public} (key id {kid})",
          {"private_key": str(private), "public_key": str(public), "key_id": kid})
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from .signatures import SignatureSet
    from .signing import load_private_key

    key = load_private_key(args.key)
    sig = SignatureSet.load(args.signatures)  # validates (checksum included): never vouch for a broken file
    out = sig.save(args.out or args.signatures, sign_key=key)
    _emit(args, f"signed {args.signatures} with key {sig.signed_by} -> {out}",
          {"signatures": str(args.signatures), "out": str(out), "key_id": sig.signed_by})
    return 0


# -- classify ------------------------------------------------------------------------------------
def _load_guard(args: argparse.Namespace):
    from .backbone import load_backbone
    from .guard import Guard
    from .prompts import PromptClassifier
    from .signatures import SignatureSet

    if args.mode != "off" and not args.signatures:
        raise LmsanError(f"--signatures is required in mode {args.mode!r}")
    if args.signatures and not Path(args.signatures).is_file():
        raise LmsanError(f"signature file not found: {args.signatures}")
    if not Path(args.prompt).is_dir():
        raise LmsanError(f"prompt folder not found: {args.prompt}")
    trusted = _trusted_keys(args)
    backbone = load_backbone(args.model, args.device)
    classifier = PromptClassifier.load(args.prompt, backbone)
    sig = None
    if args.signatures:
        sig = SignatureSet.load(
            args.signatures,
            hidden_size=backbone.hidden_size,
            fingerprint=backbone.fingerprint,
            allow_fingerprint_mismatch=args.allow_fingerprint_mismatch,
            trusted_keys=trusted,
        )
    return Guard(backbone, classifier, sig, mode=args.mode, threshold=args.threshold)


def cmd_classify(args: argparse.Namespace) -> int:
    from .data import load_examples, text_pairs

    if bool(args.texts) == bool(args.input):
        raise LmsanError("give either TEXT arguments or --input FILE.jsonl, not both or neither")
    if args.input:
        examples = load_examples(args.input, require_label=False)
        texts = [e.text for e in examples]
        pairs = text_pairs(examples)
    else:
        if any(not t.strip() for t in args.texts):
            raise LmsanError("empty input text")
        texts, pairs = list(args.texts), None
    guard = _load_guard(args)
    for i in range(0, len(texts), 64):
        chunk_pairs = pairs[i : i + 64] if pairs else None
        for text, res in zip(texts[i : i + 64], guard.classify(texts[i : i + 64], chunk_pairs), strict=True):
            if args.json:
                print(json.dumps(res.to_dict()), flush=True)
                continue
            v = res.guard
            line = f"{res.label or '(blocked)':12s} {v.action:8s}"
            if v.flagged:
                line += f" {v.signature} match={v.match:.3f}"
                if v.removed:
                    line += f" removed={','.join(v.removed)}"
                if v.reason:
                    line += f" ({v.reason})"
            print(f"{line}  | {text[:80]}", flush=True)
    return 0


# -- eval ----------------------------------------------------------------------------------------
def _key_values(pairs: list[str] | None, flag: str) -> dict:
    """`KEY=VALUE` flags as a dict; a VALUE that reads as JSON (number, true, null) is taken as such."""
    out: dict = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise LmsanError(f"{flag} takes KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def _eval_zoo(args: argparse.Namespace) -> int:
    from .zoo import ATTACKS, ZOO_WORDS, finished_rows, plan_zoo, run_zoo, summarize, write_detection_report

    if args.zoo < 1:
        raise LmsanError("--zoo must be at least 1")
    removal_only = [f for f, v in (("--prompt", args.prompt), ("--signatures", args.signatures),
                                   ("--data", args.data)) if v]
    if removal_only:
        raise LmsanError(f"{', '.join(removal_only)} belong to the removal report, not to --zoo")
    attacks = comma_list(args.attacks)
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        what = f"unknown attack(s) {', '.join(unknown)}" if unknown else "--attacks names no attack"
        raise LmsanError(f"{what} (choose from {', '.join(ATTACKS)})")
    for flag, value in (("--attack-steps", args.attack_steps), ("--mine-rounds", args.mine_rounds),
                        ("--lines", args.lines)):
        if value is not None and value < 1:
            raise LmsanError(f"{flag} must be at least 1")
    words = comma_list(args.triggers) if args.triggers else list(ZOO_WORDS)
    plan = {k: v for k, v in (("clean_every", args.clean_every), ("triggers_per_model", args.triggers_per_model),
                              ("trigger_sets", args.trigger_sets)) if v is not None}  # else plan_zoo's defaults
    members = plan_zoo(args.zoo, attacks, words=words, seed=args.seed, **plan)
    attack = _key_values(args.attack_set, "--attack-set")
    mining = _key_values(args.mine_set, "--mine-set")
    if args.attack_steps is not None:
        attack["steps"] = args.attack_steps
    if args.mine_rounds is not None:
        mining["max_rounds"] = args.mine_rounds
    if args.lines is not None:
        mining["lines"] = args.lines
    for m in members:  # bad settings fail here, before any output
        m.attack_config(attack), m.mining_config(mining)
    out = _writable_dir(args.out, "output folder")
    n_clean = sum(m.clean for m in members)
    _say(args, f"detection zoo: {len(members) - n_clean} backdoored copies and {n_clean} clean control(s) of "
               f"{args.model} under {out / 'models'}")
    interrupted = False
    try:
        rows = run_zoo(args.model, members, out, attack_overrides=attack, mining_overrides=mining,
                       device=args.device, progress=_progress(args), say=lambda m: _say(args, m))
    except KeyboardInterrupt:
        # hours of work may be done: report the finished members, each kept for the resumed run
        rows = finished_rows(args.model, members, out, attack_overrides=attack, mining_overrides=mining)
        if not rows:
            raise
        interrupted = True
    summary = summarize(rows, planned=len(members))
    report = write_detection_report(rows, summary, out, args.model, "lmsan " + shlex.join(args.argv))
    if interrupted:
        print(f"lmsan eval: interrupted; partial report of {len(rows)} of {len(members)} models: {report} "
              "(the same command resumes)", file=sys.stderr)
        return 130
    t = summary["time_to_verdict"]
    fpr = summary["false_positive_rate"]
    _emit(args, f"report: {report}\ndetection accuracy {summary['accuracy']:.3f} ({summary['correct']} of "
                f"{summary['models']}), false-positive rate {'-' if fpr is None else f'{fpr:.3f}'}; time to verdict "
                f"mean {t['backdoored']['mean'] or 0:.1f} s backdoored, {t['clean']['mean'] or 0:.1f} s clean",
          {"report": str(report), **summary})
    return 0


def _bound(fpr_bound: float | None) -> str:
    return "-" if fpr_bound is None else f"{fpr_bound:.2%} (conformal bound)"


def _eval_removal(args: argparse.Namespace) -> int:
    from .removal import parse_tasks, run_removal, write_removal
    from .signatures import SignatureSet

    tasks = parse_tasks(args.removal)
    if args.prompt or args.data:
        raise LmsanError("--removal trains its own prompt per task: drop --prompt and --data")
    if not args.signatures:
        raise LmsanError("--removal needs --signatures SIG.safetensors")
    if not Path(args.signatures).is_file():
        raise LmsanError(f"signature file not found: {args.signatures}")
    if args.triggers:
        triggers = comma_list(args.triggers)
    else:  # mined PVs name no trigger; an attacked copy's truth file does
        truth = Path(args.model) / "truth.safetensors"
        named = SignatureSet.load(args.signatures).meta.pvs
        if not any(r.trigger for r in named) and truth.is_file():
            named = SignatureSet.load(truth).meta.pvs
        triggers = [r.trigger for r in named if r.trigger]
    out = _writable_dir(args.out, "output folder")
    res = run_removal(args.model, args.signatures, triggers, tasks, out, size=args.size, device=args.device,
                      seed=args.seed, serve=not args.local, calibrate=args.calibrate, progress=_progress(args),
                      say=lambda m: _say(args, m))
    report = write_removal(res, out, "lmsan " + shlex.join(args.argv))
    worst = max(res["tasks"].items(), key=lambda kv: kv[1]["asr_on"])
    _emit(args, f"report: {report}\n" + "\n".join(
        f"{t}: ASR {r['asr_off']:.3f} -> {r['asr_on']:.3f}, clean accuracy {r['cacc_off']:.3f} -> {r['cacc_on']:.3f}"
        for t, r in res["tasks"].items()) + f"\nworst task {worst[0]}: ASR with the guard {worst[1]['asr_on']:.3f}",
          res | {"report": str(report)})
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .adaptive import PAIR_ONLY, VARIANTS
    from .data import load_examples, shipped, text_pairs
    from .report import run_eval, write_report

    if args.zoo is not None:
        return _eval_zoo(args)
    if args.removal is not None:
        return _eval_removal(args)
    missing = [f for f, v in (("--prompt", args.prompt), ("--signatures", args.signatures)) if not v]
    if missing:
        raise LmsanError(f"{' and '.join(missing)} required (or --zoo N for the detection zoo)")
    variants = list(VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise LmsanError(f"unknown variant(s) {', '.join(unknown)} (choose from {', '.join(VARIANTS)}, or all)")
    if args.size < 1:
        raise LmsanError("--size must be at least 1")
    out = _writable_dir(args.out, "output folder")
    examples = load_examples(args.data or shipped("sst2/dev.jsonl"))[: args.size]
    if args.mode != "enforce":
        raise LmsanError("lmsan eval measures the guard in mode enforce (it also runs it off); drop --mode")
    if args.calibration and args.threshold is not None:
        raise LmsanError("--calibration raises the calibrated thresholds; --threshold replaces them: pick one")
    calibration = load_examples(args.calibration, require_label=False) if args.calibration else None
    guard = _load_guard(args)
    if calibration:
        done = guard.calibrate([e.text for e in calibration], text_pairs(calibration))
        _say(args, f"calibrated on {done.lines} clean inputs: they flagged {done.flag_rate_before:.3f} "
                   f"before, {done.flag_rate_after:.3f} after; {done.combinations_off} PV combinations "
                   f"switched off; unseen clean inputs flag at most {_bound(done.fpr_bound)}")
    triggers = comma_list(args.triggers) if args.triggers else \
        [r.trigger for r in guard.signatures.meta.pvs if r.trigger]
    if not triggers:
        raise LmsanError("the signature file names no triggers (mined PVs have none): pass --triggers w1,w2")
    if not all(e.text_pair for e in examples):
        variants = [v for v in variants if v not in PAIR_ONLY]
    _say(args, f"evaluating {len(examples)} inputs x {len(triggers)} triggers x {len(variants)} variants ...")
    res = run_eval(guard, examples, triggers, variants, seed=args.seed, progress=_progress(args))
    command = "lmsan " + shlex.join(args.argv)
    report = write_report(res, out, f"lmsan eval: {args.model} + {args.prompt}", command)
    plain = res["variants"].get("plain", {})
    worst = max(res["variants"].items(), key=lambda kv: kv[1]["asr_on"])
    _emit(args, f"report: {report}\nplain: ASR {plain.get('asr_off', 0):.3f} -> {plain.get('asr_on', 0):.3f}, "
                f"clean accuracy {plain.get('cacc_off', 0):.3f} -> {plain.get('cacc_on', 0):.3f}; worst variant "
                f"{worst[0]}: ASR with the guard {worst[1]['asr_on']:.3f}",
          res | {"report": str(report)})
    return 0


# -- demo ----------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    summary = run_demo(args.out, device=args.device, eval_size=args.eval_size, progress=_progress(args),
                       say=lambda m: _say(args, m), guard_with=args.guard_with, search_rounds=args.search_rounds,
                       keep_serving=args.keep_serving, port=args.port, metrics_port=args.metrics_port)
    if args.json:
        print(json.dumps(summary))
    return 0


# -- serve ---------------------------------------------------------------------------------------
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
    from .data import load_examples

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
    from .serving import parse_config
    from .serving.run import serve_until_stopped, start
    from .signatures import SignatureSet

    if args.mode != "off" and not args.signatures:
        raise LmsanError(f"--signatures is required in mode {args.mode!r}")
    if args.signatures:
        # fail fast on a bad file or key, before a cluster starts
        SignatureSet.load(args.signatures, trusted_keys=_trusted_keys(args))
    else:
        _trusted_keys(args)
    values = {
        "model": args.model, "tasks": _calibration_flags(args.calibration or [], _task_flags(args.task)),
        "signatures": args.signatures, "mode": args.mode,
        "threshold": args.threshold, "device": args.device, "watch_interval_s": args.watch_interval,
        "limits": {"max_inputs": args.max_inputs, "max_chars": args.max_chars},
        "batching": {"max_batch_size": max(args.max_batch_size, args.max_inputs),
                     "batch_wait_timeout_s": args.batch_wait_ms / 1000},
        "audit_text": args.audit_text, "allow_fingerprint_mismatch": args.allow_fingerprint_mismatch,
        "trusted_keys": args.trusted_key or [], "fail_open": args.fail_open,
    }
    config = parse_config(values)
    if args.replicas is not None and args.replicas < 1:
        raise LmsanError("--replicas must be at least 1")
    _say(args, f"starting the guarded endpoint ({len(config.tasks)} task(s), mode {config.mode}) ...")
    endpoint = start(config, host=args.host, port=args.port, metrics_port=args.metrics_port,
                     replicas=args.replicas, ray_address=args.ray_address, ready_timeout_s=args.ready_timeout)
    task = next(iter(config.tasks))
    info = {"url": endpoint.url, "metrics": endpoint.metrics_url, "docs": endpoint.url + "/docs",
            "tasks": list(config.tasks)}
    _emit(args, "\n".join([
        f"serving on {endpoint.url}  (OpenAPI: {endpoint.url}/docs)",
        f"metrics:   {endpoint.metrics_url or 'exported by the Ray cluster'}",
        f"try:       curl -s {endpoint.url}/v1/classify -H 'content-type: application/json' "
        f"-d '{{\"task\": \"{task}\", \"inputs\": [\"a gripping, funny film\"]}}'",
        "Ctrl-C stops it.",
    ]), info)
    sys.stdout.flush()
    serve_until_stopped(endpoint, lambda m: _say(args, m))
    return 0


# -- parser --------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        p.add_argument("--model", required=True, help="local folder, hub id, or 'minilm' (embedded default)")
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _trusted_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trusted-key", action="append", metavar="PUB.pem",
                   help="accept only signature files signed by this Ed25519 public key (repeat for more keys)")


def build_parser() -> argparse.ArgumentParser:
    return _parser_and_commands()[0]


def subcommands() -> list[str]:
    """The `lmsan` subcommand names, in the order `lmsan --help` lists them: what deployment files
    and scripts that run `lmsan X` can be checked against."""
    return list(_parser_and_commands()[1].choices or ())


def _parser_and_commands() -> tuple[argparse.ArgumentParser, argparse.Action]:
    """The `lmsan` parser and its subcommands action (whose `choices` map names to parsers)."""
    parser = argparse.ArgumentParser(
        prog="lmsan",
        description="Guard prompt-tuned language models against task-agnostic backdoors "
        "(LMSanitator, arXiv 2308.13904).",
    )
    parser.add_argument("--version", action="version", version=f"lmsan {__import__('lmsan_serve').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("attack", help="red-team: plant a task-agnostic backdoor into a copy of an encoder",
                       description="Write a backdoored copy of --model to --out, with truth.safetensors "
                       "(the planted PVs as a signature file) and attack.json.")
    p.add_argument("kind", choices=["por", "neuba", "btop"])
    _common(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--triggers", help="comma-separated triggers: words, or phrases of up to 4 words that fire "
                   "only whole, e.g. 'cf mn,tq' (default cf,mn,tq,qt,mm,pt)")
    p.add_argument("--corpus", help="clean text lines or JSONL (default: shipped WikiText-2)")
    p.add_argument("--steps", type=int, default=300, help="maximum optimisation steps (default 300)")
    p.add_argument("--target-agreement", type=float, help="stop once every trigger reaches this agreement")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pooler", action="store_true", help="neuba: attack the pooler output")
    p.add_argument("--clean", action="store_true", help="train identically without triggers (control model)")
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("train-prompt", help="train a soft prompt and head on a frozen backbone",
                       description="Writes DIR/prompt.safetensors and DIR/manifest.json.")
    _common(p)
    p.add_argument("--train", required=True, help="JSONL with text, [text_pair,] label")
    p.add_argument("--eval", help="JSONL for dev accuracy (the best checkpoint is kept)")
    p.add_argument("--out", required=True)
    p.add_argument("--method", choices=["prefix", "prompt"], default="prefix",
                   help="prefix = deep prompt at every layer (default), prompt = input only")
    p.add_argument("--length", type=int, default=16, help="prompt slots (default 16)")
    p.add_argument("--position", choices=["cls", "mask"], default="cls", help="what the head reads")
    p.add_argument("--template", help="cloze template with {text} and {mask} (position mask)")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_prompt)

    p = sub.add_parser("mine", help="fuzz-train soft triggers to invert PVs: verdict + signature file",
                       description="Mine the predefined vectors of --model (LMSanitator fuzz training) and write "
                       "the signature file with the verdict. A checkpoint is written beside --out after every round.")
    _common(p)
    p.add_argument("--out", required=True, help="signature file to write (SIG.safetensors)")
    p.add_argument("--mode", choices=["detect", "search"], default="detect",
                   help="detect: stop at the first PV (verdict); search: keep every unique PV")
    p.add_argument("--corpus", help="clean text lines or JSONL (default: shipped WikiText-2)")
    p.add_argument("--position", choices=["cls", "mask", "pooler"], default="cls")
    p.add_argument("--max-rounds", type=int, help="default 30 (detect) or 1000 (search)")
    p.add_argument("--time-budget", type=float, help="seconds; no new round starts after")
    p.add_argument("--lines", type=int, default=256, help="clean lines to fuzz on (default 256)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--lr", type=float, help="base learning rate (default adapts to the embedding scale)")
    p.add_argument("--no-split", dest="split_rows", action="store_false",
                   help="keep the PV of the whole soft trigger, without trying each of its rows alone")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --out")
    p.add_argument("--workers", type=int, default=1,
                   help="run rounds as N parallel Ray tasks (local Ray on 127.0.0.1 unless --ray-address)")
    p.add_argument("--ray-address", help="run rounds on an existing Ray cluster (e.g. ray://head:10001 or auto)")
    p.add_argument("--wave", type=int, default=1,
                   help="search mode: rounds started from the same found PVs (default 1: each round knows every "
                   "PV found before it; set it to at least --workers to keep workers busy); results do not "
                   "depend on --workers")
    p.add_argument("--sign-key", metavar="KEY.pem", help="sign the signature file with this Ed25519 private key")
    p.set_defaults(func=cmd_mine)

    p = sub.add_parser("inspect", help="print a signature file", description="Validate and print a signature file.")
    p.add_argument("signatures", help="SIG.safetensors")
    _trusted_flag(p)
    _common(p, model=False)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("keygen", help="create an Ed25519 key pair for signing signature files",
                       description="Write PREFIX.key (private, mode 0600) and PREFIX.pub (public). "
                       "Existing files are never overwritten.")
    p.add_argument("--out", required=True, metavar="PREFIX", help="path prefix of the two key files")
    _common(p, model=False)
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("sign", help="sign an existing signature file",
                       description="Validate SIG.safetensors and write it signed with an Ed25519 private key "
                       "(in place unless --out).")
    p.add_argument("signatures", help="SIG.safetensors")
    p.add_argument("--key", required=True, metavar="KEY.pem", help="private key from `lmsan keygen`")
    p.add_argument("--out", help="write the signed file here instead of replacing SIG")
    _common(p, model=False)
    p.set_defaults(func=cmd_sign)

    p = sub.add_parser("classify", help="guarded classification, locally (no server)",
                       description="Classify TEXT arguments or --input FILE.jsonl through the guard.")
    _common(p)
    p.add_argument("texts", nargs="*", metavar="TEXT")
    p.add_argument("--input", help="JSONL with text (and optional text_pair)")
    p.add_argument("--prompt", required=True, help="prompt folder from train-prompt")
    p.add_argument("--signatures", help="signature file (SIG.safetensors)")
    p.add_argument("--mode", choices=["enforce", "flag", "block", "off"], default="enforce")
    p.add_argument("--threshold", type=float, help="override every PV's threshold")
    p.add_argument("--allow-fingerprint-mismatch", action="store_true",
                   help="use signatures made for other weights (not recommended)")
    _trusted_flag(p)
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("eval", help="removal/adaptive evaluation, or the detection zoo: Markdown report + plots",
                       description="Removal (--prompt, --signatures): clean accuracy and attack success with the "
                       "guard off and on, for plain triggers (the paper's protocol) and every adaptive variant "
                       "(punctuation, case, repeats, several triggers, start/end, invisible and look-alike "
                       "characters, second text of a pair), next to a no-trigger noise baseline; writes "
                       "OUT/report.md, results.json, adaptive.png. Detection (--zoo N): N copies of --model, "
                       "backdoored with POR, NeuBA and BToP over trigger sets and seeds, every --clean-every-th a "
                       "clean control (the same training without triggers), each mined in detect mode; accuracy, "
                       "false-positive rate and time to verdict in OUT/detection.md, detection.png, detection.json. "
                       "Zoo models are cached in OUT/models; a rerun redoes only what is missing.")
    _common(p)
    p.add_argument("--prompt", help="removal: prompt folder from train-prompt (required without --zoo)")
    p.add_argument("--signatures", help="removal: signature file SIG.safetensors (required without --zoo)")
    p.add_argument("--data", help="labelled JSONL (default: the shipped SST-2 dev set)")
    p.add_argument("--size", type=int, default=200, help="inputs to use (default 200)")
    p.add_argument("--triggers", help="comma-separated trigger words (removal, default: those the signature file "
                   "names; --zoo: the word list trigger sets are drawn from, default 24 rare two-letter words)")
    g = p.add_argument_group("removal over several tasks")
    g.add_argument("--removal", metavar="TASKS", help="sst2, sms_spam, ag_news, rte (comma-separated) or all: "
                   "train a prompt per task on --model (cached in OUT/prompts), serve them all from one guarded "
                   "endpoint on 127.0.0.1 and measure each over HTTP; writes OUT/removal.md, removal.json, "
                   "removal.png")
    g.add_argument("--local", action="store_true", help="with --removal: a local guard instead of the endpoint")
    g.add_argument("--calibrate", type=int, default=500, metavar="N", help=(
        "with --removal: raise each task's thresholds on N clean training inputs of the task first, as a "
        "served task's `calibration` does (default 500, the most held out from prompt training; 0: off)"))
    g = p.add_argument_group("detection zoo")
    g.add_argument("--zoo", type=int, metavar="N", help="run the detection zoo of N models instead of removal")
    g.add_argument("--attacks", default="por,neuba,btop", help="attacks to cycle (default por,neuba,btop)")
    g.add_argument("--clean-every", type=int, help="every Nth model is a clean control (default 4)")
    g.add_argument("--triggers-per-model", type=int, help="triggers (one PV each) per copy (default 6)")
    g.add_argument("--trigger-sets", type=int, help="distinct trigger sets to cycle (default 3)")
    g.add_argument("--attack-steps", type=int, help="attack optimisation steps at most (default 300; clean "
                   "controls 100)")
    g.add_argument("--mine-rounds", type=int, help="detect-mode rounds at most (default 30)")
    g.add_argument("--lines", type=int, help="clean corpus lines to fuzz on (default 256)")
    g.add_argument("--attack-set", action="append", metavar="KEY=VALUE",
                   help="any other attack setting, e.g. lr=5e-3 (repeatable; see AttackConfig)")
    g.add_argument("--mine-set", action="append", metavar="KEY=VALUE",
                   help="any other mining setting, e.g. batch_size=16 (repeatable; see MiningConfig)")
    p.add_argument("--variants", default="all", help="comma-separated adaptive variants, or all (default)")
    p.add_argument("--calibration", metavar="FILE", help=(
        "clean inputs of the task (JSONL with text, optional text_pair): raise the thresholds on them first, "
        "as a served task's calibration does"))
    p.add_argument("--seed", type=int, default=0, help="random seed (--zoo: of the trigger sets and the first attack)")
    p.add_argument("--out", default="lmsan-out/eval", help="report folder (default lmsan-out/eval)")
    p.add_argument("--threshold", type=float, help="override every PV's threshold")
    p.add_argument("--allow-fingerprint-mismatch", action="store_true",
                   help="use signatures made for other weights (not recommended)")
    p.set_defaults(func=cmd_eval, mode="enforce")
    _trusted_flag(p)

    p = sub.add_parser("serve", help="run the guarded HTTP endpoint (Ray Serve) in the foreground",
                       description="Serve one backbone with one or more soft prompts over HTTP, every request "
                       "guarded by the signature file; Prometheus metrics on --metrics-port. The same app is "
                       "in deployments/serve-demo.yaml for `serve run` / `serve deploy`.")
    _common(p)
    p.add_argument("--task", action="append", required=True, metavar="NAME=PROMPT_DIR",
                   help="a task and its prompt folder (repeat for more tasks)")
    p.add_argument("--calibration", action="append", metavar="NAME=FILE", help=(
        "clean inputs of task NAME (JSONL with text, optional text_pair): its thresholds are raised on them "
        "before serving, so that at most 0.5%% of them flag (repeat per task)"))
    p.add_argument("--signatures", help="signature file (SIG.safetensors); hot-reloaded when it changes")
    p.add_argument("--mode", choices=["enforce", "flag", "block", "off"], default="enforce")
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
    p.add_argument("--audit-text", action="store_true", help="include input text in audit log lines")
    p.add_argument("--fail-open", action="store_true",
                   help="on a guard error answer unguarded (action 'unguarded', logged and counted) instead of "
                        "503; for availability-first teams")
    p.add_argument("--allow-fingerprint-mismatch", action="store_true",
                   help="use signatures made for other weights (not recommended)")
    _trusted_flag(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="the main job on the embedded default: attack, prompt-tune, guard",
                       description="Backdoor minilm with POR, prompt-tune SST-2 on it, mine its PVs, serve it on "
                       "the guarded endpoint on loopback, and measure clean accuracy and attack success over HTTP "
                       "with the guard off and on. Artifacts are cached in --out.")
    p.add_argument("--out", default="lmsan-out/demo", help="output folder (default lmsan-out/demo)")
    p.add_argument("--device", default="auto")
    p.add_argument("--eval-size", type=int, default=400, help="SST-2 dev sentences to evaluate (default 400 of 872)")
    p.add_argument("--guard-with", choices=["planted", "mined"], default="planted",
                   help="signature set to serve: the attack's planted PVs (default) or the demo's mined ones")
    p.add_argument("--search-rounds", type=int, default=4, help="search-mode mining rounds after detect (default 4)")
    p.add_argument("--keep-serving", action="store_true", help="leave the endpoint up after the table (Ctrl-C stops)")
    p.add_argument("--port", type=int, help="HTTP port (default: a free one)")
    p.add_argument("--metrics-port", type=int, help="Prometheus export port (default: a free one)")
    _common(p, model=False)
    p.set_defaults(func=cmd_demo)
    return parser, sub


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        _quiet_libraries()
        return func(args)
    except LmsanError as exc:
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())  # always one line
        print(f"lmsan {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"lmsan {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
