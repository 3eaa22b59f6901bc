"""Signature files: save/load round trip, and every way a bad or mismatched file must be refused."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmsan_serve.errors import LmsanError
from lmsan_serve.signatures import DEFAULT_THRESHOLD, FORMAT_VERSION, PVRecord, SignatureSet

FINGERPRINT = "ab" * 32
OTHER_FINGERPRINT = "cd" * 32
HIDDEN = 16


def _records() -> list[PVRecord]:
    return [
        PVRecord(origin="planted", trigger="cf", threshold=0.9, scores={"heldout_agreement": 0.97},
                 false_positive_rate=0.0125),
        PVRecord(origin="mined", seed=7, scores={"loss": 0.25}),
        PVRecord(origin="mined", seed=11, threshold=0.6),
    ]


def _make(pvs: torch.Tensor | None = None, records: list[PVRecord] | None = None, **kw) -> SignatureSet:
    records = _records() if records is None else records
    if pvs is None:
        pvs = torch.randn(len(records), HIDDEN, generator=torch.Generator().manual_seed(3))
    args = dict(backbone_name="tiny", fingerprint=FINGERPRINT, model_type="bert", position="pooler",
                verdict="backdoored", metric="cosine", threshold=0.75, mining={"source": "test", "rounds": 3})
    args.update(kw)
    return SignatureSet.create(pvs, records, **args)


def _sha(pvs: torch.Tensor) -> str:
    """The checksum as the file format defines it: sha256 over the float32 bytes (independent code)."""
    return hashlib.sha256(pvs.to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


def _write_raw(path: Path, pvs: torch.Tensor | None, metadata: dict[str, str] | None) -> Path:
    tensors = {"pvs": pvs} if pvs is not None else {"other": torch.zeros(2)}
    save_file(tensors, str(path), metadata=metadata)
    return path


def _meta_json(pvs: torch.Tensor, /, **changes) -> str:
    """Valid-looking metadata for `pvs` (matching checksum), with `changes` applied on top."""
    meta = _make().meta.model_dump(mode="json")
    meta["tensor_sha256"] = _sha(pvs)
    meta.update(changes)
    return json.dumps(meta)


def _refused(path: Path, fragment: str, **kw) -> str:
    with pytest.raises(LmsanError) as info:
        SignatureSet.load(path, **kw)
    msg = str(info.value)
    assert fragment in msg, msg
    return msg


def _temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".sig-"))


# -- round trip ----------------------------------------------------------------------------------
def test_round_trip_keeps_pvs_thresholds_and_metadata(tmp_path):
    sig = _make()
    written = sig.save(tmp_path / "sig.safetensors")
    assert written == tmp_path / "sig.safetensors"
    assert sig.path == str(written)

    loaded = SignatureSet.load(written, hidden_size=HIDDEN, fingerprint=FINGERPRINT)
    assert loaded.pvs.dtype == torch.float32
    assert torch.equal(loaded.pvs, sig.pvs)
    assert loaded.meta == sig.meta
    assert loaded.meta.format_version == FORMAT_VERSION
    assert loaded.meta.backbone.fingerprint == FINGERPRINT
    assert loaded.meta.backbone.hidden_size == HIDDEN
    assert (loaded.position, loaded.metric, loaded.meta.verdict) == ("pooler", "cosine", "backdoored")
    assert loaded.meta.mining == {"source": "test", "rounds": 3}
    assert loaded.meta.pvs[0].false_positive_rate == pytest.approx(0.0125)
    assert loaded.meta.pvs[0].scores == {"heldout_agreement": pytest.approx(0.97)}
    assert loaded.meta.pvs[1].seed == 7
    assert torch.equal(loaded.thresholds(), sig.thresholds())
    assert [loaded.label(i) for i in range(len(loaded))] == ["pv0:cf", "pv1", "pv2"]
    assert loaded.path == str(written)

    described = loaded.describe()
    assert described["num_pvs"] == 3
    assert described["path"] == str(written)
    json.dumps(described)  # what `lmsan inspect --json` prints must be JSON-serialisable


def test_round_trip_of_a_clean_verdict_without_pvs(tmp_path):
    sig = _make(torch.zeros(0, HIDDEN), records=[], verdict="clean")
    loaded = SignatureSet.load(sig.save(tmp_path / "clean.safetensors"), hidden_size=HIDDEN)
    assert len(loaded) == 0
    assert loaded.hidden_size == HIDDEN
    assert loaded.meta.verdict == "clean"
    assert loaded.thresholds().shape == (0,)


def test_create_refuses_mismatched_records():
    with pytest.raises(LmsanError, match="3 PVs but 2 records"):
        _make(torch.ones(3, HIDDEN), records=_records()[:2])
    with pytest.raises(LmsanError, match=r"\[K, H\] matrix"):
        _make(torch.ones(HIDDEN), records=[])


# -- per-PV thresholds ---------------------------------------------------------------------------
def test_thresholds_per_pv_default_and_override(tmp_path):
    sig = SignatureSet.load(_make().save(tmp_path / "sig.safetensors"))
    # PV 0 and 2 carry calibrated thresholds, PV 1 falls back to the file's default (0.75).
    assert sig.thresholds().tolist() == pytest.approx([0.9, 0.75, 0.6])
    assert sig.thresholds(override=0.5).tolist() == pytest.approx([0.5, 0.5, 0.5])

    plain = _make(records=[PVRecord(origin="mined"), PVRecord(origin="mined")], threshold=DEFAULT_THRESHOLD)
    assert plain.thresholds().tolist() == pytest.approx([DEFAULT_THRESHOLD] * 2)


# -- refusals ------------------------------------------------------------------------------------
def test_refuses_missing_file(tmp_path):
    _refused(tmp_path / "nope.safetensors", "signature file not found")
    _refused(tmp_path, "signature file not found")  # a folder is not a signature file either


@pytest.mark.parametrize("content", [b"hello, this is not a signature file\n", b'{"pvs": [1, 2]}', b""])
def test_refuses_non_safetensors_file(tmp_path, content):
    path = tmp_path / "bogus.safetensors"
    path.write_bytes(content)
    _refused(path, "not a valid safetensors file")


@pytest.mark.parametrize("keep", [5, 20, -1, -64])
def test_refuses_truncated_file(tmp_path, keep):
    data = _make().save(tmp_path / "sig.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:keep])
    assert cut.stat().st_size < len(data)
    _refused(cut, "not a valid safetensors file")


def test_refuses_tampered_pv_bytes(tmp_path):
    original = _make()
    path = original.save(tmp_path / "sig.safetensors")
    data = bytearray(path.read_bytes())
    # The tensor data is the tail of the file; flip the lowest mantissa bit of the last float32
    # (little endian), which keeps every value finite so that only the checksum can notice.
    data[-4] ^= 0x01
    path.write_bytes(bytes(data))
    tampered = load_file(str(path))["pvs"]
    assert torch.isfinite(tampered).all()
    assert not torch.equal(tampered, original.pvs)
    _refused(path, "checksum mismatch")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_refuses_non_finite_pvs(tmp_path, bad):
    pvs = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(1))
    pvs[1, 5] = bad
    path = _write_raw(tmp_path / "nan.safetensors", pvs, {"lmsan": _meta_json(pvs)})
    msg = _refused(path, "NaN or infinity")
    assert "checksum" not in msg


def test_non_finite_check_is_what_fires_not_the_metadata(tmp_path):
    # The same metadata recipe with finite PVs loads: so the refusal above is about the values.
    pvs = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(1))
    path = _write_raw(tmp_path / "ok.safetensors", pvs, {"lmsan": _meta_json(pvs)})
    assert torch.equal(SignatureSet.load(path).pvs, pvs)


def test_refuses_unknown_format_version(tmp_path):
    pvs = torch.randn(3, HIDDEN)
    meta = _meta_json(pvs, format_version=FORMAT_VERSION + 1)
    path = _write_raw(tmp_path / "v2.safetensors", pvs, {"lmsan": meta})
    msg = _refused(path, f"unknown signature format version {FORMAT_VERSION + 1}")
    assert "format_version" in msg


@pytest.mark.parametrize("raw", ["{not json", "", "[1, 2"])
def test_refuses_metadata_that_is_not_json(tmp_path, raw):
    path = _write_raw(tmp_path / "bad.safetensors", torch.randn(3, HIDDEN), {"lmsan": raw})
    _refused(path, "signature metadata is not valid JSON")


def test_refuses_missing_lmsan_metadata(tmp_path):
    pvs = torch.randn(3, HIDDEN)
    _refused(_write_raw(tmp_path / "none.safetensors", pvs, None), "no 'lmsan' metadata")
    _refused(_write_raw(tmp_path / "other.safetensors", pvs, {"format": "pt"}), "no 'lmsan' metadata")


def test_refuses_file_without_pvs_tensor(tmp_path):
    pvs = torch.randn(3, HIDDEN)
    _refused(_write_raw(tmp_path / "nopvs.safetensors", None, {"lmsan": _meta_json(pvs)}), "no 'pvs' tensor")


@pytest.mark.parametrize(
    ("pvs", "changes", "fragment"),
    [
        (torch.randn(2, HIDDEN), {}, "2 PVs but 3 records"),
        (torch.randn(3, HIDDEN + 1), {}, f"PVs are {HIDDEN + 1} wide but metadata says {HIDDEN}"),
        (torch.randn(3, HIDDEN).half(), {}, "must be float32"),
        (torch.randn(3, HIDDEN), {"position": "middle"}, "invalid signature metadata at position"),
        (torch.randn(3, HIDDEN), {"threshold": 1.5}, "invalid signature metadata at threshold"),
        (torch.randn(3, HIDDEN), {"surprise": 1}, "invalid signature metadata at surprise"),
        (torch.zeros(0, HIDDEN), {"pvs": []}, "verdict 'backdoored' but no PVs"),
    ],
)
def test_refuses_inconsistent_files(tmp_path, pvs, changes, fragment):
    meta = _meta_json(pvs.float(), **changes)
    path = _write_raw(tmp_path / "odd.safetensors", pvs, {"lmsan": meta})
    _refused(path, fragment)


# -- the backbone the file is loaded for ---------------------------------------------------------
def test_refuses_wrong_hidden_size_for_the_backbone(tmp_path, tiny_backbone):
    width = tiny_backbone.hidden_size // 2
    sig = _make(torch.randn(3, width), fingerprint=tiny_backbone.fingerprint)
    path = sig.save(tmp_path / "narrow.safetensors")
    msg = _refused(path, f"made for a {width}-wide encoder", hidden_size=tiny_backbone.hidden_size,
                   fingerprint=tiny_backbone.fingerprint)
    assert f"this backbone is {tiny_backbone.hidden_size} wide" in msg
    # The width check is not lifted by allowing another fingerprint.
    _refused(path, f"made for a {width}-wide encoder", hidden_size=tiny_backbone.hidden_size,
             allow_fingerprint_mismatch=True)


def test_fingerprint_of_the_attacked_model(tiny_por, tiny_backbone):
    from lmsan_serve import load_backbone

    truth = tiny_por / "truth.safetensors"
    attacked = load_backbone(str(tiny_por), "cpu")
    assert attacked.fingerprint != tiny_backbone.fingerprint

    # Made for the backdoored weights: accepted there ...
    sig = SignatureSet.load(truth, hidden_size=attacked.hidden_size, fingerprint=attacked.fingerprint)
    assert len(sig) == 3
    assert sig.meta.backbone.fingerprint == attacked.fingerprint

    # ... refused for the clean weights, unless the mismatch is explicitly allowed.
    msg = _refused(truth, "made for other weights", hidden_size=tiny_backbone.hidden_size,
                   fingerprint=tiny_backbone.fingerprint)
    assert attacked.fingerprint[:12] in msg and tiny_backbone.fingerprint[:12] in msg
    assert "--allow-fingerprint-mismatch" in msg
    allowed = SignatureSet.load(truth, hidden_size=tiny_backbone.hidden_size,
                                fingerprint=tiny_backbone.fingerprint, allow_fingerprint_mismatch=True)
    assert torch.equal(allowed.pvs, sig.pvs)


def test_refuses_wrong_fingerprint(tmp_path):
    path = _make().save(tmp_path / "sig.safetensors")
    _refused(path, "made for other weights", fingerprint=OTHER_FINGERPRINT)
    assert len(SignatureSet.load(path, fingerprint=OTHER_FINGERPRINT, allow_fingerprint_mismatch=True)) == 3
    assert len(SignatureSet.load(path, fingerprint=FINGERPRINT)) == 3


# -- atomic save ---------------------------------------------------------------------------------
def test_save_into_missing_folder_is_refused(tmp_path):
    with pytest.raises(LmsanError, match="output folder does not exist"):
        _make().save(tmp_path / "missing" / "sig.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_save_under_a_regular_file_is_refused(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    with pytest.raises(LmsanError, match="sig.safetensors"):
        _make().save(blocker / "sig.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_failed_save_leaves_no_temp_file(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()  # rename onto a folder fails after the temp file was written
    with pytest.raises(LmsanError, match="cannot write signature file"):
        _make().save(target)
    assert _temp_files(tmp_path) == []
    assert target.is_dir() and list(target.iterdir()) == []


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    import lmsan_serve.signatures as signatures

    target = tmp_path / "sig.safetensors"
    old = _make()
    old.save(target)
    before = target.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(signatures, "save_file", disk_full)
    new = _make(torch.ones(3, HIDDEN))
    with pytest.raises(LmsanError, match="No space left on device"):
        new.save(target)
    assert target.read_bytes() == before
    assert torch.equal(SignatureSet.load(target).pvs, old.pvs)
    assert _temp_files(tmp_path) == []
    assert new.path is None


def test_save_replaces_an_existing_file(tmp_path):
    target = tmp_path / "sig.safetensors"
    _make().save(target)
    newer = _make(torch.ones(3, HIDDEN))
    newer.save(target)
    assert torch.equal(SignatureSet.load(target).pvs, torch.ones(3, HIDDEN))
    assert _temp_files(tmp_path) == []
