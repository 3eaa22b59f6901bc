"""`lmsan train-prompt`, `lmsan import-prompt` and `lmsan classify`: a soft prompt on a frozen backbone (trained
here or with peft), and the guard run locally."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import LmsanError, settings
from ..kinds import Mode, Position, PromptMethod
from .common import add_common, add_trusted_flag, emit, progress, say, trusted_keys, writable_dir


def cmd_train_prompt(args: argparse.Namespace) -> int:
    from ..backbone import load_backbone
    from ..data import load_examples
    from ..prompts import PromptConfig, train_prompt

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
    out = writable_dir(args.out, "output folder")
    train = load_examples(args.train)
    dev = load_examples(args.eval) if args.eval else None
    if len({e.label for e in train}) < 2:
        raise LmsanError(f"{args.train}: training data needs at least two labels")
    backbone = load_backbone(args.model, args.device)
    say(args, f"training a {config.method} prompt ({config.length} slots) on {len(train)} examples")
    model = train_prompt(backbone, config, train, dev, progress=progress(args))
    model.save(out)
    training = model.manifest["training"]
    acc = training["dev_accuracy"]
    human = f"wrote {out}: {training['steps']} steps in {training['seconds']} s" + (
        f", dev accuracy {acc:.3f}" if acc is not None else ""
    )
    emit(args, human, {"out": str(out), "labels": model.labels, **training})
    return 0


def cmd_import_prompt(args: argparse.Namespace) -> int:
    from ..backbone import load_backbone
    from ..prompts.peft_import import import_peft_prompt, read_peft_adapter

    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    out = writable_dir(args.out, "output folder")
    adapter = read_peft_adapter(args.peft_dir)  # a bad adapter folder fails before the encoder loads
    backbone = load_backbone(args.model, args.device)
    model = import_peft_prompt(args.peft_dir, backbone, out, labels, allow_other_base=args.allow_other_base)
    human = (f"wrote {out}: a {adapter.peft_type.value} prompt of {adapter.num_virtual_tokens} virtual tokens, "
             f"labels {','.join(model.labels)}")
    emit(args, human, {"out": str(out), "labels": model.labels, "peft_type": adapter.peft_type.value,
                       "num_virtual_tokens": adapter.num_virtual_tokens, "layout": model.config.layout.value,
                       "position": model.config.position.value})
    return 0


def load_guard(args: argparse.Namespace):
    from ..backbone import load_backbone
    from ..guard import Guard
    from ..prompts import PromptClassifier
    from ..signatures import SignatureSet

    if args.mode != "off" and not args.signatures:
        raise LmsanError(f"--signatures is required in mode {args.mode!r}")
    if args.signatures and not Path(args.signatures).is_file():
        raise LmsanError(f"signature file not found: {args.signatures}")
    if not Path(args.prompt).is_dir():
        raise LmsanError(f"prompt folder not found: {args.prompt}")
    trusted = trusted_keys(args)
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
    from ..data import load_examples, text_pairs

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
    guard = load_guard(args)
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


def add_train_prompt(sub) -> None:
    p = sub.add_parser("train-prompt", help="train a soft prompt and head on a frozen backbone",
                       description="Writes DIR/prompt.safetensors and DIR/manifest.json.")
    add_common(p)
    p.add_argument("--train", required=True, help="JSONL with text, [text_pair,] label")
    p.add_argument("--eval", help="JSONL for dev accuracy (the best checkpoint is kept)")
    p.add_argument("--out", required=True)
    p.add_argument("--method", choices=PromptMethod.values(), default=PromptMethod.PREFIX.value,
                   help="prefix = deep prompt at every layer (default), prompt = input only")
    p.add_argument("--length", type=int, default=16, help="prompt slots (default 16)")
    p.add_argument("--position", choices=[Position.CLS.value, Position.MASK.value], default="cls",
                   help="what the head reads")
    p.add_argument("--template", help="cloze template with {text} and {mask} (position mask)")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_prompt)


def add_import_prompt(sub) -> None:
    p = sub.add_parser("import-prompt", help="import a soft prompt trained with peft as a prompt folder",
                       description="Reads a peft SEQ_CLS prompt-tuning adapter (adapter_config.json + "
                       "adapter_model.safetensors), checks it against the backbone and writes a prompt folder "
                       "that gives peft's predictions (layout over_cls, head on the pooler; see docs/cli.md).")
    add_common(p)
    p.add_argument("peft_dir", metavar="PEFT_DIR", help="folder written by peft's save_pretrained")
    p.add_argument("--out", required=True, help="prompt folder to write")
    p.add_argument("--labels", help="comma-separated class names, in the classifier's order (default 0,1,...)")
    p.add_argument("--allow-other-base", action="store_true",
                   help="accept an adapter whose recorded base model has another name than --model")
    p.set_defaults(func=cmd_import_prompt)


def add_classify(sub) -> None:
    p = sub.add_parser("classify", help="guarded classification, locally (no server)",
                       description="Classify TEXT arguments or --input FILE.jsonl through the guard.")
    add_common(p)
    p.add_argument("texts", nargs="*", metavar="TEXT")
    p.add_argument("--input", help="JSONL with text (and optional text_pair)")
    p.add_argument("--prompt", required=True, help="prompt folder from train-prompt")
    p.add_argument("--signatures", help="signature file (SIG.safetensors)")
    p.add_argument("--mode", choices=Mode.values(), default=Mode.ENFORCE.value)
    p.add_argument("--threshold", type=float, help="override every PV's threshold")
    p.add_argument("--allow-fingerprint-mismatch", action="store_true",
                   help="use signatures made for other weights (not recommended)")
    add_trusted_flag(p)
    p.set_defaults(func=cmd_classify)


def register(sub) -> None:
    add_train_prompt(sub)
    add_import_prompt(sub)
    add_classify(sub)
