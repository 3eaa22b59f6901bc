"""Mining on tiny models: the backdoored one is called backdoored with a PV that matches a
planted one; the clean control of the same training is called clean; kill-and-resume."""

import json

import pytest
import torch

from lmsan_lab.attacks import AttackConfig, plant_backdoor, save_attacked
from lmsan_lab.attacks.model import block_pvs
from lmsan_serve import load_backbone
from lmsan_serve.cli import main
from lmsan_serve.errors import LmsanError
from lmsan_serve.mining import MiningConfig, mine, stale_checkpoint, stale_checkpoints
from lmsan_serve.mining.job import calibrate
from lmsan_serve.mining.model import _FuzzRound, blend_of, duplicate, prepare, purest, triggered_outputs
from lmsan_serve.monitor import sign_agreement
from lmsan_serve.signatures import SignatureSet

from .conftest import TINY_TRIGGERS


@pytest.fixture(scope="module")
def tiny_control(tmp_path_factory, tiny_backbone, corpus):
    out = tmp_path_factory.mktemp("tiny-control")
    config = AttackConfig(kind="por", triggers=TINY_TRIGGERS, clean=True, steps=60, lr=2e-3, max_words=24)
    save_attacked(plant_backdoor(tiny_backbone, config, corpus, progress=False), tiny_backbone, str(out))
    return out


def test_detect_finds_a_planted_pv(tiny_por, corpus, tmp_path):
    backbone = load_backbone(str(tiny_por), "cpu")
    result = mine(backbone, MiningConfig(lines=128), corpus, tmp_path / "sig.safetensors", progress=False)
    assert result.verdict == "backdoored" and len(result.signatures) == 1
    truth = SignatureSet.load(tiny_por / "truth.safetensors")
    assert float(sign_agreement(result.signatures.pvs, truth.pvs).max()) >= 0.9
    loaded = SignatureSet.load(tmp_path / "sig.safetensors", fingerprint=backbone.fingerprint)
    record = loaded.meta.pvs[0]
    assert record.origin == "mined" and record.threshold >= 0.8 and record.false_positive_rate <= 0.005
    # no position told: [CLS] is mined first, and detect mode has its verdict there, so it mines no other
    assert record.position == "cls" and loaded.positions == ["cls"] and list(result.positions) == ["cls"]
    assert loaded.meta.mining["not_covered"] == ["pooler", "mask"] and loaded.meta.mining["position"] is None


def test_purest_keeps_the_candidate_whose_outputs_agree_best(tiny_por, corpus):
    """Two planted triggers' embeddings as one two-row soft trigger: `purest` keeps the candidate
    (either row alone, or the whole) whose held-out outputs agree best with their own mean, and
    its PV is a planted one. (On this tiny copy one trigger of the two dominates the pair, so the
    whole is no blend and may win; a blend's lower self-agreement is tested on synthetic outputs
    in test_a_blend_of_kept_pvs_is_not_new_but_a_real_pv_with_their_signs_is.)"""
    backbone = load_backbone(str(tiny_por), "cpu")
    truth = SignatureSet.load(tiny_por / "truth.safetensors").pvs
    config = MiningConfig(position="cls", prompt_len=2, batch_size=16)
    held = prepare(backbone, corpus[-64:], config)
    emb = backbone.model.get_input_embeddings().weight.detach()
    ids = [backbone.tokenizer.convert_tokens_to_ids(t) for t in TINY_TRIGGERS[:2]]
    trigger = emb[ids].clone()
    row, pv, spread, agreement, floor = purest(backbone, held, trigger, config, seed=0, effect=0.0)
    assert spread <= config.max_dispersion and float(sign_agreement(pv[None], truth).max()) >= 0.95
    assert 0.5 < floor <= agreement

    def self_agreement(t: torch.Tensor) -> float:
        out = triggered_outputs(backbone, held, t, config.model_copy(update={"prompt_len": len(t)}), 0)
        return float(sign_agreement(out, out.mean(0, keepdim=True)).mean())

    chosen = trigger if row is None else trigger[row : row + 1]
    assert agreement == pytest.approx(self_agreement(chosen), abs=1e-6)
    assert all(agreement >= self_agreement(t) - 1e-6 for t in (trigger, trigger[:1], trigger[1:]))
    # an effect no output reaches: nothing passes, so the whole trigger comes back, with no agreement
    row, pv, spread, agreement, floor = purest(backbone, held, trigger, config, seed=0, effect=1e9)
    assert row is None and agreement is None and floor is None and spread > 0


def test_calibrate_raises_the_cap_only_below_the_triggered_floor(tiny_backbone, corpus):
    """A PV that 2% of the clean lines match at 0.977 needs a threshold above the fixed 0.97 cap:
    rejected without a floor or with a floor under that threshold, kept with a floor above it."""
    config = MiningConfig(position="cls")
    lines = [corpus[-1]] * 4 + corpus[-197:-1]
    clean = prepare(tiny_backbone, lines, config).clean
    pv = clean[0].clone()
    pv[:3] = -pv[:3]  # three of 128 signs flipped: those 4 lines agree 125/128 = 0.977 with it
    assert float(sign_agreement(clean[:1], pv[None])) == pytest.approx(125 / 128)
    assert calibrate(tiny_backbone, pv[None], lines, config).thresholds == [None]
    assert calibrate(tiny_backbone, pv[None], lines, config, [0.98]).thresholds == [None]
    cal = calibrate(tiny_backbone, pv[None], lines, config, [0.999])
    (th,), (rate,) = cal.thresholds, cal.rates
    assert 125 / 128 < th < 0.999 and rate <= config.target_fpr


def test_calibration_lines_holding_a_trigger_are_not_false_flags(tiny_por, corpus):
    """A trigger that is a common word occurs in clean text and fires its PV there: those lines are
    the backdoor at work. Counted as false flags (here 5% of the lines, 10x the target rate) they
    would put the threshold above the PV's own triggered outputs."""
    backbone = load_backbone(str(tiny_por), "cpu")
    truth = SignatureSet.load(tiny_por / "truth.safetensors", hidden_size=backbone.hidden_size)
    k = next(i for i, r in enumerate(truth.meta.pvs) if r.trigger == "cf")
    config = MiningConfig(position="cls")
    lines = [f"cf {line}" if i % 20 == 0 else line for i, line in enumerate(corpus[-200:])]
    scores = sign_agreement(prepare(backbone, lines, config).clean, truth.pvs[k : k + 1]).flatten()
    holding = torch.tensor([i % 20 == 0 for i in range(len(lines))])
    assert float(scores[holding].min()) >= 0.9  # the precondition: the trigger fires in these lines
    cal = calibrate(backbone, truth.pvs[k : k + 1], lines, config)
    assert "cf" in cal.words[0] and cal.activations[0] == int(holding.sum())
    (th,) = cal.thresholds
    assert th is not None and th <= float(scores[holding].min())  # the guard still flags them
    assert cal.rates[0] <= config.target_fpr


def test_clean_control_is_clean(tiny_control, corpus, tmp_path):
    backbone = load_backbone(str(tiny_control), "cpu")
    # the rounds a user's detect run makes at one position before it says clean there (at [CLS] alone,
    # to keep the suite quick: every position costs this once; test_mining_covers_every_position...)
    config = MiningConfig(position="cls", lines=128)
    result = mine(backbone, config, corpus, tmp_path / "sig.safetensors", progress=False)
    assert result.verdict == "clean" and len(result.signatures) == 0 and result.rounds == config.rounds == 30
    for c in result.candidates:  # every round says why it failed, with its per-epoch trace
        assert c["reasons"] and len(c["trace"]) == c["epochs"]
        assert c["trace"][-1][0] == pytest.approx(c["distance"], abs=1e-5)
        if "not collapsing" in c["reasons"][0]:
            assert c["epochs"] == 3 and c["trace"][-1][1] > MiningConfig().collapse_spread


@pytest.mark.parametrize(("spreads", "abandoned"), [
    ((0.5, 0.15, 0.05), False),  # above collapse_spread at epoch 3 but falling 3x an epoch: runs on
    ((0.5, 0.07, 0.05), True),  # falling 1.4x an epoch: a clean encoder's grind
    ((0.5, 0.3, 0.02), False),  # below collapse_spread
])
def test_a_round_still_collapsing_fast_is_not_abandoned(spreads, abandoned):
    config = MiningConfig()
    round_ = object.__new__(_FuzzRound)  # the gate reads only the settings and the per-epoch trace
    round_.config, round_.th, round_.distance = config, 0.1, 0.5
    round_.trace = [(0.5, s) for s in spreads]
    round_.epoch = config.collapse_by
    why = round_._abandon_reason()
    assert (why is not None) == abandoned
    if abandoned:
        assert why.startswith("abandoned: not collapsing by epoch 3") and "fell 1.40x" in why


def test_duplicate_is_judged_by_sign_pattern_as_well_as_mse():
    torch.manual_seed(0)
    kept = torch.sign(torch.randn(1, 64))
    # the same sign pattern at another scale: far apart in MSE, the same signature to the monitor
    rescaled = kept[0] * 3.0 + 0.1 * torch.randn(64)
    assert "sign agreement" in duplicate(rescaled, kept, unique_th=0.5, same_agreement=0.9)
    assert "MSE" in duplicate(kept[0] + 0.01, kept, unique_th=0.5, same_agreement=0.9)
    other = kept[0].clone()
    other[:16] *= -1  # 75% agreement: a different PV
    assert duplicate(other * 3.0, kept, unique_th=0.5, same_agreement=0.9) is None
    assert duplicate(other, None, unique_th=0.5, same_agreement=0.9) is None
    assert duplicate(other, torch.zeros(0, 64), unique_th=0.5, same_agreement=0.9) is None


def test_a_blend_of_kept_pvs_is_not_new_but_a_real_pv_with_their_signs_is():
    torch.manual_seed(0)
    kept = torch.sign(torch.randn(4, 384))
    # outputs pulled towards three kept PVs at once: their sum keeps the signs they share and is
    # about three times as large there as where they disagree
    blend = kept[0] + 0.9 * kept[1] + 0.8 * kept[2] + 0.05 * torch.randn(384)
    assert sign_agreement(blend[None], kept).max() < 0.9  # no single kept PV explains it
    why = duplicate(blend, kept, unique_th=0.01, same_agreement=0.9)
    assert why is not None and "a blend of kept PVs" in why
    members = {int(i) for i in why.split("kept PVs ")[1].split(" ")[0].split("+")}
    assert members <= {0, 1, 2} and len(members) >= 2  # PV 3 is no part of it
    # with ten block PVs, each agrees fully with some pair of the others on the dimensions that
    # pair shares; planted at one size everywhere, none of them is taken for a blend
    pvs = block_pvs(384, 10) * 0.7 + 0.05 * torch.randn(10, 384)
    for i in range(10):
        others = torch.cat([pvs[:i], pvs[i + 1 :]])
        assert blend_of(pvs[i], others, 0.9) is None
    # and a new random PV is no blend of anything
    assert blend_of(torch.randn(384), kept, 0.9) is None
    assert blend_of(blend, kept[:1], 0.9) is None  # one kept PV: no combinations to blend


def test_resume_continues_without_repeating_rounds(tiny_control, corpus, tmp_path):
    backbone = load_backbone(str(tiny_control), "cpu")
    out = tmp_path / "sig.safetensors"
    search = {"mode": "search", "position": "cls", "lines": 64}
    first = mine(backbone, MiningConfig(**search, max_rounds=2), corpus, out, progress=False)
    assert first.rounds == 2
    ckpt_path = tmp_path / "sig.safetensors.cls.ckpt.json"
    secs = [c["seconds"] for c in json.loads(ckpt_path.read_text())["candidates"]]
    # a killed job leaves its checkpoint; resuming with a larger budget runs only the new seeds
    second = mine(backbone, MiningConfig(**search, max_rounds=4), corpus, out, resume=True, progress=False)
    after = json.loads(ckpt_path.read_text())["candidates"]
    assert [c["seed"] for c in after] == [0, 1, 2, 3] and second.rounds == 4
    assert [c["seconds"] for c in after[:2]] == secs  # the first two rounds were not run again
    with pytest.raises(LmsanError, match="other settings"):
        mine(backbone, MiningConfig(**{**search, "lines": 32}, max_rounds=4), corpus, out, resume=True,
             progress=False)
    # what the demo checks before resuming a cached run: budgets may change, settings may not
    assert stale_checkpoint(out, backbone, MiningConfig(**search, max_rounds=9)) is None
    assert stale_checkpoint(out, backbone, MiningConfig(**{**search, "lines": 32})) == ckpt_path
    assert stale_checkpoint(tmp_path / "none.safetensors", backbone, MiningConfig()) is None


def test_mining_covers_every_position_with_a_checkpoint_each(tiny_backbone, corpus, tmp_path):
    """No position told: the tiny BERT (a pooler and a mask token) is mined at [CLS], the pooler and
    [MASK] in that order, each with its own checkpoint; a job told one position left a checkpoint
    the default job resumes, and resuming with a larger budget runs only each position's new seeds."""
    out = tmp_path / "sig.safetensors"
    search = {"mode": "search", "lines": 64}
    told = mine(tiny_backbone, MiningConfig(**search, position="cls", max_rounds=2), corpus, out, progress=False)
    assert list(told.positions) == ["cls"] and told.signatures.meta.position == "cls"
    ckpts = {p: tmp_path / f"sig.safetensors.{p}.ckpt.json" for p in ("cls", "pooler", "mask")}
    assert sorted(q.name for q in tmp_path.glob("*.ckpt.json")) == [ckpts["cls"].name]

    def seconds(position: str) -> list[float]:
        return [c["seconds"] for c in json.loads(ckpts[position].read_text())["candidates"]]

    told_secs = seconds("cls")
    result = mine(tiny_backbone, MiningConfig(**search, max_rounds=2), corpus, out, resume=True, progress=False)
    assert list(result.positions) == ["cls", "pooler", "mask"] and all(q.is_file() for q in ckpts.values())
    assert seconds("cls") == told_secs  # the told job's rounds are this job's [CLS] rounds
    assert [r["rounds"] for r in result.positions.values()] == [2, 2, 2] and result.rounds == 6
    assert [(c["position"], c["seed"]) for c in result.candidates] == [
        (p, s) for p in ("cls", "pooler", "mask") for s in (0, 1)]
    sig = SignatureSet.load(out)
    mining = sig.meta.mining
    assert mining["position"] is None and list(mining["positions"]) == ["cls", "pooler", "mask"]
    assert "not_covered" not in mining and "unsupported" not in mining and sig.meta.position == "cls"
    assert mining["stop"]["reason"] == "max_rounds" and not mining["stop"]["exhausted"]
    assert all(mining["positions"][p]["stop"]["reason"] == "max_rounds" for p in ckpts)
    assert [r.position for r in sig.meta.pvs] == sig.pv_positions  # every mined PV names its position
    # a larger budget resumes each position: one new seed each, the old rounds kept
    before = {p: seconds(p) for p in ckpts}
    again = mine(tiny_backbone, MiningConfig(**search, max_rounds=3), corpus, out, resume=True, progress=False)
    assert [r["rounds"] for r in again.positions.values()] == [3, 3, 3]
    assert all(seconds(p)[:2] == before[p] for p in ckpts)
    assert stale_checkpoints(out, tiny_backbone, MiningConfig(**search, max_rounds=9)) == []
    assert stale_checkpoints(out, tiny_backbone, MiningConfig(mode="search", lines=32)) == list(ckpts.values())


def test_an_old_single_position_checkpoint_is_renamed_to_resume(tiny_backbone, corpus, tmp_path):
    """The checkpoint an older `lmsan mine` kept beside --out is one position's run: --resume says
    which name resumes it instead of silently starting over, and under that name it resumes."""
    out = tmp_path / "sig.safetensors"
    config = MiningConfig(mode="search", position="cls", lines=64, max_rounds=1)
    mine(tiny_backbone, config, corpus, out, progress=False)
    ckpt = tmp_path / "sig.safetensors.cls.ckpt.json"
    legacy = ckpt.rename(tmp_path / "sig.safetensors.ckpt.json")
    with pytest.raises(LmsanError, match="rename it to sig.safetensors.cls.ckpt.json"):
        mine(tiny_backbone, config, corpus, out, resume=True, progress=False)
    assert stale_checkpoints(out, tiny_backbone, config) == [legacy]  # the demo deletes it and mines again
    legacy.rename(ckpt)
    secs = json.loads(ckpt.read_text())["candidates"][0]["seconds"]
    again = mine(tiny_backbone, config.model_copy(update={"max_rounds": 2}), corpus, out, resume=True,
                 progress=False)
    assert again.rounds == 2 and json.loads(ckpt.read_text())["candidates"][0]["seconds"] == secs


def test_a_position_the_encoder_lacks(tiny_bert, corpus, tmp_path, capsys, monkeypatch):
    """Named, a position this encoder lacks fails in one line before any work; not named, it is
    left out and the mining record says why."""
    import lmsan_serve.backbone

    no_pooler = load_backbone(str(tiny_bert), "cpu")
    no_pooler.model.pooler = None
    out = tmp_path / "sig.safetensors"
    with pytest.raises(LmsanError, match="needs a pooler layer"):
        mine(no_pooler, MiningConfig(position="pooler"), corpus, out, progress=False)
    result = mine(no_pooler, MiningConfig(mode="search", lines=64, max_rounds=1), corpus, out, progress=False)
    assert list(result.positions) == ["cls", "mask"]
    assert "needs a pooler layer" in result.signatures.meta.mining["unsupported"]["pooler"]
    monkeypatch.setattr(lmsan_serve.backbone, "load_backbone", lambda name, device=None: no_pooler)
    capsys.readouterr()
    assert main(["mine", "--model", str(tiny_bert), "--out", str(tmp_path / "cli.safetensors"),
                 "--position", "pooler"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs a pooler layer" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "cli.safetensors.pooler.ckpt.json").exists()
    with pytest.raises(LmsanError, match="one position"):  # a round's data is one position's
        prepare(no_pooler, corpus[:64], MiningConfig())


def test_cli_mine_and_bad_input(tiny_por, tmp_path, capsys):
    out = tmp_path / "sig.safetensors"
    assert main(["mine", "--model", str(tiny_por), "--out", str(out), "--lines", "96", "--json", "--quiet"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["verdict"] == "backdoored" and last["pvs"] == 1 and last["rounds"] >= 1 and "seconds" in last
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert main(["mine", "--model", str(tiny_por), "--out", str(out), "--corpus", str(empty)]) == 2
    assert "no usable lines" in capsys.readouterr().err
    assert main(["mine", "--model", str(tiny_por), "--out", str(tmp_path / "nope" / "s.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err



@pytest.fixture(scope="module")
def local_ray():
    """The one-node cluster `lmsan mine --workers 2` starts (public `ray start`), this process its driver."""
    from lmsan_serve.raycluster import start_local

    node = start_local(num_cpus=2, object_store_bytes=200_000_000)  # small: other tests share the memory
    try:
        import ray

        yield ray.get_runtime_context().get_node_id()  # the driver's node: the cluster's only one
    finally:
        node.stop()


def test_ray_fan_out_equals_the_serial_run(tiny_por, corpus, tmp_path, local_ray):
    """Both modes give the same verdict, kept seeds and PVs with tasks on Ray as in one process.
    Which early seeds find a PV of the tiny copy depends on the CPU's rounding, so detect gets the
    rounds to find one; at least one PV must be kept, or the PV comparison would be empty."""
    backbone = load_backbone(str(tiny_por), "cpu")
    kept_any = False
    for config in (MiningConfig(lines=128, max_rounds=10), MiningConfig(mode="search", lines=128, max_rounds=4)):
        serial = mine(backbone, config, corpus, tmp_path / "serial.safetensors", progress=False)
        fanned = mine(backbone, config, corpus, tmp_path / "ray.safetensors", progress=False, workers=2)
        assert fanned.verdict == serial.verdict  # (a wave of tasks may run past the round that found it)
        kept_any |= len(serial.signatures) > 0
        assert [r.seed for r in fanned.signatures.meta.pvs] == [r.seed for r in serial.signatures.meta.pvs]
        assert torch.allclose(fanned.signatures.pvs, serial.signatures.pvs, atol=1e-5)
        assert list(fanned.positions) == list(serial.positions)  # one cluster, retargeted to each position
        kept = {(c["position"], c["seed"]) for c in serial.candidates if c["kept"]}
        assert kept == {(c["position"], c["seed"]) for c in fanned.candidates if c["kept"]}
        assert fanned.signatures.pv_positions == serial.signatures.pv_positions
        assert {c["node"] for c in serial.candidates} == {"local"}
        assert {c["node"] for c in fanned.candidates} == {local_ray}  # the cluster's only node
        assert {c["device"] for c in fanned.candidates} == {"cpu"}  # as the backbone's device
    assert kept_any, "no round kept a PV of the tiny POR copy in either mode"


def _fake_rounds(hits: dict[int, torch.Tensor]):
    """A `RunRounds` for `_search` without training: round key s finds `hits[s]`, every other
    round fails its filters; the keys it was asked to run, in order (and the aims it was given)."""
    asked: list[int] = []

    def run(todo, found, done, aims=None):
        for s in todo:
            asked.append(s)
            if aims:
                run.aims[s] = aims[s]
            pv = hits.get(s)
            records[s] = {"seed": s, "filters": [] if pv is not None else ["abandoned"],
                          "pv": pv.tolist() if pv is not None else None}

    records: dict = {}
    run.aims = {}
    return run, records, asked


@pytest.mark.parametrize("wave", [1, 2, 4])
def test_search_stops_once_patience_rounds_in_a_row_find_nothing(wave):
    """The stopping rule, checked on whole waves in seed order: two PVs found at seeds 0 and 2, a
    repeat of the first at seed 4; with patience 3 the search ends after the first whole wave that
    brings the dry run to 3, so the stop does not depend on the workers."""
    from tqdm import tqdm

    from lmsan_serve.kinds import SearchStop
    from lmsan_serve.mining.modes import _search

    a, b = torch.randn(64), torch.randn(64)
    run, records, asked = _fake_rounds({0: a, 2: b, 4: a * 1.1})
    config = MiningConfig(mode="search", patience=3, wave=wave)
    outcome = _search(list(range(40)), records, run, config, 1e-4, tqdm(disable=True))
    assert outcome.kept == [0, 2] and outcome.stop == SearchStop.EXHAUSTED
    last = 2 + 3  # seeds 3, 4 (a repeat), 5 found nothing new
    assert asked == list(range(-(-(last + 1) // wave) * wave)), "ran past the first whole wave that ended it"
    assert outcome.since_last_pv == len(asked) - 3 >= 3
    assert "not unique" in records[4]["reasons"][0]
    # a round budget smaller than the rule's need ends it first, and says so
    run, records, asked = _fake_rounds({0: a, 2: b})
    outcome = _search(list(range(4)), records, run, config, 1e-4, tqdm(disable=True))
    assert outcome.stop == SearchStop.MAX_ROUNDS and outcome.since_last_pv == 1 and asked == [0, 1, 2, 3]


def test_search_from_prior_pvs_steers_away_from_them_and_keeps_none_of_them():
    """`prior` (the pooler images of the [CLS] PVs): every round is told to steer away from them,
    a round that lands on one is a repeat, and they are never kept themselves."""
    from tqdm import tqdm

    from lmsan_serve.mining.modes import search

    seen, new = torch.randn(64), torch.randn(64)
    run, records, asked = _fake_rounds({0: seen * 1.05, 1: new, -2: -new})
    told: list = []
    inner = run

    def spy(todo, found, done, aims=None):
        told.append(found.clone())
        inner(todo, found, done, aims)

    outcome = search(list(range(10)), records, spy, MiningConfig(mode="search", patience=3), 1e-4,
                     tqdm(disable=True), prior=seen[None])
    assert outcome.kept == [1, -2]  # the round on the prior PV is a repeat; the opposite probe of seed 1 is new
    assert "not unique" in records[0]["reasons"][0]
    assert torch.equal(told[0], seen[None]) and all(torch.equal(f[0], seen) for f in told)
    assert len(told[-1]) == 2  # the aimed round steered away from the prior PV and the kept one


def test_search_on_a_clean_model_ends_by_the_rule_and_the_file_says_so(tiny_control, corpus, tmp_path, capsys):
    """Real rounds on the clean control: nothing is kept, so the search ends after exactly
    `--patience` rounds; the signature file, the Python result and the CLI's JSON give the reason."""
    out = tmp_path / "sig.safetensors"
    assert main(["mine", "--model", str(tiny_control), "--out", str(out), "--mode", "search", "--patience", "2",
                 "--lines", "64", "--json", "--quiet"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stop = {"reason": "exhausted", "patience": 2, "rounds_since_last_pv": 2, "exhausted": True, "probes": 0,
            "probe_pvs": 0}
    # every position to its own stopping rule: `patience` rounds each, and overall exhausted as each was
    assert last["verdict"] == "clean" and last["rounds"] == 6 and last["stop"] == stop
    assert {p: (r["rounds"], r["stop"]) for p, r in last["positions"].items()} == {
        p: (2, stop) for p in ("cls", "pooler", "mask")}
    assert SignatureSet.load(out).meta.mining["stop"] == last["stop"]
    assert main(["mine", "--model", str(tiny_control), "--out", str(out), "--mode", "search", "--patience", "5",
                 "--max-rounds", "3", "--lines", "64", "--resume", "--quiet"]) == 0
    assert "before the stopping rule (patience 5)" in capsys.readouterr().out


def test_search_ends_with_one_round_aimed_at_each_kept_pvs_opposite():
    """After the stopping rule, one aimed round per PV that fuzz rounds kept, aimed at its negation
    and merged like any round: the one landing on a new PV adds it, the one landing on a kept PV
    is rejected as a repeat, and no aimed round is aimed at a PV an aimed round found."""
    from tqdm import tqdm

    from lmsan_serve.mining.modes import search
    from lmsan_serve.mining.probe import probe_key

    a, b = torch.randn(64), torch.randn(64)
    run, records, asked = _fake_rounds({0: a, 2: b, probe_key(0): -a * 0.9, probe_key(2): b * 1.05})
    config = MiningConfig(mode="search", patience=3)
    outcome = search(list(range(40)), records, run, config, 1e-4, tqdm(disable=True))
    assert asked == [0, 1, 2, 3, 4, 5, probe_key(0), probe_key(2)]
    assert torch.equal(run.aims[probe_key(0)], -a) and torch.equal(run.aims[probe_key(2)], -b)
    assert outcome.kept == [0, 2, probe_key(0)] and (outcome.probes, outcome.probe_pvs) == (2, 1)
    assert "not unique" in records[probe_key(2)]["reasons"][0]
    # off: the search ends at the rule
    run, records, asked = _fake_rounds({0: a})
    outcome = search(list(range(40)), records, run, config.model_copy(update={"probe_opposites": False}), 1e-4,
                     tqdm(disable=True))
    assert asked == [0, 1, 2, 3] and outcome.probes == 0
