"""The lab's `lmsan` commands: `attack` (plant a backdoor), `eval adaptive|removal|zoo` (measure the
guard or the miner), `demo` (the main job end to end). The product CLI finds them through the
`lmsan_serve.commands` entry point and never imports this module by name."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lmsan_serve.cli.common import add_common, add_trusted_flag, emit, progress, say, writable_dir
from lmsan_serve.cli.prompts import load_guard
from lmsan_serve.data import comma_list
from lmsan_serve.errors import LmsanError, settings
from lmsan_serve.kinds import _Named

from .attacks.designs import PVDesign
from .attacks.texts import AttackText
from .demo_config import DEMO_PATIENCE, MAX_SEARCH_ROUNDS, GuardWith
from .plots import require_plotting


def cmd_attack(args: argparse.Namespace) -> int:
    from lmsan_serve.backbone import load_backbone
    from lmsan_serve.data import load_corpus

    from .attacks import DEFAULT_TRIGGERS, AttackConfig, plant_backdoor, save_attacked

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
        pv_design=args.pv_design,
        pv_seed=args.pv_seed,
        text=args.text,
        **({"target_agreement": args.target_agreement} if args.target_agreement else {}),
    )
    if args.text and args.corpus:
        raise LmsanError("--text and --corpus both name the text the attack trains on: pick one")
    out = writable_dir(args.out, "output folder")
    corpus = load_corpus(args.corpus)  # with --text, plant_backdoor trains on that text's lines instead
    backbone = load_backbone(args.model, args.device)
    why = backbone.supports_position(config.position)
    if why:
        raise LmsanError(why)
    say(args, f"planting a {config.kind} backdoor{' (clean control)' if config.clean else ''} into {args.model}")
    started = time.time()
    result = plant_backdoor(backbone, config, corpus, progress=progress(args))
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
    emit(args, human, {"out": str(out), **summary})
    return 0


def key_values(pairs: list[str] | None, flag: str) -> dict:
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


class ZooPlan(_Named):
    """Which zoo `lmsan eval zoo` plans: the committed report's, or the held-out one (zoo_plan)."""

    DEFAULT = "default"
    HELDOUT = "heldout"


# flags of one plan only: given with the other, they are refused rather than ignored
_DEFAULT_PLAN_ONLY = ("attacks", "triggers", "clean_every", "trigger_sets")
_HELDOUT_PLAN_ONLY = ("weak", "controls", "control_set")


def _zoo_overrides(args: argparse.Namespace) -> tuple[dict, dict]:
    """The attack and mining settings that the zoo flags set."""
    for flag, value in (("--attack-steps", args.attack_steps), ("--mine-rounds", args.mine_rounds),
                        ("--lines", args.lines)):
        if value is not None and value < 1:
            raise LmsanError(f"{flag} must be at least 1")
    attack = key_values(args.attack_set, "--attack-set")
    mining = key_values(args.mine_set, "--mine-set")
    if args.attack_steps is not None:
        attack["steps"] = args.attack_steps
    if args.mine_rounds is not None:
        mining["max_rounds"] = args.mine_rounds
    if args.lines is not None:
        mining["lines"] = args.lines
    return attack, mining


def cmd_eval_zoo(args: argparse.Namespace) -> int:
    from .zoo import ATTACKS, ZOO_WORDS, finished_rows, plan_zoo, run_zoo, summarize, write_detection_report

    require_plotting()
    if args.models < 1:
        raise LmsanError("the number of models must be at least 1")
    other = _HELDOUT_PLAN_ONLY if args.plan == ZooPlan.DEFAULT else _DEFAULT_PLAN_ONLY
    given = [name for name in other if getattr(args, name) is not None]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise LmsanError(f"{flag} does not apply to --plan {args.plan}")
    if args.plan == ZooPlan.HELDOUT:
        return _eval_heldout(args)
    attacks = comma_list(args.attacks) if args.attacks is not None else list(ATTACKS)
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        what = f"unknown attack(s) {', '.join(unknown)}" if unknown else "--attacks names no attack"
        raise LmsanError(f"{what} (choose from {', '.join(ATTACKS)})")
    attack, mining = _zoo_overrides(args)
    words = comma_list(args.triggers) if args.triggers else list(ZOO_WORDS)
    plan = {k: v for k, v in (("clean_every", args.clean_every), ("triggers_per_model", args.triggers_per_model),
                              ("trigger_sets", args.trigger_sets)) if v is not None}  # else plan_zoo's defaults
    members = plan_zoo(args.models, attacks, words=words, seed=args.seed, **plan)
    for m in members:  # bad settings fail here, before any output
        m.attack_config(attack), m.mining_config(mining)
    out = writable_dir(args.out, "output folder")
    n_clean = sum(m.clean for m in members)
    say(args, f"detection zoo: {len(members) - n_clean} backdoored copies and {n_clean} clean control(s) of "
               f"{args.model} under {out / 'models'}")
    rows, interrupted = _resumable(
        lambda: run_zoo(args.model, members, out, attack_overrides=attack, mining_overrides=mining,
                        device=args.device, progress=progress(args), say=lambda m: say(args, m)),
        lambda: finished_rows(args.model, members, out, attack_overrides=attack, mining_overrides=mining))
    summary = summarize(rows, planned=len(members))
    report = write_detection_report(rows, summary, out, args.model, "lmsan " + shlex.join(args.argv))
    if interrupted:
        return _interrupted(rows, members, report)
    t = summary["time_to_verdict"]
    fpr = summary["false_positive_rate"]
    emit(args, f"report: {report}\ndetection accuracy {summary['accuracy']:.3f} ({summary['correct']} of "
                f"{summary['models']}), false-positive rate {'-' if fpr is None else f'{fpr:.3f}'}; time to verdict "
                f"mean {t['backdoored']['mean'] or 0:.1f} s backdoored, {t['clean']['mean'] or 0:.1f} s clean",
          {"report": str(report), **summary})
    return 0


def _resumable(run: Callable[[], list[dict]], finished: Callable[[], list[dict]]) -> tuple[list[dict], bool]:
    """The rows of `run()`, and whether Ctrl-C cut it short: hours of work may be done, so then the
    rows of the members already finished (each kept for the resumed run), unless there are none."""
    try:
        return run(), False
    except KeyboardInterrupt:
        rows = finished()
        if not rows:
            raise
        return rows, True


def _interrupted(rows: list[dict], members: list, report) -> int:
    print(f"lmsan eval: interrupted; partial report of {len(rows)} of {len(members)} models: {report} "
          "(the same command resumes)", file=sys.stderr)
    return 130


def _eval_heldout(args: argparse.Namespace) -> int:
    """`lmsan eval zoo N --plan heldout`: N backdoored copies, weak ones and clean controls (zoo_plan)."""
    from .zoo_heldout import checked_plans, finished_heldout_rows, run_heldout
    from .zoo_heldout_report import summarize_heldout, write_heldout_report
    from .zoo_plan import DEFAULT_CONTROLS, DEFAULT_WEAK, TRIGGERS_PER_MEMBER, plan_heldout_zoo

    attack, mining = _zoo_overrides(args)
    control = key_values(args.control_set, "--control-set")
    members = plan_heldout_zoo(args.models, weak=DEFAULT_WEAK if args.weak is None else args.weak,
                               controls=DEFAULT_CONTROLS if args.controls is None else args.controls,
                               triggers=args.triggers_per_model or TRIGGERS_PER_MEMBER, seed=args.seed)
    overrides = {"attack_overrides": attack, "control_overrides": control, "mining_overrides": mining}
    checked_plans(members, **overrides)  # bad settings fail here, before any output
    out = writable_dir(args.out, "output folder")
    n_clean = sum(m.clean for m in members)
    say(args, f"held-out zoo: {len(members) - n_clean} backdoored copies ({sum(m.weak for m in members)} weak) and "
               f"{n_clean} clean control(s) of {args.model} under {out / 'models'}")
    rows, interrupted = _resumable(
        lambda: run_heldout(args.model, members, out, device=args.device, progress=progress(args),
                            say=lambda m: say(args, m), **overrides),
        lambda: finished_heldout_rows(args.model, members, out, **overrides))
    summary = summarize_heldout(rows, planned=len(members))
    report = write_heldout_report(rows, summary, out, args.model, "lmsan " + shlex.join(args.argv))
    if interrupted:
        return _interrupted(rows, members, report)
    half = summary["halves"]["report"]["all"]
    emit(args, f"report: {report}\nreport half: {half['detected']} of {half['models']} backdoored copies detected, "
               f"every PV recovered in {half['all_pvs_recovered']}, {half['false_positives']} of "
               f"{half['controls']} clean controls called backdoored", {"report": str(report), **summary})
    return 0


def _bound(fpr_bound: float | None) -> str:
    return "-" if fpr_bound is None else f"{fpr_bound:.2%} (conformal bound)"


def cmd_eval_removal(args: argparse.Namespace) -> int:
    from lmsan_serve.signatures import SignatureSet

    from .removal import parse_tasks, parse_variants, removal_prompt, run_removal, write_removal

    require_plotting()
    tasks = parse_tasks(args.tasks)
    variants = parse_variants(args.variants)
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
    out = writable_dir(args.out, "output folder")
    res = run_removal(args.model, args.signatures, triggers, tasks, out, size=args.size, device=args.device,
                      seed=args.seed, serve=not args.local, calibrate=args.calibrate, progress=progress(args),
                      prompt=removal_prompt(args.read_at), variants=variants, say=lambda m: say(args, m))
    report = write_removal(res, out, "lmsan " + shlex.join(args.argv))
    worst = max(res["tasks"].items(), key=lambda kv: kv[1]["asr_on"])
    emit(args, f"report: {report}\n" + "\n".join(
        f"{t}: ASR {r['asr_off']:.3f} -> {r['asr_on']:.3f}, clean accuracy {r['cacc_off']:.3f} -> {r['cacc_on']:.3f}"
        for t, r in res["tasks"].items()) + f"\nworst task {worst[0]}: ASR with the guard {worst[1]['asr_on']:.3f}",
          res | {"report": str(report)})
    return 0


def cmd_eval_adaptive(args: argparse.Namespace) -> int:
    from lmsan_serve.data import load_examples, shipped, text_pairs

    from .adaptive import PAIR_ONLY, VARIANTS
    from .report import run_eval, write_report

    require_plotting()
    variants = list(VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise LmsanError(f"unknown variant(s) {', '.join(unknown)} (choose from {', '.join(VARIANTS)}, or all)")
    if args.size < 1:
        raise LmsanError("--size must be at least 1")
    out = writable_dir(args.out, "output folder")
    examples = load_examples(args.data or shipped("sst2/dev.jsonl"))[: args.size]
    if args.calibration and args.threshold is not None:
        raise LmsanError("--calibration raises the calibrated thresholds; --threshold replaces them: pick one")
    calibration = load_examples(args.calibration, require_label=False) if args.calibration else None
    guard = load_guard(args)
    if calibration:
        done = guard.calibrate([e.text for e in calibration], text_pairs(calibration))
        say(args, f"calibrated on {done.lines} clean inputs: they flagged {done.flag_rate_before:.3f} "
                   f"before, {done.flag_rate_after:.3f} after; {done.combinations_off} PV combinations "
                   f"switched off; unseen clean inputs flag at most {_bound(done.fpr_bound)}; {done.activations} "
                   f"left flagged, a word in them firing a PV alone")
    triggers = comma_list(args.triggers) if args.triggers else \
        [r.trigger for r in guard.signatures.meta.pvs if r.trigger]
    if not triggers:
        raise LmsanError("the signature file names no triggers (mined PVs have none): pass --triggers w1,w2")
    if not all(e.text_pair for e in examples):
        variants = [v for v in variants if v not in PAIR_ONLY]
    say(args, f"evaluating {len(examples)} inputs x {len(triggers)} triggers x {len(variants)} variants ...")
    res = run_eval(guard, examples, triggers, variants, seed=args.seed, progress=progress(args))
    command = "lmsan " + shlex.join(args.argv)
    report = write_report(res, out, f"lmsan eval: {args.model} + {args.prompt}", command)
    plain = res["variants"].get("plain", {})
    worst = max(res["variants"].items(), key=lambda kv: kv[1]["asr_on"])
    emit(args, f"report: {report}\nplain: ASR {plain.get('asr_off', 0):.3f} -> {plain.get('asr_on', 0):.3f}, "
                f"clean accuracy {plain.get('cacc_off', 0):.3f} -> {plain.get('cacc_on', 0):.3f}; worst variant "
                f"{worst[0]}: ASR with the guard {worst[1]['asr_on']:.3f}",
          res | {"report": str(report)})
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    summary = run_demo(args.out, device=args.device, eval_size=args.eval_size, progress=progress(args),
                       say=lambda m: say(args, m), guard_with=args.guard_with, patience=args.patience,
                       max_search_rounds=args.max_search_rounds,
                       keep_serving=args.keep_serving, port=args.port, metrics_port=args.metrics_port)
    if args.json:
        print(json.dumps(summary))
    return 0


def add_attack(sub) -> None:
    p = sub.add_parser("attack", help="red-team: plant a task-agnostic backdoor into a copy of an encoder",
                       description="Write a backdoored copy of --model to --out, with truth.safetensors "
                       "(the planted PVs as a signature file) and attack.json.")
    p.add_argument("kind", choices=["por", "neuba", "btop"])
    add_common(p)
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
    p.add_argument("--pv-design", choices=PVDesign.values(), default=PVDesign.BLOCK.value,
                   help="shape of the planted PVs (default block, the reference attacks'; see docs/cli.md)")
    p.add_argument("--pv-seed", type=int, default=0, help="seed of the PV draw alone (default 0)")
    p.add_argument("--text", choices=AttackText.values(), help="train on shipped text the default miner never "
                   "reads: wikitext (the lines between its fuzzing and calibration lines), news or sms "
                   "(default: --corpus)")
    p.set_defaults(func=cmd_attack)


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="measure the guard (adaptive, removal) or the miner (zoo): Markdown report",
                       description="Experiments that measure the defense; each writes a Markdown report, its JSON "
                       "and plots (the `lab` extra) under --out.")
    kinds = p.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    kinds.required = True
    _add_eval_adaptive(kinds)
    _add_eval_removal(kinds)
    _add_eval_zoo(kinds)


def _add_eval_adaptive(kinds) -> None:
    p = kinds.add_parser("adaptive", help="one task: plain and adaptive triggers, guard off and on",
                         description="Clean accuracy and attack success with the guard off and on, for plain "
                         "triggers (the paper's protocol) and every adaptive variant (punctuation, case, repeats, "
                         "several triggers, start/end, invisible and look-alike characters, second text of a "
                         "pair), next to a no-trigger noise baseline; writes OUT/report.md, results.json, "
                         "adaptive.png.")
    add_common(p)
    p.add_argument("--prompt", required=True, help="prompt folder from train-prompt")
    p.add_argument("--signatures", required=True, help="signature file SIG.safetensors")
    p.add_argument("--data", help="labelled JSONL (default: the shipped SST-2 dev set)")
    p.add_argument("--size", type=int, default=200, help="inputs to use (default 200)")
    p.add_argument("--triggers", help="comma-separated trigger words (default: those the signature file names)")
    p.add_argument("--variants", default="all", help="comma-separated adaptive variants, or all (default)")
    p.add_argument("--calibration", metavar="FILE", help=(
        "clean inputs of the task (JSONL with text, optional text_pair): raise the thresholds on them first, "
        "as a served task's calibration does"))
    p.add_argument("--seed", type=int, default=0, help="random seed of the trigger positions")
    p.add_argument("--out", default="lmsan-out/eval", help="report folder (default lmsan-out/eval)")
    p.add_argument("--threshold", type=float, help="override every PV's threshold")
    p.add_argument("--allow-fingerprint-mismatch", action="store_true",
                   help="use signatures made for other weights (not recommended)")
    add_trusted_flag(p)
    p.set_defaults(func=cmd_eval_adaptive, mode="enforce")


def _add_eval_removal(kinds) -> None:
    p = kinds.add_parser("removal", help="several tasks over HTTP: the paper's removal experiment",
                         description="Train a prompt per task on --model (cached in OUT/prompts), serve them all "
                         "from one guarded endpoint on 127.0.0.1 and measure each over HTTP; writes OUT/removal.md, "
                         "removal.json, removal.png.")
    p.add_argument("tasks", metavar="TASKS", help="sst2, sms_spam, ag_news, rte (comma-separated) or all")
    add_common(p)
    p.add_argument("--signatures", required=True, help="signature file SIG.safetensors")
    p.add_argument("--size", type=int, default=200, help="test inputs per task (default 200)")
    p.add_argument("--triggers", help="comma-separated trigger words (default: those the signature file names, "
                   "else the model folder's truth.safetensors)")
    p.add_argument("--local", action="store_true", help="a local guard instead of the endpoint")
    p.add_argument("--calibrate", type=int, default=500, metavar="N", help=(
        "raise each task's thresholds on N clean training inputs of the task first, as a served task's "
        "`calibration` does (default 500, the most held out from prompt training; 0: off)"))
    p.add_argument("--seed", type=int, default=0, help="random seed of the trigger positions")
    p.add_argument("--read-at", choices=["cls", "pooler", "mask"], default="cls", help=(
        "the output each task's prompt reads: cls (default), pooler, or the [MASK] of a cloze template, "
        "where a BToP backdoor acts"))
    p.add_argument("--variants", help=(
        "adaptive variants measured beside the plain protocol on the same inputs, comma-separated, e.g. "
        "two_triggers,three_triggers, or all (lmsan eval adaptive lists them; default: none)"))
    p.add_argument("--out", default="lmsan-out/eval", help="report folder (default lmsan-out/eval)")
    p.set_defaults(func=cmd_eval_removal)


def _add_eval_zoo(kinds) -> None:
    p = kinds.add_parser("zoo", help="the detection zoo: N copies of --model, backdoored or clean, each mined",
                         description="N copies of --model, backdoored with POR, NeuBA and BToP over trigger sets "
                         "and seeds, every --clean-every-th a clean control (the same training without triggers), "
                         "each mined in detect mode; accuracy, false-positive rate and time to verdict in "
                         "OUT/detection.md, detection.png, detection.json. --plan heldout: N backdoored copies over "
                         "attack x PV design x trigger kind x attack text, weak copies and contrastive clean "
                         "controls, mined in search mode at every position; OUT/heldout.md, heldout.json. Models "
                         "are cached in OUT/models; a rerun redoes only what is missing.")
    p.add_argument("models", type=int, metavar="N", help="copies of --model to make and mine (--plan heldout: "
                   "backdoored copies besides the weak ones and the controls)")
    add_common(p)
    p.add_argument("--plan", choices=ZooPlan.values(), default=ZooPlan.DEFAULT.value,
                   help="default: the committed report's zoo; heldout: the zoo of docs/cli.md, lmsan eval zoo")
    p.add_argument("--weak", type=int, help="heldout: weak copies, stopped at 0.85 to 0.9 agreement (default 8)")
    p.add_argument("--controls", type=int, help="heldout: contrastive clean controls (default 6)")
    p.add_argument("--control-set", action="append", metavar="KEY=VALUE",
                   help="heldout: any clean-control setting, e.g. steps=100 (repeatable; see ControlConfig)")
    p.add_argument("--attacks", help="attacks to cycle (default por,neuba,btop)")
    p.add_argument("--triggers", help="the word list trigger sets are drawn from (default 24 rare two-letter words)")
    p.add_argument("--clean-every", type=int, help="every Nth model is a clean control (default 4)")
    p.add_argument("--triggers-per-model", type=int, help="triggers (one PV each) per copy (default 6; "
                   "heldout 4)")
    p.add_argument("--trigger-sets", type=int, help="distinct trigger sets to cycle (default 3)")
    p.add_argument("--attack-steps", type=int, help="attack optimisation steps at most (default 300; clean "
                   "controls 100)")
    p.add_argument("--mine-rounds", type=int, help="rounds at most (default 30 in detect mode; heldout: per "
                   "position, search mode's 1000)")
    p.add_argument("--lines", type=int, help="clean corpus lines to fuzz on (default 256)")
    p.add_argument("--attack-set", action="append", metavar="KEY=VALUE",
                   help="any other attack setting, e.g. lr=5e-3 (repeatable; see AttackConfig)")
    p.add_argument("--mine-set", action="append", metavar="KEY=VALUE",
                   help="any other mining setting, e.g. batch_size=16 (repeatable; see MiningConfig)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the trigger sets and the first attack")
    p.add_argument("--out", default="lmsan-out/eval", help="report folder (default lmsan-out/eval)")
    p.set_defaults(func=cmd_eval_zoo)


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded default: attack, prompt-tune, guard",
                       description="Backdoor minilm with POR, prompt-tune SST-2 on it, mine its PVs, serve it on "
                       "the guarded endpoint on loopback, and measure clean accuracy and attack success over HTTP "
                       "with the guard off and on. Artifacts are cached in --out.")
    p.add_argument("--out", default="lmsan-out/demo", help="output folder (default lmsan-out/demo)")
    p.add_argument("--device", default="auto")
    p.add_argument("--eval-size", type=int, default=400, help="SST-2 dev sentences to evaluate (default 400 of 872)")
    p.add_argument("--guard-with", choices=GuardWith.values(), default=GuardWith.MINED.value,
                   help="signature set to serve: what mining found (default), or the attack's planted PVs as a "
                   "comparison")
    p.add_argument("--patience", type=int, default=DEMO_PATIENCE,
                   help=f"search ends after this many rounds in a row without a new PV (default {DEMO_PATIENCE})")
    p.add_argument("--max-search-rounds", type=int, default=MAX_SEARCH_ROUNDS,
                   help=f"bound on the search rounds (default {MAX_SEARCH_ROUNDS}; 0 skips search)")
    p.add_argument("--keep-serving", action="store_true", help="leave the endpoint up after the table (Ctrl-C stops)")
    p.add_argument("--port", type=int, help="HTTP port (default: a free one)")
    p.add_argument("--metrics-port", type=int, help="Prometheus export port (default: a free one)")
    add_common(p, model=False)
    p.set_defaults(func=cmd_demo)


def register(sub) -> None:
    add_attack(sub)
    add_eval(sub)
    add_demo(sub)
