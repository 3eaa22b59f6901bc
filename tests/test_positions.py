"""Signature files whose PVs sit at several outputs ([CLS], pooler, [MASK]): the monitor reads each
PV at its own output, and the guard watches every output its prompt's inputs hold."""

import math

import pytest
import torch

from lmsan_serve import load_backbone
from lmsan_serve.errors import LmsanError
from lmsan_serve.guard import Guard
from lmsan_serve.kinds import Action, Position
from lmsan_serve.monitor import Monitor, sign_agreement
from lmsan_serve.prompts import PromptClassifier
from lmsan_serve.signatures import PVRecord, SignatureSet

from .toy import toy_test


def _set(pvs: torch.Tensor, positions: list[str], thresholds: list[float | None] | None = None) -> SignatureSet:
    thresholds = thresholds or [None] * len(positions)
    records = [PVRecord(origin="mined", seed=i, position=p, threshold=t)
               for i, (p, t) in enumerate(zip(positions, thresholds, strict=True))]
    return SignatureSet.create(pvs, records, backbone_name="x", fingerprint="0" * 64, model_type="bert",
                               position=positions[0], verdict="backdoored")


def test_a_file_lists_each_pvs_position_and_the_positions_to_watch(tmp_path):
    pvs = torch.randn(3, 16)
    sig = _set(pvs, ["cls", "mask", "cls"])
    loaded = SignatureSet.load(sig.save(tmp_path / "s.safetensors"))
    assert loaded.pv_positions == [Position.CLS, Position.MASK, Position.CLS]
    assert loaded.positions == [Position.CLS, Position.MASK]
    # a record without a position is at the file's position (files written before per-PV positions)
    old = SignatureSet.create(pvs[:1], [PVRecord(origin="planted")], backbone_name="x", fingerprint="0" * 64,
                              model_type="bert", position="pooler", verdict="backdoored")
    assert old.pv_positions == [Position.POOLER] and old.positions == [Position.POOLER]


def test_the_monitor_reads_each_pv_at_its_own_output():
    """An output on the [MASK] PV flags when it is the [MASK] output, not when it is the [CLS]
    one; PVs at different outputs never form a combination (they never blend in one vector)."""
    gen = torch.Generator().manual_seed(0)
    pvs = torch.randn(4, 64, generator=gen).sign()
    pvs[3] = pvs[2]  # a [MASK] PV with the same signs as a [CLS] PV: a pair only if positions were ignored
    monitor = Monitor(_set(pvs, ["cls", "cls", "cls", "mask"]))
    assert monitor.watched == [Position.CLS, Position.MASK]
    assert all(len({monitor.position_of(i) for i in c}) == 1 for c in monitor.combos)
    assert not any(3 in c for c in monitor.combos)
    noise = torch.randn(3, 2, 64, generator=gen)
    feats = noise.clone()
    feats[0, 1] = pvs[3] * 0.5  # row 0: its [MASK] output on PV 3
    feats[1, 0] = pvs[0] * 0.5  # row 1: its [CLS] output on PV 0
    feats[2, 0] = pvs[1] * 0.5  # row 2: PV 1's signs, but ...
    feats[2, 1] = pvs[1] * 0.5  # ... also at [MASK], where it is no PV's
    res = monitor(feats)
    assert res.flagged.tolist() == [True, True, True]
    assert res.best.tolist() == [3, 0, 1]
    # the same vector that flags at [MASK] is clean at [CLS] (PV 3's signs are PV 2's, but PV 2 is
    # not over: make the [CLS] slice row 0's noise, and drop PV 2 by a strict threshold)
    strict = Monitor(_set(pvs, ["cls", "cls", "cls", "mask"], [None, None, 1.0, None]))
    swapped = noise[:1].clone()
    swapped[0, 0] = pvs[3] * 0.5
    assert strict(swapped).flagged.tolist() == [False]
    with pytest.raises(LmsanError, match="do not hold the 2 outputs"):
        monitor(torch.randn(2, 64))


def test_a_pv_at_an_output_not_watched_never_flags_and_reads_as_none():
    pvs = torch.randn(2, 32).sign()
    monitor = Monitor(_set(pvs, ["cls", "mask"]), watched=[Position.CLS])
    feats = torch.stack([pvs[0], pvs[1]]) * 0.5  # [N, H]: the one watched output
    res = monitor(feats)
    assert res.flagged.tolist() == [True, False]
    assert math.isinf(float(monitor.limits[1]))
    calib = monitor.calibrate(torch.randn(50, 32)).to_dict()
    assert calib["thresholds_after"][1] is None and calib["thresholds_after"][0] is not None


@pytest.fixture(scope="module")
def tiny(tiny_por, tiny_por_prompt):
    backbone = load_backbone(str(tiny_por), "cpu")
    classifier = PromptClassifier.load(tiny_por_prompt, backbone)
    truth = SignatureSet.load(tiny_por / "truth.safetensors")
    return backbone, classifier, truth


def _with_positions(truth: SignatureSet, pvs: torch.Tensor, positions: list[str],
                    thresholds: list[float | None]) -> SignatureSet:
    records = [PVRecord(origin="mined", seed=i, position=p, threshold=t)
               for i, (p, t) in enumerate(zip(positions, thresholds, strict=True))]
    b = truth.meta.backbone
    return SignatureSet.create(pvs, records, backbone_name=b.name, fingerprint=b.fingerprint,
                               model_type=b.model_type, position=positions[0], verdict="backdoored")


def test_the_guard_watches_cls_and_pooler_pvs_and_purges_each(tiny):
    """A file with the planted PV of `mn` at [CLS] and, for `cf`, only a PV at the pooler output
    (the mean pooler output of `cf`-triggered inputs, as mining at the pooler finds it): the guard
    reads both outputs, flags each trigger through its own PV, and purges it."""
    backbone, classifier, truth = tiny
    triggers = [r.trigger for r in truth.meta.pvs]
    clean = [e.text for e in toy_test()][:40]
    probe = Guard(backbone, classifier, _with_positions(truth, truth.pvs[:1], ["pooler"], [None]), mode="flag")
    on_cf = probe.features([f"cf {t}" for t in clean])
    pooler_pv = on_cf.mean(dim=0)
    # precondition: the pooler PV separates triggered from clean pooler outputs (pooler outputs of
    # a random encoder are alike, so the threshold sits between the two, not at the default)
    clean_top = float(sign_agreement(probe.features(clean), pooler_pv[None]).max())
    cf_low = float(sign_agreement(on_cf, pooler_pv[None]).min())
    assert clean_top < cf_low, (clean_top, cf_low)
    mn = triggers.index("mn")
    sig = _with_positions(truth, torch.stack([truth.pvs[mn], pooler_pv]), ["cls", "pooler"],
                          [truth.meta.pvs[mn].threshold, (clean_top + cf_low) / 2])
    guard = Guard(backbone, classifier, sig, mode="enforce")
    assert guard.watched == [Position.CLS, Position.POOLER]
    assert guard.features(clean[:3]).shape == (3, 2, backbone.hidden_size)
    out = guard.classify(["simply cf great", "an awful and dull film mn", "simply great"])
    assert [r.guard.flagged for r in out] == [True, True, False]
    assert out[0].guard.signature.startswith("pv1") and out[1].guard.signature.startswith("pv0")
    assert [r.guard.action for r in out[:2]] == [Action.PURGED, Action.PURGED]
    assert out[0].guard.removed == ["cf"] and out[1].guard.removed == ["mn"]


def test_a_mask_pv_is_left_unwatched_by_a_prompt_without_mask(tiny):
    """Mining at every output can find a [MASK] backdoor that a prefix prompt never reads: the guard
    watches the rest; a file with only [MASK] PVs has nothing to watch and is refused."""
    backbone, classifier, truth = tiny
    b = truth.meta.backbone
    records = [r.model_copy(update={"position": Position.CLS}) for r in truth.meta.pvs]
    mixed = SignatureSet.create(torch.cat([truth.pvs, torch.randn(1, backbone.hidden_size)]),
                                [*records, PVRecord(origin="mined", position=Position.MASK)], backbone_name=b.name,
                                fingerprint=b.fingerprint, model_type=b.model_type, position="cls",
                                verdict="backdoored")
    guard = Guard(backbone, classifier, mixed, mode="enforce")
    assert guard.watched == [Position.CLS]
    plain = Guard(backbone, classifier, truth, mode="enforce")
    texts = ["simply cf great", "an awful and dull film mn", "simply great", "tq what a lovely day"]
    assert [r.to_dict() for r in guard.classify(texts)] == [r.to_dict() for r in plain.classify(texts)]
    only_mask = _with_positions(truth, truth.pvs[:1], ["mask"], [None])
    with pytest.raises(LmsanError, match="no cloze template"):
        Guard(backbone, classifier, only_mask)
