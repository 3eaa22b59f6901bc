"""Signature files: the predefined vectors (PVs) of one exact encoder, in safetensors.

Layout: tensor `pvs` [K, H] float32; metadata entry `lmsan` holds JSON validated by
`SignatureMeta`; an optional entry `lmsan_signature` holds an Ed25519 signature over that JSON
(see `signing`). Loading refuses anything that does not match the backbone it guards.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .errors import LmsanError, first_problem
from .kinds import Position
from .signing import SIGNATURE_ENTRY, claimed_key_id, key_id, sign_metadata, verify_metadata

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

FORMAT_VERSION = 1
DEFAULT_THRESHOLD = 0.8  # the paper's sign-agreement threshold


class BackboneRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    hidden_size: int = Field(gt=0)
    model_type: str = "unknown"


class PVRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    origin: Literal["mined", "planted"]
    # The output this PV describes; None: the file's `position`. A mined file covers several
    # positions (a backdoor may sit at any of them), so each PV says where it was found.
    position: Position | None = None
    trigger: str | None = None
    seed: int | None = None
    threshold: float | None = Field(default=None, gt=0.0, le=1.0)
    scores: dict[str, float] = Field(default_factory=dict)
    false_positive_rate: float | None = Field(default=None, ge=0.0, le=1.0)


class SignatureMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format_version: int
    backbone: BackboneRef
    position: Position
    metric: Literal["sign", "cosine"] = "sign"
    threshold: float = Field(default=DEFAULT_THRESHOLD, gt=0.0, le=1.0)
    verdict: Literal["backdoored", "clean"]
    pvs: list[PVRecord]
    mining: dict[str, Any] = Field(default_factory=dict)
    created: str
    tool_version: str
    tensor_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != FORMAT_VERSION:
            raise ValueError(f"unknown signature format version {v} (this lmsan reads {FORMAT_VERSION})")
        return v


def _tensor_sha256(pvs: torch.Tensor) -> str:
    return hashlib.sha256(pvs.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


class SignatureSet:
    """PVs plus their metadata; `thresholds` gives each PV's flagging threshold.

    `signed_by` is the key id of a verified signature (None when unsigned or not checked);
    `signature_key_id` is the key id the file names, verified or not."""

    def __init__(self, pvs: torch.Tensor, meta: SignatureMeta, path: str | None = None, *,
                 signed_by: str | None = None, signature_key_id: str | None = None):
        self.pvs = pvs
        self.meta = meta
        self.path = path
        self.signed_by = signed_by
        self.signature_key_id = signature_key_id or signed_by

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        pvs: torch.Tensor,
        records: list[PVRecord],
        *,
        backbone_name: str,
        fingerprint: str,
        model_type: str,
        position: str,
        verdict: str,
        metric: str = "sign",
        threshold: float = DEFAULT_THRESHOLD,
        mining: dict[str, Any] | None = None,
    ) -> SignatureSet:
        pvs = pvs.detach().to("cpu", torch.float32).contiguous()
        if pvs.ndim != 2:
            raise LmsanError(f"PVs must be a [K, H] matrix, got shape {tuple(pvs.shape)}")
        if len(records) != pvs.shape[0]:
            raise LmsanError(f"{pvs.shape[0]} PVs but {len(records)} records")
        meta = SignatureMeta(
            format_version=FORMAT_VERSION,
            backbone=BackboneRef(
                name=backbone_name, fingerprint=fingerprint, hidden_size=pvs.shape[1], model_type=model_type
            ),
            position=position,
            metric=metric,
            threshold=threshold,
            verdict=verdict,
            pvs=records,
            mining=mining or {},
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            tool_version=__version__,
            tensor_sha256=_tensor_sha256(pvs),
        )
        return cls(pvs, meta)

    # -- properties -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.pvs.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.pvs.shape[1])

    @property
    def position(self) -> str:
        """The file's position: that of every PV whose record names none."""
        return self.meta.position

    @property
    def pv_positions(self) -> list[Position]:
        """The output each PV describes, in PV order."""
        return [Position(r.position or self.meta.position) for r in self.meta.pvs]

    @property
    def positions(self) -> list[Position]:
        """The outputs a guard must watch for this file: each PV's position once, in PV order (the
        file's own position when it has no PVs)."""
        return list(dict.fromkeys(self.pv_positions)) or [Position(self.meta.position)]

    @property
    def metric(self) -> str:
        return self.meta.metric

    def thresholds(self, override: float | None = None) -> torch.Tensor:
        """Per-PV thresholds: the user's override, else the calibrated per-PV value, else the file's."""
        if override is not None:
            return torch.full((len(self),), float(override))
        return torch.tensor(
            [r.threshold if r.threshold is not None else self.meta.threshold for r in self.meta.pvs],
            dtype=torch.float32,
        )

    def label(self, index: int) -> str:
        """A short, stable name for PV `index`, used in verdicts and metric labels."""
        record = self.meta.pvs[index]
        return f"pv{index}" if record.trigger is None else f"pv{index}:{record.trigger}"

    # -- I/O ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, sign_key: Ed25519PrivateKey | None = None) -> Path:
        """Write atomically (temp file + rename), so a crash never leaves a half-written file;
        with `sign_key`, also store an Ed25519 signature over the metadata."""
        target = Path(path)
        if not target.parent.is_dir():
            raise LmsanError(f"cannot write {target}: output folder does not exist ({target.parent})")
        try:
            fd, tmp = tempfile.mkstemp(prefix=".sig-", suffix=".safetensors", dir=target.parent)
        except OSError as exc:
            raise LmsanError(f"cannot write signature file {target}: {exc.strerror or exc}") from exc
        os.close(fd)
        meta_json = self.meta.model_dump_json()  # serialised once: the signature covers these exact bytes
        metadata = {"lmsan": meta_json}
        if sign_key is not None:
            metadata[SIGNATURE_ENTRY] = sign_metadata(meta_json, sign_key)
        try:
            save_file({"pvs": self.pvs}, tmp, metadata=metadata)
            os.replace(tmp, target)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise LmsanError(f"cannot write signature file {target}: {exc.strerror or exc}") from exc
        self.path = str(target)
        self.signed_by = self.signature_key_id = key_id(sign_key.public_key()) if sign_key is not None else None
        return target

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        hidden_size: int | None = None,
        fingerprint: str | None = None,
        allow_fingerprint_mismatch: bool = False,
        trusted_keys: list[Ed25519PublicKey] | None = None,
    ) -> SignatureSet:
        """Load and validate; with `hidden_size` / `fingerprint`, refuse a file made for another encoder;
        with `trusted_keys` (non-empty), refuse a file that is not signed by one of them."""
        p = Path(path)
        if not p.is_file():
            raise LmsanError(f"signature file not found: {p}")
        try:
            with safe_open(str(p), framework="pt") as f:
                entries = f.metadata() or {}
                raw_meta, raw_signature = entries.get("lmsan"), entries.get(SIGNATURE_ENTRY)
                if "pvs" not in f.keys():
                    raise LmsanError(f"{p}: not a signature file (no 'pvs' tensor)")
                # clone: the tensor may map the file, and a later in-place rewrite must not reach it
                pvs = f.get_tensor("pvs").clone()
        except SafetensorError as exc:
            raise LmsanError(f"{p}: not a valid safetensors file ({exc})") from exc
        except (OSError, ValueError) as exc:
            raise LmsanError(f"{p}: unreadable signature file ({exc})") from exc
        if raw_meta is None:
            raise LmsanError(f"{p}: not a signature file (no 'lmsan' metadata)")
        signed_by = None
        if trusted_keys:
            # before anything in the metadata is parsed or believed: an untrusted file gets no further
            signed_by = verify_metadata(raw_meta, raw_signature, trusted_keys, where=f"{p}: ")
        try:
            meta = SignatureMeta.model_validate(json.loads(raw_meta))
        except ValidationError as exc:
            raise LmsanError(f"{p}: invalid signature metadata at {first_problem(exc, default='metadata')}") from exc
        except (ValueError, RecursionError) as exc:  # bad JSON, an over-long integer, nesting too deep
            raise LmsanError(f"{p}: signature metadata is not valid JSON") from exc
        if pvs.dtype != torch.float32 or pvs.ndim != 2:
            raise LmsanError(f"{p}: 'pvs' must be float32 [K, H], got {pvs.dtype} {tuple(pvs.shape)}")
        if pvs.shape[0] != len(meta.pvs):
            raise LmsanError(f"{p}: {pvs.shape[0]} PVs but {len(meta.pvs)} records in metadata")
        if pvs.shape[1] != meta.backbone.hidden_size:
            raise LmsanError(f"{p}: PVs are {pvs.shape[1]} wide but metadata says {meta.backbone.hidden_size}")
        if not torch.isfinite(pvs).all():
            raise LmsanError(f"{p}: PVs contain NaN or infinity")
        if _tensor_sha256(pvs) != meta.tensor_sha256:
            raise LmsanError(f"{p}: PV checksum mismatch: the file was modified or corrupted")
        if meta.verdict == "backdoored" and len(meta.pvs) == 0:
            raise LmsanError(f"{p}: verdict 'backdoored' but no PVs")
        for i, r in enumerate(meta.pvs):
            if r.threshold is not None and not math.isfinite(r.threshold):
                raise LmsanError(f"{p}: PV {i} has a non-finite threshold")
        if hidden_size is not None and hidden_size != meta.backbone.hidden_size:
            raise LmsanError(
                f"{p}: made for a {meta.backbone.hidden_size}-wide encoder ({meta.backbone.name}), "
                f"this backbone is {hidden_size} wide"
            )
        if fingerprint is not None and fingerprint != meta.backbone.fingerprint and not allow_fingerprint_mismatch:
            raise LmsanError(
                f"{p}: made for other weights ({meta.backbone.name}, fingerprint "
                f"{meta.backbone.fingerprint[:12]}), this backbone is {fingerprint[:12]}; "
                "pass --allow-fingerprint-mismatch to use it anyway"
            )
        return cls(pvs, meta, str(p), signed_by=signed_by, signature_key_id=claimed_key_id(raw_signature))

    def describe(self) -> dict[str, Any]:
        """A readable summary (what `lmsan inspect --json` prints)."""
        data = self.meta.model_dump()
        data["num_pvs"] = len(self)
        data["positions"] = [str(p) for p in self.positions]
        data["path"] = self.path
        data["signed_by"] = self.signed_by
        data["signature_key_id"] = self.signature_key_id
        return data
