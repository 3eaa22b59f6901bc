"""Ed25519 signatures on signature files, so that a deployment can load only files from its own mining pipeline.

What is signed is the exact text of the file's `lmsan` metadata entry. That text holds `tensor_sha256`,
and loading checks the PVs against it, so one signature covers the metadata and the PVs alike. The
signature sits in a second metadata entry, `lmsan_signature`: JSON `{"alg": "ed25519", "key_id": ..., "sig": ...}`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import LmsanError

ALGORITHM = "ed25519"
SIGNATURE_ENTRY = "lmsan_signature"
# A fixed prefix on the signed bytes: a signature made by this key for anything else (another tool,
# a future format) can never pass as a signature on a signature file, and the other way round.
_CONTEXT = b"lmsan signature file v1\n"
_KEY_ID = re.compile(r"[0-9a-f]{16}")


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable name for a key: the first 16 hex digits of sha256 over its raw 32 bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(private_path: str | os.PathLike, public_path: str | os.PathLike) -> str:
    """Write a new Ed25519 key pair as PEM (private: PKCS8, unencrypted, mode 0600); return its key id."""
    priv, pub = Path(private_path), Path(public_path)
    for p in (priv, pub):
        if p.exists():
            raise LmsanError(f"{p} already exists; refusing to overwrite a key")
        if not p.parent.is_dir():
            raise LmsanError(f"cannot write {p}: folder does not exist ({p.parent})")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        # O_EXCL: a file created between the check above and now is still not overwritten;
        # the mode is set at creation, so the private key is never readable by others, not even briefly
        fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private_pem)
        os.chmod(priv, 0o600)  # the umask may have narrowed it further; never wider than this
        try:
            fd = os.open(pub, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(public_pem)
        except OSError:
            priv.unlink(missing_ok=True)  # half a key pair is useless and confusing
            raise
    except FileExistsError as exc:
        raise LmsanError(f"{exc.filename} already exists; refusing to overwrite a key") from exc
    except OSError as exc:
        raise LmsanError(f"cannot write key {exc.filename or priv}: {exc.strerror or exc}") from exc
    return key_id(key.public_key())


def _read_pem(path: str | os.PathLike, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise LmsanError(f"{what} not found: {p}")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise LmsanError(f"{what} {p} is unreadable: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data:
        raise LmsanError(f"{what} {p} is not a PEM file")
    return data


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """Read an unencrypted PEM Ed25519 private key (as written by `generate_keypair`)."""
    data = _read_pem(path, "private key")
    if b"PUBLIC KEY-----" in data:
        raise LmsanError(f"{path} is a public key; signing needs the private key (.key)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # cryptography's way of saying "encrypted, and no password given"
        raise LmsanError(f"private key {path} is encrypted; lmsan reads unencrypted keys only") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise LmsanError(f"private key {path} is not a valid PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise LmsanError(f"private key {path} is not an Ed25519 key ({type(key).__name__.removeprefix('_')})")
    return key


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    """Read a PEM Ed25519 public key (SubjectPublicKeyInfo, as written by `generate_keypair`)."""
    data = _read_pem(path, "public key")
    if b"PRIVATE KEY-----" in data:
        # never accept (and so never spread around) a private key where a public one is expected
        raise LmsanError(f"{path} is a private key; give the public key (.pub)")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise LmsanError(f"public key {path} is not a valid PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise LmsanError(f"public key {path} is not an Ed25519 key ({type(key).__name__.removeprefix('_')})")
    return key


def load_public_keys(paths: Iterable[str | os.PathLike]) -> list[Ed25519PublicKey]:
    return [load_public_key(p) for p in paths]


def sign_metadata(meta_json: str, private_key: Ed25519PrivateKey) -> str:
    """The `lmsan_signature` entry for the exact metadata text `meta_json`."""
    sig = private_key.sign(_CONTEXT + meta_json.encode("utf-8"))
    return json.dumps({"alg": ALGORITHM, "key_id": key_id(private_key.public_key()),
                       "sig": base64.b64encode(sig).decode("ascii")})


def claimed_key_id(entry: str | None) -> str | None:
    """The key id a signature entry names, unverified (for display); None if absent or malformed."""
    try:
        return _parse_entry(entry, "")[0]
    except LmsanError:
        return None


def _parse_entry(entry: str | None, where: str) -> tuple[str, bytes]:
    if entry is None:
        raise LmsanError(f"{where}unsigned, and only files signed by a trusted key are accepted")
    try:
        data = json.loads(entry)
        kid, alg, sig = data["key_id"], data["alg"], base64.b64decode(data["sig"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise LmsanError(f"{where}malformed signature entry '{SIGNATURE_ENTRY}'") from exc
    if alg != ALGORITHM:
        raise LmsanError(f"{where}signature algorithm {alg!r} is not supported (only {ALGORITHM})")
    if not isinstance(kid, str) or not _KEY_ID.fullmatch(kid):
        raise LmsanError(f"{where}malformed signature entry '{SIGNATURE_ENTRY}'")
    return kid, sig


def verify_metadata(meta_json: str, entry: str | None, trusted: list[Ed25519PublicKey], where: str = "") -> str:
    """Check `entry` against the exact metadata text and the trusted keys; return the signer's key id.

    `where` prefixes error messages (e.g. the file name and ': ')."""
    kid, sig = _parse_entry(entry, where)
    by_id = {key_id(k): k for k in trusted}
    key = by_id.get(kid)
    if key is None:
        raise LmsanError(f"{where}signed by unknown key {kid}; trusted: {', '.join(sorted(by_id)) or 'none'}")
    try:
        key.verify(sig, _CONTEXT + meta_json.encode("utf-8"))
    except InvalidSignature as exc:
        raise LmsanError(f"{where}signature does not verify: the file was modified after signing") from exc
    return kid
