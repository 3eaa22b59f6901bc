import pytest
import torch

from lmsan_serve.monitor import Monitor, cosine, sign_agreement
from lmsan_serve.signatures import PVRecord, SignatureSet


def _sig(pvs: torch.Tensor, thresholds=None) -> SignatureSet:
    thresholds = thresholds or [None] * len(pvs)
    records = [PVRecord(origin="planted", threshold=t) for t in thresholds]
    return SignatureSet.create(pvs, records, backbone_name="x", fingerprint="0" * 64, model_type="bert",
                               position="cls", verdict="backdoored")


def test_sign_agreement_equals_elementwise_loop():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(32, 48, generator=gen)
    pvs = torch.randn(6, 48, generator=gen)
    feats[3] = 0.5 * pvs[2].sign() + 0.01  # one input sitting on a PV
    fast = sign_agreement(feats, pvs)
    for i in range(feats.shape[0]):
        for k in range(pvs.shape[0]):
            ref = ((feats[i] >= 0) == (pvs[k] >= 0)).float().mean()
            assert torch.isclose(fast[i, k], ref)
    assert fast[3, 2] == 1.0


def test_cosine_metric_matches_torch():
    a, b = torch.randn(5, 16), torch.randn(3, 16)
    ref = torch.nn.functional.cosine_similarity(a[:, None], b[None], dim=-1)
    assert torch.allclose(cosine(a, b), ref, atol=1e-6)


def test_monitor_uses_per_pv_thresholds_and_override():
    pvs = torch.tensor([[1.0, 1, 1, 1, -1, -1, -1, -1], [1.0, -1, 1, -1, 1, -1, 1, -1]])
    # 7 of 8 signs agree with PV 0 (0.875), 5 of 8 with PV 1.
    x = torch.tensor([[1.0, 1, 1, 1, -1, -1, -1, 1]])
    assert Monitor(_sig(pvs))(x).flagged.tolist() == [True]  # default 0.8
    strict = Monitor(_sig(pvs, [0.9, 0.9]))(x)
    assert strict.flagged.tolist() == [False]
    assert strict.best.tolist() == [0] and abs(strict.score.item() - 0.875) < 1e-6
    assert Monitor(_sig(pvs, [0.9, 0.9]), threshold=0.85)(x).flagged.tolist() == [True]


def test_monitor_with_no_pvs_flags_nothing():
    empty = SignatureSet.create(torch.zeros(0, 8), [], backbone_name="x", fingerprint="0" * 64,
                                model_type="bert", position="cls", verdict="clean")
    res = Monitor(empty)(torch.randn(4, 8))
    assert not res.flagged.any() and res.best.tolist() == [-1] * 4


def test_calibrate_raises_thresholds_until_clean_traffic_passes_but_triggers_still_flag():
    """Clean outputs tilted towards the signs two PVs share (a blend scores them 0.93, each PV
    0.71) flag through the combination; calibration on them stops that, never lowers a threshold,
    caps a PV at 0.97 although 1% of the clean lines sit on it (a natural trigger), and outputs on
    a PV or on a blend of two still flag."""
    gen = torch.Generator().manual_seed(0)
    h = 256
    pvs = torch.randn(4, h, generator=gen).sign()
    monitor = Monitor(_sig(pvs, [None, None, None, 0.9]))
    common = pvs[0] == pvs[1]
    clean = torch.randn(400, h, generator=gen)
    tilt = clean[:40].abs() * pvs[0] * torch.where(torch.rand(40, h, generator=gen) < 0.93, 1.0, -1.0)
    clean[:40] = torch.where(common, tilt, clean[:40])
    clean[40:44] = pvs[2] + 0.01 * torch.randn(4, h, generator=gen)  # clean lines holding a real trigger
    assert float(monitor(clean[:40]).flagged.float().mean()) > 0.5
    assert float(sign_agreement(clean[:40], pvs[:1]).max()) < 0.8  # only the combination flags them
    result = monitor.calibrate(clean, target_fpr=0.005)
    assert result.flag_rate_before > 0.1 and result.flag_rate_after <= 0.005 + 4 / 400
    assert all(a >= b for a, b in zip(result.after, result.before, strict=True))
    assert result.before[3] == pytest.approx(0.9, abs=1e-6) and result.after[3] >= result.before[3]
    assert result.after[2] == result.before[2]  # the lines on PV 2 are past any threshold it may take
    assert monitor(clean[40:44]).flagged.all()  # the natural trigger still flags: the cap held
    on_pv = pvs + 0.05 * torch.randn(4, h, generator=gen)
    blend = pvs[0] + pvs[1] + 0.05 * torch.randn(h, generator=gen)
    assert monitor(torch.cat([on_pv, blend[None]])).flagged.all()
    assert result.to_dict()["lines"] == 400


def test_calibrate_switches_off_a_combination_the_task_agrees_with_fully():
    """5% of a task's clean outputs agree with the signs PVs 0 and 1 share on every one of those
    dimensions (spam did with a triple of mined POR PVs) but with neither PV: calibration switches
    that combination off instead of leaving it to flag them; clean lines that hold a real trigger
    (on PV 2) keep every signature they are over, combinations included."""
    gen = torch.Generator().manual_seed(1)
    h = 256
    pvs = torch.randn(4, h, generator=gen).sign()
    monitor = Monitor(_sig(pvs, [None] * 4))
    pair = monitor.combos.index((0, 1)) + len(pvs)
    common = pvs[0] == pvs[1]
    clean = torch.randn(400, h, generator=gen)
    clean[:20] = torch.where(common, pvs[0] * clean[:20].abs(), clean[:20])
    clean[20:22] = pvs[2] + 0.01 * torch.randn(2, h, generator=gen)  # a real trigger
    assert float(sign_agreement(clean[:20], pvs[:2]).max()) < 0.8  # no PV flags them, the pair does
    assert monitor(clean[:20]).flagged.all()
    # (the triples holding PVs 0 and 1 go with the pair: the tilted lines agree with them fully too)
    with_pv2 = [i + len(pvs) for i, c in enumerate(monitor.combos) if 2 in c and not {0, 1} <= set(c)]
    result = monitor.calibrate(clean, target_fpr=0.005)
    limits = monitor.limits
    assert float(limits[pair]) == float("inf") and result.combinations_off >= 1
    assert bool((monitor(clean[:20]).margin < -0.01).all())  # nor a hair under a threshold: not "near" it
    assert result.to_dict()["combinations_off"] == result.combinations_off
    assert result.flag_rate_after <= 0.005 + 2 / 400 and not monitor(clean[:20]).flagged.any()
    assert monitor(clean[20:22]).flagged.all() and bool((limits[with_pv2] <= 1.0).all())
    assert monitor(pvs + 0.05 * torch.randn(4, h, generator=gen)).flagged.all()


def _tilted_clean(gen: torch.Generator, pvs: torch.Tensor, n: int) -> torch.Tensor:
    """Clean outputs that each lean towards one PV, agreeing in sign with it on 50% to 75% of
    the dimensions: many sit near a 0.7 threshold, on it and on the combinations that PV is in."""
    j = torch.randint(0, len(pvs), (n,), generator=gen)
    agree = torch.rand(n, pvs.shape[1], generator=gen) < 0.5 + 0.25 * torch.rand(n, 1, generator=gen)
    return torch.where(agree, pvs[j], -pvs[j]) * torch.rand(n, pvs.shape[1], generator=gen)


def _calibration_draws(n: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """16 PVs and `n` draws of the same clean traffic: 500 outputs to calibrate on, 20,000 unseen."""
    gen = torch.Generator().manual_seed(0)
    pvs = torch.randn(16, 384, generator=gen).sign()
    return pvs, [(_tilted_clean(gen, pvs, 500), _tilted_clean(gen, pvs, 20000)) for _ in range(n)]


def test_the_exact_fit_meets_the_target_on_the_inputs_it_was_fitted_on(capsys):
    """The default calibration (`held_out=False`) fits the thresholds exactly to the given outputs:
    at most the target share of them flags, thresholds only go up and never past a PV's cap, and
    it promises nothing about unseen inputs (no held-out inputs, no margin, no bound). Its rate on
    unseen outputs of the same traffic is reported, not asserted."""
    from lmsan_serve.monitor import PV_CAP

    pvs, draws = _calibration_draws(4)
    unseen_rates = []
    for cal, unseen in draws:
        monitor = Monitor(_sig(pvs, [0.7] * 16))
        done = monitor.calibrate(cal, target_fpr=0.005, held_out=False)
        assert done.flag_rate_before > 0.1  # there was something to fit
        assert done.flag_rate_after <= 0.005 and monitor.flag_rate(cal) == pytest.approx(done.flag_rate_after)
        assert done.held_out == 0 and done.margin == 0.0 and done.fpr_bound is None
        assert all(b <= a <= max(b, PV_CAP) for a, b in zip(done.after, done.before, strict=True))
        unseen_rates.append(monitor.flag_rate(unseen))
    with capsys.disabled():
        print(f"\nexact fit at 0.5% on 500 outputs: unseen outputs flag {[round(r, 4) for r in unseen_rates]}")


def test_the_held_out_margin_holds_its_conformal_bound_on_unseen_inputs():
    """With `held_out=True` half the outputs set a split-conformal margin over the fit on the other
    half: the bound it reports (at most 0.5% here) holds on average over calibration draws for
    unseen outputs of the same traffic, and thresholds still only go up, never past a PV's cap."""
    from lmsan_serve.monitor import PV_CAP

    pvs, draws = _calibration_draws(8)
    rates, bounds = [], []
    for draw, (cal, unseen) in enumerate(draws):
        monitor = Monitor(_sig(pvs, [0.7] * 16))
        result = monitor.calibrate(cal, target_fpr=0.005, seed=draw, held_out=True)
        assert result.flag_rate_before > 0.1 and result.flag_rate_after <= 0.005
        assert result.held_out == 250 and result.margin > 0 and result.fpr_bound <= 0.005
        assert all(b <= a <= max(b, PV_CAP) for a, b in zip(result.after, result.before, strict=True))
        assert result.to_dict()["fpr_bound"] == result.fpr_bound
        rates.append(monitor.flag_rate(unseen))
        bounds.append(result.fpr_bound)
    # The bound is on the mean over calibration draws, not on one draw: a draw's own rate spreads
    # about as wide as the bound itself (the margin sits at the largest excess of 250 held-out
    # outputs), so the mean of 8 draws stays under twice the bound unless it lands about three
    # standard deviations high.
    assert sum(rates) / len(rates) <= 2 * max(bounds), rates


def test_calibration_on_few_inputs_reports_a_bound_above_the_target():
    """Under 2 * (1 / target - 1) inputs the held-out half cannot show a 0.5% rate: the margin
    then clears all of it, and the bound says what that is worth."""
    gen = torch.Generator().manual_seed(2)
    pvs = torch.randn(16, 384, generator=gen).sign()
    monitor = Monitor(_sig(pvs, [0.7] * 16))
    cal = _tilted_clean(gen, pvs, 100)
    result = monitor.calibrate(cal, target_fpr=0.005, held_out=True)
    assert result.held_out == 50 and result.fpr_bound == pytest.approx(1 / 51, abs=1e-6)
    assert result.flag_rate_after == 0.0 and not monitor(cal).flagged.any()
    from lmsan_serve.monitor import inputs_for_bound

    need = inputs_for_bound(0.005)
    for n, holds in ((need, True), (need - 2, False)):
        done = Monitor(_sig(pvs, [0.7] * 16)).calibrate(_tilted_clean(gen, pvs, n), target_fpr=0.005,
                                                            held_out=True)
        assert (done.fpr_bound <= 0.005) == holds, (n, done.fpr_bound)


def test_the_held_out_margin_keeps_catching_blends_of_three_triggers():
    """Clean outputs that lean towards the signs two PVs share (up to 95% agreement there) flag
    4% of unseen ones through pair combinations under the exact fit; with the held-out margin
    under 1%. The margin switches some pairs off, yet blends of three PVs, which no PV flags,
    all still flag through the combinations left."""
    gen = torch.Generator().manual_seed(0)
    k, h = 8, 384
    pvs = torch.randn(k, h, generator=gen).sign()

    def clean(n: int) -> torch.Tensor:
        x = torch.randn(n, h, generator=gen)
        for i in range(n):
            a, b = torch.randperm(k, generator=gen)[:2].tolist()
            agree = torch.rand(h, generator=gen) < 0.5 + 0.45 * float(torch.rand(1, generator=gen))
            x[i] = torch.where(pvs[a] == pvs[b], torch.where(agree, pvs[a], -pvs[a]) * x[i].abs(), x[i])
        return x

    cal, unseen = clean(500), clean(5000)
    blends = torch.stack([pvs[torch.randperm(k, generator=gen)[:3]].sum(0) for _ in range(100)])
    blends = blends + 0.3 * torch.randn(blends.shape, generator=gen)
    exact = Monitor(_sig(pvs, [0.85] * k))
    exact.calibrate(cal, target_fpr=0.005, held_out=False)
    assert exact.flag_rate(unseen) > 0.02
    monitor = Monitor(_sig(pvs, [0.85] * k))
    result = monitor.calibrate(cal, target_fpr=0.005, held_out=True)
    assert monitor.flag_rate(unseen) < 0.01 and 0 < result.combinations_off < len(monitor.combos)
    assert not (sign_agreement(blends, pvs) > monitor.thresholds).any()  # no PV catches a blend
    assert monitor(blends).flagged.all()
