"""`lmsan inspect`, `lmsan keygen`, `lmsan sign`: read, and vouch for, signature files."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_common, add_trusted_flag, emit, trusted_keys


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..signatures import SignatureSet

    sig = SignatureSet.load(args.signatures, trusted_keys=trusted_keys(args))
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
        f"  positions    {', '.join(sig.positions)}   metric {meta.metric}   default threshold {meta.threshold}",
        f"  created      {meta.created} by lmsan {meta.tool_version}",
        f"  signed by    {signed}",
        f"  PVs          {len(sig)}",
    ]
    thresholds = sig.thresholds()
    for i, rec in enumerate(meta.pvs):
        extra = ", ".join(f"{k}={v:.3f}" for k, v in rec.scores.items())
        fpr = f" fpr={rec.false_positive_rate:.4f}" if rec.false_positive_rate is not None else ""
        lines.append(
            f"    [{i}] {rec.origin:7s} at {sig.pv_positions[i]:6s} trigger={rec.trigger or '-':6s} "
            f"seed={rec.seed if rec.seed is not None else '-'}"
            f" threshold={float(thresholds[i]):.3f}{fpr} {extra}"
        )
    emit(args, "\n".join(lines), sig.describe())
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from ..signing import generate_keypair

    private, public = Path(args.out + ".key"), Path(args.out + ".pub")
    kid = generate_keypair(private, public)
    emit(args, f"wrote {private} (private key: keep it secret) and {public} (key id {kid})",
          {"private_key": str(private), "public_key": str(public), "key_id": kid})
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from ..signatures import SignatureSet
    from ..signing import load_private_key

    key = load_private_key(args.key)
    sig = SignatureSet.load(args.signatures)  # validates (checksum included): never vouch for a broken file
    out = sig.save(args.out or args.signatures, sign_key=key)
    emit(args, f"signed {args.signatures} with key {sig.signed_by} -> {out}",
          {"signatures": str(args.signatures), "out": str(out), "key_id": sig.signed_by})
    return 0


def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="print a signature file", description="Validate and print a signature file.")
    p.add_argument("signatures", help="SIG.safetensors")
    add_trusted_flag(p)
    add_common(p, model=False)
    p.set_defaults(func=cmd_inspect)


def add_keygen(sub) -> None:
    p = sub.add_parser("keygen", help="create an Ed25519 key pair for signing signature files",
                       description="Write PREFIX.key (private, mode 0600) and PREFIX.pub (public). "
                       "Existing files are never overwritten.")
    p.add_argument("--out", required=True, metavar="PREFIX", help="path prefix of the two key files")
    add_common(p, model=False)
    p.set_defaults(func=cmd_keygen)


def add_sign(sub) -> None:
    p = sub.add_parser("sign", help="sign an existing signature file",
                       description="Validate SIG.safetensors and write it signed with an Ed25519 private key "
                       "(in place unless --out).")
    p.add_argument("signatures", help="SIG.safetensors")
    p.add_argument("--key", required=True, metavar="KEY.pem", help="private key from `lmsan keygen`")
    p.add_argument("--out", help="write the signed file here instead of replacing SIG")
    add_common(p, model=False)
    p.set_defaults(func=cmd_sign)


def register(sub) -> None:
    add_inspect(sub)
    add_keygen(sub)
    add_sign(sub)
