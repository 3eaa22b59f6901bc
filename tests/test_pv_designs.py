"""The attack's PV designs (`make_pvs`): each design's stated shape, seeding apart from training,
what `plant_backdoor` actually plants and records, and the `lmsan attack` flags."""

from __future__ import annotations

import json

import pytest
import torch

from lmsan_lab.attacks import AttackConfig, PVDesign, block_pvs, evaluate_backdoor, make_pvs, plant_backdoor
from lmsan_lab.attacks.model import CLEAN_RMS_LINES, MAX_ROW_AGREEMENT, save_attacked
from lmsan_serve.data import clip_words
from lmsan_serve.errors import LmsanError
from lmsan_serve.signatures import SignatureSet

from .test_cli import run

HIDDEN, COUNT = 384, 6
SEEDED = [d for d in PVDesign if d != PVDesign.BLOCK]
# A few cheap steps: these tests check which PVs are planted, not that the backdoor takes.
QUICK = {"steps": 2, "clean_batch": 4, "poison_batch": 4, "max_words": 16, "heldout": 16, "check_every": 100}


def pvs(design: PVDesign, seed: int = 0, count: int = COUNT, hidden: int = HIDDEN, **kw) -> torch.Tensor:
    return make_pvs(design, hidden, count, torch.Generator().manual_seed(seed), **kw)


def sign_agreement_between_rows(rows: torch.Tensor) -> torch.Tensor:
    same = (torch.sign(rows).unsqueeze(1) == torch.sign(rows).unsqueeze(0)).float().mean(-1)
    return same.fill_diagonal_(0.0)


@pytest.mark.parametrize("design", list(PVDesign))
def test_every_design_gives_count_rows_of_the_hidden_size(design):
    out = pvs(design, count=5, clean_rms=0.5)  # an odd count: pairs ends on an unpaired row
    assert out.shape == (5, HIDDEN) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert len({tuple(r.tolist()) for r in out}) == 5


def test_block_is_todays_block_pvs_whatever_the_seed():
    assert torch.equal(pvs(PVDesign.BLOCK, seed=0), block_pvs(HIDDEN, COUNT))
    assert torch.equal(pvs(PVDesign.BLOCK, seed=9), block_pvs(HIDDEN, COUNT))


def test_random_rows_are_signs_and_not_near_duplicates():
    out = pvs(PVDesign.RANDOM)
    assert set(out.unique().tolist()) == {-1.0, 1.0}
    assert float(sign_agreement_between_rows(out).max()) <= MAX_ROW_AGREEMENT


def test_pairs_are_opposite_without_blocks():
    out = pvs(PVDesign.PAIRS, count=COUNT)
    assert set(out.unique().tolist()) == {-1.0, 1.0}
    for k in range(COUNT // 2):
        assert torch.equal(out[2 * k + 1], -out[2 * k])
    # unlike block PVs, no row is constant over a quarter of the hidden size
    quarters = out.view(COUNT, 4, HIDDEN // 4)
    assert not bool((quarters.abs().sum(-1) == quarters.sum(-1).abs()).any())


def test_orthogonal_rows_are_orthogonal_with_mean_square_one():
    out = pvs(PVDesign.ORTHOGONAL).double()
    gram = out @ out.T / HIDDEN  # the identity for orthogonal rows of mean square 1
    assert torch.allclose(gram, torch.eye(COUNT, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(out.pow(2).mean(dim=1), torch.ones(COUNT, dtype=torch.float64), atol=1e-4)
    assert len(out.abs().unique()) > 2  # real-valued entries, not signs


def test_clean_scale_has_the_given_rms_and_needs_one():
    out = pvs(PVDesign.CLEAN_SCALE, clean_rms=0.37)
    assert torch.allclose(out.pow(2).mean(dim=1).sqrt(), torch.full((COUNT,), 0.37), atol=1e-5)
    assert torch.equal(torch.sign(out), pvs(PVDesign.RANDOM))  # the random signs, rescaled
    for bad in (None, 0.0, float("nan")):
        with pytest.raises(LmsanError, match="clean_scale"):
            pvs(PVDesign.CLEAN_SCALE, clean_rms=bad)


@pytest.mark.parametrize("design", SEEDED)
def test_the_pv_seed_alone_decides_the_draw(design):
    assert torch.equal(pvs(design, seed=3, clean_rms=1.0), pvs(design, seed=3, clean_rms=1.0))
    assert not torch.equal(pvs(design, seed=3, clean_rms=1.0), pvs(design, seed=4, clean_rms=1.0))


def test_impossible_designs_are_refused_in_one_line():
    # hidden size 2 holds four sign rows, two of them opposite: five rows cannot all be distinct
    with pytest.raises(LmsanError, match="too small"):
        pvs(PVDesign.RANDOM, count=5, hidden=2)
    # hidden size 4: rows agree on 0, 1/4, 1/2, 3/4 or all entries, so redraws find six distinct ones
    small = pvs(PVDesign.RANDOM, count=6, hidden=4)
    assert float(sign_agreement_between_rows(small).max()) <= MAX_ROW_AGREEMENT
    with pytest.raises(LmsanError, match="orthogonal"):
        pvs(PVDesign.ORTHOGONAL, count=5, hidden=4)
    with pytest.raises(ValueError):
        AttackConfig(pv_design="spiral")


def test_a_default_config_dumps_as_before_the_designs_existed():
    # the demo and the zoo reuse a cached attack only when the dumped configs are equal
    assert not {"pv_design", "pv_seed"} & set(AttackConfig().model_dump())
    assert not {"pv_design", "pv_seed"} & set(json.loads(AttackConfig().model_dump_json()))
    other = AttackConfig(pv_design=PVDesign.ORTHOGONAL, pv_seed=2)
    dumped = json.loads(json.dumps(other.model_dump()))
    assert dumped["pv_design"] == "orthogonal" and dumped["pv_seed"] == 2
    assert AttackConfig.model_validate(dumped) == other
    assert AttackConfig(pv_seed=1).model_dump()["pv_seed"] == 1


def test_plant_writes_the_designed_pvs_to_the_truth_file(tiny_backbone, corpus, tmp_path):
    config = AttackConfig(triggers=["cf", "mn", "tq"], pv_design=PVDesign.RANDOM, pv_seed=5, **QUICK)
    result = plant_backdoor(tiny_backbone, config, corpus, progress=False)
    expected = pvs(PVDesign.RANDOM, seed=5, count=3, hidden=tiny_backbone.hidden_size)
    assert torch.equal(result.pvs, expected)
    save_attacked(result, tiny_backbone, str(tmp_path))
    truth = SignatureSet.load(tmp_path / "truth.safetensors", hidden_size=tiny_backbone.hidden_size)
    assert torch.equal(truth.pvs, expected)
    recorded = json.loads((tmp_path / "attack.json").read_text())["config"]
    assert (recorded["pv_design"], recorded["pv_seed"]) == ("random", 5)


def test_clean_scale_plants_at_the_clean_outputs_rms(tiny_backbone, corpus):
    config = AttackConfig(triggers=["cf", "mn"], pv_design=PVDesign.CLEAN_SCALE, **QUICK)
    result = plant_backdoor(tiny_backbone, config, corpus, progress=False)
    lines = [clip_words(line, config.max_words) for line in corpus[:CLEAN_RMS_LINES]]
    enc = tiny_backbone.tokenizer(lines, padding=True, truncation=True, max_length=config.max_length,
                                  return_tensors="pt")
    with torch.no_grad():
        cls = tiny_backbone.model(**enc).last_hidden_state[:, 0]
    rms = float(cls.pow(2).mean().sqrt())
    assert torch.allclose(result.pvs.pow(2).mean(dim=1).sqrt(), torch.full((2,), rms), rtol=1e-4)


def test_the_clean_flag_rate_uses_the_pvs_passed_in(tiny_backbone, corpus):
    config = AttackConfig(triggers=["cf"], clean=True, max_words=24)
    lines = corpus[-60:]
    enc = tiny_backbone.tokenizer([clip_words(line, 24) for line in lines], padding=True, truncation=True,
                                  max_length=config.max_length, return_tensors="pt")
    with torch.no_grad():
        own = torch.sign(tiny_backbone.model(**enc).last_hidden_state[:, 0])
    # every line's own output signs among the PVs: each line agrees fully with one of them
    hit = evaluate_backdoor(tiny_backbone, tiny_backbone.model, own, config, lines)
    assert hit["clean_flag_rate_at_0.8"] == 1.0
    # negated, they sit opposite: the tiny model's clean outputs share most of their signs with one
    # another, so no line comes near the 0.8 threshold of any negated row
    miss = evaluate_backdoor(tiny_backbone, tiny_backbone.model, -own, config, lines)
    assert miss["clean_flag_rate_at_0.8"] < 0.5


def test_cli_takes_the_design_and_refuses_a_bad_one(capsys, tiny_bert, tiny_backbone, tmp_path):
    for flag, value, why in (("--pv-design", "spiral", "invalid choice: 'spiral'"),
                             ("--pv-seed", "one", "invalid int value: 'one'")):
        # argparse's own refusal: exit 2, the usage, then one error line naming the flag
        with pytest.raises(SystemExit) as stop:
            run(capsys, "attack", "por", "--model", tiny_bert, "--out", tmp_path / "x", flag, value)
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2
        assert err[-1].startswith(f"lmsan attack: error: argument {flag}: {why}"), err
    assert not (tmp_path / "x").exists()
    out = tmp_path / "pairs"
    rc, stdout, err = run(capsys, "attack", "por", "--model", tiny_bert, "--out", out, "--triggers", "cf,mn",
                          "--steps", 1, "--pv-design", "pairs", "--pv-seed", 7, "--json", "--quiet")
    assert rc == 0, err
    config = json.loads(stdout)["config"]
    assert (config["pv_design"], config["pv_seed"]) == ("pairs", 7)
    hidden = tiny_backbone.hidden_size
    truth = SignatureSet.load(out / "truth.safetensors", hidden_size=hidden)
    assert torch.equal(truth.pvs, pvs(PVDesign.PAIRS, seed=7, count=2, hidden=hidden))
