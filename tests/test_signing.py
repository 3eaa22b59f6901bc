"""Signed signature files: Ed25519 keys, signing and verification on load, the CLI commands, and the
service refusing (and surviving) unsigned or tampered files when trusted keys are configured."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmsan_serve.errors import LmsanError
from lmsan_serve.serving import GuardService, parse_config
from lmsan_serve.signatures import PVRecord, SignatureSet
from lmsan_serve.signing import (
    SIGNATURE_ENTRY,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
)

from .test_cli import assert_error, run

FINGERPRINT = "ab" * 32
HIDDEN = 16


def _make(pvs: torch.Tensor | None = None, fingerprint: str = FINGERPRINT, position: str = "cls") -> SignatureSet:
    if pvs is None:
        pvs = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(5))
    records = [PVRecord(origin="planted", trigger=f"t{i}", threshold=0.9) for i in range(pvs.shape[0])]
    return SignatureSet.create(pvs, records, backbone_name="tiny", fingerprint=fingerprint, model_type="bert",
                               position=position, verdict="backdoored")


@pytest.fixture()
def keys(tmp_path) -> dict:
    """Two key pairs: `a` (trusted) and `b` (someone else's)."""
    out = {}
    for name in ("a", "b"):
        priv, pub = tmp_path / f"{name}.key", tmp_path / f"{name}.pub"
        generate_keypair(priv, pub)
        out[name] = {"key": priv, "pub": pub, "private": load_private_key(priv), "public": load_public_key(pub)}
    return out


def _entries(path: Path) -> tuple[torch.Tensor, dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("pvs").clone(), dict(f.metadata())


def _refused(path: Path, fragment: str, **kw) -> str:
    with pytest.raises(LmsanError) as info:
        SignatureSet.load(path, **kw)
    msg = str(info.value)
    assert fragment in msg, msg
    assert "\n" not in msg
    return msg


# -- keys ----------------------------------------------------------------------------------------
def test_keygen_writes_pem_with_private_mode_0600_and_never_overwrites(tmp_path):
    priv, pub = tmp_path / "k.key", tmp_path / "k.pub"
    kid = generate_keypair(priv, pub)
    assert priv.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert kid == key_id(load_public_key(pub)) == key_id(load_private_key(priv).public_key())
    assert len(kid) == 16 and int(kid, 16) >= 0
    before = priv.read_bytes()
    with pytest.raises(LmsanError, match="already exists"):
        generate_keypair(priv, tmp_path / "other.pub")
    assert priv.read_bytes() == before and not (tmp_path / "other.pub").exists()


def test_bad_key_files_give_clear_errors(tmp_path, keys):
    with pytest.raises(LmsanError, match="not found"):
        load_public_key(tmp_path / "missing.pub")
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(LmsanError, match="not a PEM file"):
        load_private_key(junk)
    with pytest.raises(LmsanError, match="is a private key"):
        load_public_key(keys["a"]["key"])
    with pytest.raises(LmsanError, match="is a public key"):
        load_private_key(keys["a"]["pub"])
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ecdsa = ec.generate_private_key(ec.SECP256R1())
    ec_pub = tmp_path / "ec.pub"
    ec_pub.write_bytes(ecdsa.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(LmsanError, match="not an Ed25519 key"):
        load_public_key(ec_pub)
    broken = tmp_path / "broken.pub"
    broken.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(LmsanError, match="not a valid PEM public key"):
        load_public_key(broken)


# -- signing and verification --------------------------------------------------------------------
def test_sign_and_verify_round_trip(tmp_path, keys):
    sig = _make()
    path = sig.save(tmp_path / "sig.safetensors", sign_key=keys["a"]["private"])
    kid = key_id(keys["a"]["public"])
    assert sig.signed_by == kid
    entry = json.loads(_entries(path)[1][SIGNATURE_ENTRY])
    assert entry["alg"] == "ed25519" and entry["key_id"] == kid
    loaded = SignatureSet.load(path, trusted_keys=[keys["b"]["public"], keys["a"]["public"]])
    assert loaded.signed_by == kid and loaded.describe()["signed_by"] == kid
    assert torch.equal(loaded.pvs, sig.pvs) and loaded.meta == sig.meta
    # without trusted keys nothing is verified, but the claimed signer is still visible
    plain = SignatureSet.load(path)
    assert plain.signed_by is None and plain.signature_key_id == kid
    assert plain.describe()["signed_by"] is None


def test_unsigned_file_refused_when_keys_required(tmp_path, keys):
    path = _make().save(tmp_path / "sig.safetensors")
    assert SignatureSet.load(path).signed_by is None  # still fine without keys
    assert SignatureSet.load(path, trusted_keys=[]).signed_by is None  # an empty list requires nothing
    _refused(path, "unsigned", trusted_keys=[keys["a"]["public"]])


def test_wrong_key_refused(tmp_path, keys):
    path = _make().save(tmp_path / "sig.safetensors", sign_key=keys["b"]["private"])
    msg = _refused(path, f"signed by unknown key {key_id(keys['b']['public'])}", trusted_keys=[keys["a"]["public"]])
    assert key_id(keys["a"]["public"]) in msg  # says which keys it would have accepted


def test_tampered_metadata_refused(tmp_path, keys):
    path = _make().save(tmp_path / "sig.safetensors", sign_key=keys["a"]["private"])
    pvs, meta = _entries(path)
    data = json.loads(meta["lmsan"])
    data["threshold"] = 0.99  # a looser guard, still a perfectly valid file apart from the signature
    data["pvs"][0]["threshold"] = 0.99
    save_file({"pvs": pvs}, str(path), metadata={"lmsan": json.dumps(data), SIGNATURE_ENTRY: meta[SIGNATURE_ENTRY]})
    assert SignatureSet.load(path).meta.threshold == 0.99  # loads when signatures are not required
    _refused(path, "signature does not verify: the file was modified", trusted_keys=[keys["a"]["public"]])


def test_tampered_pvs_refused(tmp_path, keys):
    path = _make().save(tmp_path / "sig.safetensors", sign_key=keys["a"]["private"])
    pvs, meta = _entries(path)
    save_file({"pvs": pvs * -1}, str(path), metadata=meta)  # metadata and signature untouched
    # the signature still matches the metadata; the checksum in it catches the new PVs
    _refused(path, "PV checksum mismatch", trusted_keys=[keys["a"]["public"]])
    # ... and an attacker who also fixes the checksum breaks the signature instead
    data = json.loads(meta["lmsan"])
    data["tensor_sha256"] = hashlib.sha256((pvs * -1).contiguous().numpy().tobytes()).hexdigest()
    forged = {"lmsan": json.dumps(data), SIGNATURE_ENTRY: meta[SIGNATURE_ENTRY]}
    save_file({"pvs": pvs * -1}, str(path), metadata=forged)
    SignatureSet.load(path)  # self-consistent, so only the signature can tell
    _refused(path, "signature does not verify", trusted_keys=[keys["a"]["public"]])


def test_verification_precedes_metadata_validation(tmp_path, keys):
    """An unsigned file with invalid metadata is refused as unsigned: nothing in it is looked at."""
    path = tmp_path / "bad.safetensors"
    save_file({"pvs": torch.zeros(1, HIDDEN)}, str(path), metadata={"lmsan": "{not json"})
    _refused(path, "unsigned", trusted_keys=[keys["a"]["public"]])
    pvs, meta = _entries(_make().save(tmp_path / "ok.safetensors", sign_key=keys["a"]["private"]))
    for bad in ("not json", json.dumps({"alg": "rsa", "key_id": "0" * 16, "sig": ""}),
                json.dumps({"alg": "ed25519", "key_id": "x" * 500, "sig": "AA=="})):
        save_file({"pvs": pvs}, str(path), metadata={"lmsan": meta["lmsan"], SIGNATURE_ENTRY: bad})
        msg = _refused(path, "signature", trusted_keys=[keys["a"]["public"]])
        assert len(msg) < 300


def test_resigning_replaces_the_signature(tmp_path, keys):
    sig = _make()
    path = sig.save(tmp_path / "sig.safetensors", sign_key=keys["a"]["private"])
    loaded = SignatureSet.load(path)
    loaded.save(path, sign_key=keys["b"]["private"])
    assert SignatureSet.load(path, trusted_keys=[keys["b"]["public"]]).signed_by == key_id(keys["b"]["public"])
    _refused(path, "unknown key", trusted_keys=[keys["a"]["public"]])
    loaded.save(path)  # saving without a key drops the signature: an edited file is an unsigned file
    _refused(path, "unsigned", trusted_keys=[keys["b"]["public"]])


# -- CLI -----------------------------------------------------------------------------------------
def test_cli_keygen_sign_inspect(tmp_path, capsys):
    prefix = tmp_path / "ci"
    rc, out, _ = run(capsys, "keygen", "--out", prefix, "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["private_key"] == f"{prefix}.key" and info["public_key"] == f"{prefix}.pub"
    assert stat.S_IMODE(Path(info["private_key"]).stat().st_mode) == 0o600
    assert_error(capsys, "keygen", "already exists", "--out", prefix)
    run(capsys, "keygen", "--out", tmp_path / "other")

    sig = _make().save(tmp_path / "sig.safetensors")
    rc, out, _ = run(capsys, "inspect", sig)
    assert rc == 0 and "signed by    unsigned" in out
    assert_error(capsys, "inspect", "unsigned", sig, "--trusted-key", f"{prefix}.pub")

    signed = tmp_path / "signed.safetensors"
    rc, out, _ = run(capsys, "sign", sig, "--key", f"{prefix}.key", "--out", signed, "--json")
    assert rc == 0 and json.loads(out)["key_id"] == info["key_id"]
    assert SignatureSet.load(sig).signed_by is None  # --out leaves the original alone
    rc, out, _ = run(capsys, "inspect", signed, "--trusted-key", tmp_path / "other.pub",
                     "--trusted-key", f"{prefix}.pub")
    assert rc == 0 and f"signed by    {info['key_id']} (verified)" in out
    rc, out, _ = run(capsys, "inspect", signed)
    assert rc == 0 and "not verified" in out
    rc, out, _ = run(capsys, "inspect", signed, "--trusted-key", f"{prefix}.pub", "--json")
    assert rc == 0 and json.loads(out)["signed_by"] == info["key_id"]
    assert_error(capsys, "inspect", "signed by unknown key", signed, "--trusted-key", tmp_path / "other.pub")

    rc, out, _ = run(capsys, "sign", sig, "--key", f"{prefix}.key")  # in place
    assert rc == 0 and SignatureSet.load(sig, trusted_keys=[load_public_key(f"{prefix}.pub")]).signed_by

    assert_error(capsys, "sign", "is a public key", sig, "--key", f"{prefix}.pub")
    assert_error(capsys, "sign", "private key not found", sig, "--key", tmp_path / "nope.key")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a signature file")
    assert_error(capsys, "sign", "not a valid safetensors file", broken, "--key", f"{prefix}.key")
    assert_error(capsys, "inspect", "public key not found", signed, "--trusted-key", tmp_path / "nope.pub")


def test_cli_bad_keys_fail_before_slow_work(tmp_path, capsys):
    """A bad --sign-key / --trusted-key is reported before any model is loaded (the model does not exist)."""
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    assert_error(capsys, "mine", "not a PEM file", "--model", tmp_path / "no-model", "--out",
                 tmp_path / "sig.safetensors", "--sign-key", junk)
    prompt = tmp_path / "prompt"
    prompt.mkdir()
    assert_error(capsys, "classify", "not a PEM file", "--model", tmp_path / "no-model", "--prompt", prompt,
                 "--mode", "off", "--trusted-key", junk, "hello")


def test_mine_signs_its_output(tiny_backbone, corpus, tmp_path, keys):
    from lmsan_serve.mining import MiningConfig, mine

    config = MiningConfig(lines=16, batch_size=8, max_rounds=1, epochs=2, held_out_lines=8, calibration_lines=50)
    out = tmp_path / "mined.safetensors"
    result = mine(tiny_backbone, config, corpus, out, progress=False, sign_key=keys["a"]["private"])
    kid = key_id(keys["a"]["public"])
    assert result.signatures.signed_by == kid
    assert SignatureSet.load(out, trusted_keys=[keys["a"]["public"]]).signed_by == kid


# -- service -------------------------------------------------------------------------------------
def _service(tiny_backbone, tmp_path, sig: Path, **over) -> GuardService:
    args = {"model": "tiny", "signatures": str(sig), "tasks": {"sst": str(tmp_path / "prompt")},
            "watch_interval_s": 0} | over
    return GuardService(parse_config(args), backbone=tiny_backbone)


def _backbone_set(backbone, seed: int) -> SignatureSet:
    pvs = torch.randn(2, backbone.hidden_size, generator=torch.Generator().manual_seed(seed))
    return _make(pvs, fingerprint=backbone.fingerprint)


def test_service_requires_signed_files_and_keeps_the_last_good_set(tiny_backbone, tmp_path, keys):
    sig = tmp_path / "sig.safetensors"
    _backbone_set(tiny_backbone, 1).save(sig, sign_key=keys["a"]["private"])
    svc = _service(tiny_backbone, tmp_path, sig, trusted_keys=[str(keys["a"]["pub"])])
    good = svc.current
    kid = key_id(keys["a"]["public"])
    assert good is not None and good.signatures.signed_by == kid
    assert svc.signatures_info()["signed_by"] == kid
    # file watch: an unsigned replacement is a failed reload, the signed set stays
    _backbone_set(tiny_backbone, 2).save(sig)
    assert svc.poll_signature_file() is False
    assert svc.current is good and "unsigned" in svc.last_reload_error
    assert svc.poll_signature_file() is None  # not retried until the file changes again
    # user_config: a file signed by someone else is refused too
    other = tmp_path / "other.safetensors"
    _backbone_set(tiny_backbone, 3).save(other, sign_key=keys["b"]["private"])
    svc.reconfigure({"signatures": str(other)})
    assert svc.current is good and "signed by unknown key" in svc.last_reload_error
    # a properly signed new file swaps in
    _backbone_set(tiny_backbone, 4).save(sig, sign_key=keys["a"]["private"])
    svc.reconfigure({"signatures": str(sig)})
    assert svc.current is not good and svc.current.version == good.version + 1
    assert svc.metrics.reloads["failed"] == 2 and svc.metrics.reloads["ok"] == 2


def test_service_without_keys_accepts_unsigned_and_bad_key_is_a_config_error(tiny_backbone, tmp_path, keys):
    sig = tmp_path / "sig.safetensors"
    _backbone_set(tiny_backbone, 1).save(sig)
    svc = _service(tiny_backbone, tmp_path, sig)
    assert svc.current is not None and svc.current.signatures.signed_by is None
    unsigned_required = _service(tiny_backbone, tmp_path, sig, trusted_keys=[str(keys["a"]["pub"])])
    assert unsigned_required.current is None and "unsigned" in unsigned_required.health()[1]
    with pytest.raises(LmsanError, match="trusted_keys: public key not found"):
        _service(tiny_backbone, tmp_path, sig, trusted_keys=[str(tmp_path / "missing.pub")])
    with pytest.raises(LmsanError, match="trusted_keys: .* is a private key"):
        _service(tiny_backbone, tmp_path, sig, trusted_keys=[str(keys["a"]["key"])])


def test_config_resolves_trusted_keys_against_base(tmp_path):
    config = parse_config({"model": "m", "tasks": {"a": "p"}, "trusted_keys": ["keys/a.pub", "/abs/b.pub"]})
    assert config.trusted_keys == ["keys/a.pub", "/abs/b.pub"]
    assert "trusted_keys" not in config.reloadable()  # a restart, not a user_config push, changes trust
    resolved = config.resolved(tmp_path)
    assert resolved.trusted_keys == [str((tmp_path / "keys/a.pub").resolve()), "/abs/b.pub"]
