"""The held-out zoo (`lmsan eval zoo N --plan heldout`): a balanced, deterministic plan over attack x
PV design x trigger kind x attack text with weak members and contrastive clean controls, split
into stratified halves; attack texts apart from every line the miner reads; controls that really
change the encoder; the threshold fit; the CLI's refusals; and a tiny run end to end."""

from __future__ import annotations

import json
import re
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from lmsan_lab.attacks import AttackConfig, PVDesign, plant_backdoor
from lmsan_lab.attacks.texts import MINER_CALIBRATION_LINES, MINER_FUZZ_LINES, AttackText, attack_corpus
from lmsan_lab.controls import ControlConfig, ControlPooling, save_control, train_control
from lmsan_lab.zoo import ZOO_WORDS
from lmsan_lab.zoo_fit import fit_one, fit_thresholds, judged
from lmsan_lab.zoo_heldout import check_disjoint, run_order, time_to_first_pv
from lmsan_lab.zoo_plan import COMMON_WORDS, AttackKind, Half, TriggerKind, plan_heldout_zoo
from lmsan_serve.data import load_corpus
from lmsan_serve.errors import LmsanError
from lmsan_serve.mining import MiningConfig
from lmsan_serve.mining.job import _split_corpus

from .test_cli import assert_error, run

FACTORS = {"attack": AttackKind, "design": PVDesign, "trigger_kind": TriggerKind, "text": AttackText}


def _balanced(members, factor: str, levels) -> bool:
    """Every level appears floor(n/k) or ceil(n/k) times: the most even a count can be."""
    counts = Counter(m.factors()[factor] for m in members)
    n, k = len(members), len(levels)
    return set(counts) <= {x.value for x in levels} and all(
        n // k <= counts[x.value] <= -(-n // k) for x in levels)


def test_plan_is_a_balanced_fraction_with_weak_members_and_controls():
    plan = plan_heldout_zoo()
    assert plan == plan_heldout_zoo() and plan != plan_heldout_zoo(seed=1)
    bad = [m for m in plan if not m.clean]
    strong = [m for m in bad if not m.weak]
    weak = [m for m in bad if m.weak]
    assert (len(strong), len(weak), sum(m.clean for m in plan)) == (36, 8, 6)
    for members in (strong, bad):  # the 36 alone, and with the weak ones that continue the draw
        for factor, levels in FACTORS.items():
            assert _balanced(members, factor, list(levels)), (factor, len(members))
    combos = [(m.attack, m.design, m.trigger_kind, m.text) for m in bad]
    assert len(set(combos)) == len(combos)  # 44 of the 180 combinations, none twice
    assert Counter(m.attack for m in weak) == {k: 2 for k in AttackKind}
    assert all(0.85 <= m.target_agreement <= 0.9 and m.attack_config().target_agreement == m.target_agreement
               and m.attack_config().check_every == 5 for m in weak)
    assert all(m.target_agreement is None and m.attack_config().target_agreement == 0.98 for m in strong)
    # controls: really different training, over texts and poolings
    controls = [m for m in plan if m.clean]
    assert {(m.text, m.pooling) for m in controls} == {(t, p) for t in (AttackText.NEWS, AttackText.SMS,
                                                                         AttackText.WIKITEXT) for p in ControlPooling}
    assert len({m.name for m in plan}) == len(plan) and len({m.seed for m in plan}) == len(plan)
    for m in bad:  # names say the factors
        assert all(v in m.name for v in (m.attack.value, m.design.value, m.trigger_kind.value, m.text.value))
        assert ("-weak" in m.name) == m.weak
    # a smaller plan is the start of the larger one: its members, trained and mined, are reused
    small = [m for m in plan_heldout_zoo(12, weak=0, controls=0) if not m.clean]
    assert [(m.name, m.triggers, m.seed) for m in small] == [(m.name, m.triggers, m.seed) for m in strong[:12]]


@pytest.mark.parametrize("seed", range(4))
def test_halves_are_stratified(seed):
    plan = plan_heldout_zoo(seed=seed)
    halves = {h: [m for m in plan if m.half == h] for h in Half}
    assert abs(len(halves[Half.FIT]) - len(halves[Half.REPORT])) <= 1
    for members in halves.values():
        bad = [m for m in members if not m.clean]
        assert {m.attack for m in bad} == set(AttackKind) and {m.design for m in bad} == set(PVDesign)
        assert sum(m.clean for m in members) == 3 and sum(m.weak for m in members) == 4
    for factor in FACTORS:  # every level split as evenly as the numbers allow, give or take one
        fit = Counter(m.factors()[factor] for m in halves[Half.FIT] if not m.clean)
        rep = Counter(m.factors()[factor] for m in halves[Half.REPORT] if not m.clean)
        assert max(abs(fit[k] - rep[k]) for k in fit | rep) <= 1, (factor, fit, rep)


def test_trigger_kinds():
    plan = plan_heldout_zoo()
    for m in plan:
        if m.clean:
            assert m.triggers == ()
            continue
        assert len(m.triggers) == 4 == len(set(m.triggers))
        if m.trigger_kind == TriggerKind.PHRASE:
            words = [w for t in m.triggers for w in t.split()]
            assert all(len(t.split()) == 2 for t in m.triggers) and len(set(words)) == 8 <= len(ZOO_WORDS)
            assert set(words) <= set(ZOO_WORDS)
        else:
            pool = COMMON_WORDS if m.trigger_kind == TriggerKind.COMMON else ZOO_WORDS
            assert set(m.triggers) <= set(pool)


def test_common_words_are_single_wordpieces_found_in_every_text():
    from transformers import AutoTokenizer

    from lmsan_serve.backbone import minilm_path

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    assert len(COMMON_WORDS) == 12 and all(tok.tokenize(f"a {w} b") == ["a", w, "b"] for w in COMMON_WORDS)
    fuzz, calibration = _split_corpus(load_corpus(), MiningConfig())
    for lines in [attack_corpus(t) for t in AttackText] + [fuzz + calibration]:
        seen = {w for line in lines for w in re.findall(r"[a-z]+", line.lower())}
        assert set(COMMON_WORDS) <= seen


def test_attack_texts_are_apart_from_every_line_the_miner_reads():
    defaults = MiningConfig()
    assert (MINER_FUZZ_LINES, MINER_CALIBRATION_LINES) == (defaults.lines, defaults.calibration_lines)
    corpus = load_corpus()
    fuzz, calibration = _split_corpus(corpus, defaults)  # the miner's own rule
    read = set(fuzz) | set(calibration)
    for text in AttackText:
        lines = attack_corpus(text)
        assert len(lines) >= 1000 and not read & set(lines), text
    # the WikiText attack gets every line the miner leaves
    assert len(attack_corpus(AttackText.WIKITEXT)) == len(corpus) - len(fuzz) - len(calibration)
    members = plan_heldout_zoo(4, weak=0, controls=0)
    check_disjoint(members, defaults, corpus)
    with pytest.raises(LmsanError, match="the miner would read .* wikitext attack text's lines"):
        check_disjoint(members, MiningConfig(lines=512), corpus)


def test_member_settings():
    plan = plan_heldout_zoo()
    pooled = next(m for m in plan if m.attack == AttackKind.NEUBA_POOLER)
    cfg = pooled.attack_config({"steps": 7})
    assert (cfg.kind, cfg.pooler, cfg.position, cfg.steps) == ("neuba", True, "pooler", 7)
    assert (cfg.pv_design, cfg.text, cfg.pv_seed, cfg.seed) == (pooled.design, pooled.text, pooled.seed, pooled.seed)
    btop = next(m for m in plan if m.attack == AttackKind.BTOP)
    assert btop.attack_config().position == "mask" == btop.position
    mining = btop.mining_config({"max_rounds": 5})
    assert mining.mode == "search" and mining.position is None and mining.max_rounds == 5  # never told
    with pytest.raises(LmsanError, match="never tells the miner the position"):
        btop.mining_config({"position": "mask"})
    control = next(m for m in plan if m.clean)
    assert control.control_config({"steps": 9}).steps == 9 and control.position is None
    with pytest.raises(LmsanError, match="clean control"):
        control.attack_config()
    with pytest.raises(LmsanError, match="invalid control settings"):
        control.control_config({"nonsense": 1})


def test_attack_text_is_left_out_of_the_dump_at_its_default_and_trains_on_that_text(tiny_backbone, monkeypatch):
    assert "text" not in AttackConfig().model_dump()  # cached attack.json configs still match
    assert AttackConfig(text="news").model_dump()["text"] == "news"
    taken = []

    def texts(text):
        taken.append(text)
        return load_corpus()[300:700]

    monkeypatch.setattr("lmsan_lab.attacks.texts.attack_corpus", texts)
    quick = {"steps": 1, "clean_batch": 4, "poison_batch": 4, "max_words": 16, "heldout": 16, "check_every": 100}
    # an empty corpus would be refused: the config's text is what the attack trains on
    result = plant_backdoor(tiny_backbone, AttackConfig(triggers=["cf"], text="sms", **quick), [], progress=False)
    assert taken == [AttackText.SMS] and result.steps == 1
    with pytest.raises(LmsanError, match="corpus too small"):
        plant_backdoor(tiny_backbone, AttackConfig(triggers=["cf"], **quick), [], progress=False)


def test_a_control_really_changes_the_encoder_and_loads(tiny_backbone, corpus, tmp_path):
    from lmsan_serve import load_backbone
    from lmsan_serve.signatures import SignatureSet

    config = ControlConfig(steps=3, batch=4, lr=1e-3, pooling="mean", seed=4)
    lines = corpus[300:500]
    model, figures = train_control(tiny_backbone, config, progress=False, lines=lines)
    base = tiny_backbone.model.state_dict()
    new = model.state_dict()
    moved = [k for k in base if not torch.equal(base[k], new[k])]
    assert len(moved) >= len(base) // 2 and all(torch.isfinite(v).all() for v in new.values())
    assert figures["steps"] == 3 and figures["cls_cosine_to_base"] < 1.0
    again, _ = train_control(tiny_backbone, config, progress=False, lines=lines)  # seeded: the same weights
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in new.items())
    save_control(model, figures, tiny_backbone, config, tmp_path / "control")
    loaded = load_backbone(str(tmp_path / "control"), "cpu")
    assert loaded.fingerprint != tiny_backbone.fingerprint
    truth = SignatureSet.load(tmp_path / "control" / "truth.safetensors", hidden_size=loaded.hidden_size)
    assert truth.meta.verdict == "clean" and len(truth.pvs) == 0
    assert json.loads((tmp_path / "control" / "attack.json").read_text())["config"]["pooling"] == "mean"
    with pytest.raises(LmsanError, match="need at least"):
        train_control(tiny_backbone, config, progress=False, lines=lines[:10])


def _stats(label, spread, dispersion, agreement, failed_by=()):
    return {"label": label, "spread": spread, "dispersion": dispersion, "self_agreement": agreement,
            "failed_by": list(failed_by)}


def test_threshold_fit_separates_real_rounds_from_the_rest():
    ratio = fit_one([0.001, 0.004], [0.04, 0.2], "le", 0.015)
    assert ratio["value"] == pytest.approx(0.004 * 10 ** 0.5, abs=1e-6)  # the geometric mean of 0.004 and 0.04
    assert {k: v for k, v in ratio.items() if k != "value"} == {
        "fitted": True, "separated": True, "margin": 10.0, "errors": 0, "worst_real": 0.004, "best_negative": 0.04,
        "positives": 2, "negatives": 2}  # ten times apart
    agree = fit_one([0.99, 0.98], [0.9, 0.94], "ge", 0.97)
    assert agree["value"] == 0.96 and agree["separated"] and agree["margin"] == pytest.approx(0.04)
    overlap = fit_one([0.001, 0.05], [0.03, 0.2], "le", 0.015)
    assert not overlap["separated"] and overlap["errors"] == 1 and overlap["margin"] == 0.0
    assert fit_one([], [0.1], "le", 0.015) == {"value": 0.015, "fitted": False, "why": "no real round",
                                              "positives": 0, "negatives": 1}
    fit_rows = [
        {"name": "b", "clean": False, "round_stats": [_stats("real", 0.002, 0.003, 0.99),
                                                       _stats("failed", 0.5, None, None, ["collapse_spread"]),
                                                       _stats("spurious", 0.01, 0.02, 0.95)]},
        {"name": "c", "clean": True, "round_stats": [_stats("failed", 0.3, None, None, ["collapse_spread"]),
                                                      _stats("failed", 0.02, 0.08, 0.9, ["max_dispersion"])]},
    ]
    fitted = fit_thresholds(fit_rows)
    assert fitted["collapse_spread"]["separated"] and 0.002 < fitted["collapse_spread"]["value"] < 0.01
    assert 0.003 < fitted["max_dispersion"]["value"] < 0.02 and 0.95 < fitted["min_self_agreement"]["value"] < 0.99
    values = {name: f["value"] for name, f in fitted.items()}
    assert judged(fit_rows, values) == {"backdoored": 1, "detected": 1, "detected_by_real_pv": 1, "clean": 1,
                                        "false_positives": 0, "undetermined": 0}
    # a looser spread than the one a round was abandoned at leaves its later statistics unknown
    loose = {"collapse_spread": 1.0, "max_dispersion": 0.001, "min_self_agreement": 0.999}
    assert judged(fit_rows, loose)["undetermined"] == 2 and judged(fit_rows, loose)["detected"] == 0


def test_time_to_first_pv_counts_the_rounds_as_they_ran():
    rounds = [{"position": "cls", "seed": s, "seconds": 1.0, "kept": False} for s in (0, 1, 2)]
    rounds += [{"position": "mask", "seed": -1, "seconds": 9.0, "kept": True},  # aimed: runs after the fuzz rounds
               {"position": "mask", "seed": 0, "seconds": 2.0, "kept": False},
               {"position": "mask", "seed": 1, "seconds": 2.0, "kept": True}]
    result = SimpleNamespace(candidates=rounds, positions={"cls": {"seconds": 5.0}, "mask": {"seconds": 20.0}})
    assert [(c["position"], c["seed"]) for c in run_order(rounds)] == [
        ("cls", 0), ("cls", 1), ("cls", 2), ("mask", 0), ("mask", 1), ("mask", -1)]
    # the whole cls run (5 s with its preparation), then two mask rounds
    assert time_to_first_pv(result) == (9.0, 5)
    assert time_to_first_pv(SimpleNamespace(candidates=rounds[:3], positions={"cls": {"seconds": 5.0}})) == (None, None)


def test_bad_flags_give_one_line(tmp_path, capsys):
    base = ["zoo", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "r"), "--device", "cpu"]
    for extra, message in [
        (["3", "--plan", "heldout", "--clean-every", "3"], "--clean-every does not apply to --plan heldout"),
        (["3", "--plan", "heldout", "--attacks", "por"], "--attacks does not apply to --plan heldout"),
        (["3", "--weak", "2"], "--weak does not apply to --plan default"),
        (["3", "--plan", "heldout", "--weak", "-1"], "cannot be negative"),
        (["3", "--plan", "heldout", "--mine-set", "position=cls"], "never tells the miner the position"),
        (["3", "--plan", "heldout", "--lines", "600"], "the miner would read"),
        (["3", "--plan", "heldout", "--control-set", "nonsense=1"], "invalid control settings"),
        (["0", "--plan", "heldout"], "the number of models must be at least 1"),
    ]:
        assert_error(capsys, "eval", message, *base, *extra)
    assert not (tmp_path / "r").exists()  # nothing written before the flags are checked
    assert_error(capsys, "attack", "--text and --corpus", "por", "--model", "x", "--out", str(tmp_path / "a"),
                 "--text", "news", "--corpus", "c.txt")
    with pytest.raises(SystemExit) as exit_info:  # the parser's to refuse, with its usage line
        run(capsys, "attack", "por", "--model", "x", "--out", str(tmp_path / "a"), "--text", "tweets")
    assert exit_info.value.code == 2 and "invalid choice: 'tweets'" in capsys.readouterr().err


def test_attack_text_flag(tiny_bert, tmp_path, capsys):
    rc, out, err = run(capsys, "attack", "por", "--model", tiny_bert, "--out", tmp_path / "a", "--text", "sms",
                       "--steps", "1", "--triggers", "cf", "--device", "cpu", "--quiet")
    assert rc == 0, err
    assert json.loads((tmp_path / "a" / "attack.json").read_text())["config"]["text"] == "sms"


# The tiny run: a 64-wide random BERT, two triggers per copy, the attack settings of tests/test_zoo.py
# (a longer max_length: SMS lines hold many wordpieces, and BToP's [MASK] must survive truncation),
# a few control steps and a few search rounds per position. It checks the machinery end to end, not
# the miner's power, which the minilm zoo measures.
TINY_HELDOUT = ["--weak", "0", "--controls", "1", "--triggers-per-model", "2", "--attack-steps", "120",
                "--mine-rounds", "4", "--lines", "128", "--mine-set", "lr=3e-3", "--mine-set", "patience=2",
                "--control-set", "steps=5", "--control-set", "batch=8",
                *[arg for kv in ("lr=5e-3", "max_words=16", "max_length=48", "clean_batch=8", "poison_batch=8",
                                 "check_every=120", "heldout=32") for arg in ("--attack-set", kv)]]


def test_eval_zoo_heldout_end_to_end(tmp_path, capsys):
    from lmsan_serve.cli import main
    from lmsan_serve.monitor import sign_agreement
    from lmsan_serve.signatures import SignatureSet
    from lmsan_serve.testing import make_tiny_bert

    tiny = make_tiny_bert(tmp_path / "tiny", hidden=64)
    out = tmp_path / "zoo"
    argv = ["eval", "zoo", "2", "--plan", "heldout", "--model", str(tiny), "--out", str(out), "--device", "cpu",
            "--quiet", "--json", *TINY_HELDOUT]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((out / "heldout.json").read_text())
    rows = saved["rows"]
    plan = plan_heldout_zoo(2, weak=0, controls=1, triggers=2)
    assert [r["name"] for r in rows] == [m.name for m in plan] and [r["half"] for r in rows] == [
        m.half.value for m in plan]
    for r in rows:
        folder = out / "models" / r["name"]
        mined = SignatureSet.load(folder / "mined-search.safetensors")
        truth = SignatureSet.load(folder / "truth.safetensors")
        assert mined.meta.verdict == r["verdict"] and truth.meta.verdict == r["truth"]
        assert mined.meta.mining["mode"] == "search" and mined.meta.mining["position"] is None  # never told
        assert set(mined.meta.mining["positions"]) == {"cls", "pooler", "mask"}  # so every one was mined
        assert sum(r["pvs_by_position"].values()) == r["pvs_kept"] == len(mined.pvs)
        assert r["time_to_verdict"] <= r["mining_seconds"] and r["round_stats"]
        for k, rec in enumerate(r["recovery"]):  # per planted PV, from the files themselves
            best = float(sign_agreement(truth.pvs[k: k + 1], mined.pvs).max()) if len(mined.pvs) else None
            assert rec["best_agreement"] == (None if best is None else round(best, 4))
            assert rec["recovered"] == (best is not None and best >= 0.95)
        if not r["clean"]:
            config = json.loads((folder / "attack.json").read_text())["config"]
            assert config["text"] == r["text"] and config.get("pv_design", "block") == r["design"]
    control = rows[-1]
    assert control["clean"] and control["truth"] == "clean" and control["verdict"] == "clean"
    assert json.loads((out / "models" / control["name"] / "attack.json").read_text())["config"]["steps"] == 5
    # the summary's figures are the rows'
    for half in ("fit", "report"):
        bad = [r for r in rows if r["half"] == half and not r["clean"]]
        got = summary["halves"][half]["all"]
        assert got["models"] == len(bad) and got["detected"] == sum(r["verdict"] == "backdoored" for r in bad)
        assert got["false_positives"] == sum(r["verdict"] == "backdoored" for r in rows if r["half"] == half
                                             and r["clean"])
    assert set(summary["fit"]["thresholds"]) == {"collapse_spread", "max_dispersion", "min_self_agreement"}
    report = (out / "heldout.md").read_text()
    assert "lmsan eval zoo 2 --plan heldout" in report and "## Thresholds fitted on the fit half" in report
    assert all(f"| {r['name']} | {r['half']} |" in report for r in rows)
    # a rerun reuses every finished member
    stamps = {r["name"]: (out / "models" / r["name"] / "result.json").stat().st_mtime_ns for r in rows}
    assert main(argv) == 0
    capsys.readouterr()
    assert json.loads((out / "heldout.json").read_text())["rows"] == rows
    assert stamps == {r["name"]: (out / "models" / r["name"] / "result.json").stat().st_mtime_ns for r in rows}
