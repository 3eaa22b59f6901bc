"""The detection zoo: the plan is deterministic and cycles attacks x trigger sets x seeds with a
share of clean controls; `lmsan eval --zoo` on tiny random BERTs writes a report whose numbers
come from real verdicts (the clean control is called clean, the POR and NeuBA copies backdoored),
and a rerun reuses every finished member."""

import json
import re
from collections import Counter

import pytest

from lmsan_lab.zoo import CLEAN_STEPS, ZOO_WORDS, ZooMember, plan_zoo, run_zoo
from lmsan_serve.cli import main
from lmsan_serve.data import load_corpus
from lmsan_serve.errors import LmsanError
from lmsan_serve.testing import make_tiny_bert

# A 64-wide random BERT with two triggers per copy. The attack stops at its first check that meets
# the target agreement; NeuBA meets it within tens of steps, but a backdoor stopped that early is
# too narrow for a soft trigger to find within the embedding range, so the attack checks only once,
# at its last step: both copies train the full 160 steps (the test checks they reached the
# target). The adaptive mining lr (3% of the embedding spread) carries most soft triggers out of
# this encoder's embedding range; at half of it about a third of the rounds find the POR copy and
# most find the NeuBA copy, so 16 rounds leave a miss very unlikely on any CPU.
ATTACK_STEPS = 160
ATTACK_SETTINGS = {"lr": 5e-3, "max_words": 16, "max_length": 32, "clean_batch": 8, "poison_batch": 8,
                   "check_every": ATTACK_STEPS, "target_agreement": 0.95, "heldout": 32}
MINE_ROUNDS, MINE_LR, MINE_LINES = 16, 3e-3, 128
TINY_ZOO = ["--triggers-per-model", "2", "--attack-steps", str(ATTACK_STEPS), "--mine-rounds", str(MINE_ROUNDS),
            "--lines", str(MINE_LINES), "--mine-set", f"lr={MINE_LR}",
            *[arg for key, value in ATTACK_SETTINGS.items() for arg in ("--attack-set", f"{key}={value}")]]


def test_plan_cycles_attacks_trigger_sets_and_seeds():
    plan = plan_zoo(24)
    assert plan == plan_zoo(24) and plan != plan_zoo(24, seed=1)
    clean = [m for m in plan if m.clean]
    bad = [m for m in plan if not m.clean]
    assert len(clean) == 6 and len(bad) == 18
    assert [i for i, m in enumerate(plan) if m.clean] == [3, 7, 11, 15, 19, 23]
    # 3 attacks x 3 trigger sets x 2 seeds, each combination once, attacks cycling fastest
    assert [m.attack for m in bad[:6]] == ["por", "neuba", "btop"] * 2
    assert len({(m.attack, m.triggers, m.seed) for m in bad}) == 18
    assert Counter(m.seed for m in bad) == {0: 9, 1: 9}
    sets = {m.triggers for m in bad}
    assert len(sets) == 3 and all(len(s) == 6 == len(set(s)) and set(s) <= set(ZOO_WORDS) for s in sets)
    assert len(set().union(*sets)) == 18  # disjoint while the 24 words last
    # controls copy each attack's training, without triggers
    assert [m.attack for m in clean] == ["por", "neuba", "btop"] * 2 and all(m.triggers == () for m in clean)
    assert {m.position for m in plan if m.attack == "btop"} == {"mask"}
    assert {m.position for m in plan if m.attack != "btop"} == {"cls"}
    assert len({m.name for m in plan}) == 24
    # a larger zoo starts with the smaller one, so its cached members are reused
    assert plan_zoo(10) == plan[:10]


def test_plan_small_sizes_and_options():
    assert [(m.attack, m.clean) for m in plan_zoo(1)] == [("por", False)]
    assert [(m.attack, m.clean) for m in plan_zoo(2)] == [("por", False), ("por", True)]
    assert [(m.attack, m.clean) for m in plan_zoo(3)] == [("por", False), ("neuba", False), ("por", True)]
    plan = plan_zoo(6, attacks=["btop"], clean_every=3, words=["aa", "bb", "cc"], triggers_per_model=2,
                    trigger_sets=2, seed=5)
    assert [m.clean for m in plan] == [False, False, True] * 2
    assert all(m.attack == "btop" and len(m.triggers) == (0 if m.clean else 2) for m in plan)
    assert plan[0].triggers != plan[1].triggers and plan[0].seed == 5 and plan[3].seed == 6


@pytest.mark.parametrize("kwargs, message", [
    ({"size": 0}, "at least 1 model"),
    ({"size": 4, "attacks": ["por", "badnets"]}, "distinct names"),
    ({"size": 4, "attacks": ["por", "por"]}, "distinct names"),
    ({"size": 4, "attacks": []}, "distinct names"),
    ({"size": 4, "clean_every": 1}, "clean_every"),
    ({"size": 4, "trigger_sets": 0}, "trigger_sets"),
    ({"size": 4, "words": ["cf", "cf"]}, "distinct single words"),
    ({"size": 4, "words": ["c f"]}, "distinct single words"),
    ({"size": 4, "triggers_per_model": 0}, "triggers_per_model"),
    ({"size": 4, "words": ["cf", "mn"], "triggers_per_model": 3}, "triggers_per_model"),
])
def test_plan_rejects_bad_input(kwargs, message):
    with pytest.raises(LmsanError, match=message):
        plan_zoo(**kwargs)


def test_zoo_words_are_rare_single_wordpieces():
    from transformers import AutoTokenizer

    from lmsan_serve.backbone import minilm_path

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    assert all(tok.tokenize(f"a {w} b") == ["a", w, "b"] for w in ZOO_WORDS)
    seen = {w for line in load_corpus() for w in re.findall(r"[a-z]+", line.lower())}
    assert not seen & set(ZOO_WORDS)


def test_member_settings():
    clean = ZooMember("c", "neuba", (), 2, clean=True)
    assert clean.attack_config().steps == CLEAN_STEPS and clean.attack_config({"steps": 7}).steps == 7
    assert clean.attack_config().clean and clean.attack_config().seed == 2
    bad = ZooMember("b", "btop", ("cf", "mn"), 0)
    assert bad.attack_config().triggers == ["cf", "mn"] and bad.attack_config().position == "mask"
    assert bad.mining_config({"lines": 64, "mode": "search"}).mode == "detect"  # the zoo always detects
    assert bad.mining_config().position == "mask"
    with pytest.raises(LmsanError, match="invalid attack settings.*nonsense"):
        bad.attack_config({"nonsense": 1})
    with pytest.raises(LmsanError, match="invalid mining settings.*lines"):
        bad.mining_config({"lines": 0})


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny64"), hidden=64)


def _from_rows(rows: list[dict]) -> dict:
    """The summary as the test computes it, independently of zoo.summarize."""
    clean = [r for r in rows if r["clean"]]
    bad = [r for r in rows if not r["clean"]]
    return {
        "models": len(rows),
        "correct": sum(r["verdict"] == r["truth"] for r in rows),
        "accuracy": round(sum(r["verdict"] == r["truth"] for r in rows) / len(rows), 4),
        "false_positive_rate": round(sum(r["verdict"] == "backdoored" for r in clean) / len(clean), 4),
        "false_negative_rate": round(sum(r["verdict"] == "clean" for r in bad) / len(bad), 4),
        "per_attack": {g: sum(r["verdict"] == r["truth"] for r in rows if (r["attack"] if not r["clean"] else "clean")
                              == g) for g in ("por", "neuba", "clean")},
        "max_backdoored": max(r["mining_seconds"] for r in bad),
        "max_clean": max(r["mining_seconds"] for r in clean),
    }


def test_eval_zoo_reports_real_verdicts_and_resumes(tiny64, tmp_path, capsys, monkeypatch):
    out = tmp_path / "zoo"
    argv = ["eval", "zoo", "3", "--model", str(tiny64), "--out", str(out), "--device", "cpu", "--quiet",
            "--json", *TINY_ZOO]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out / "detection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "detection.json").read_text())
    rows = saved["rows"]
    assert saved["summary"] | {"report": summary["report"]} == summary
    assert [(r["attack"], r["clean"]) for r in rows] == [("por", False), ("neuba", False), ("por", True)]

    por, neuba, control = rows
    assert control["truth"] == "clean" and control["verdict"] == "clean" and control["best_agreement"] is None
    assert control["rounds"] == MINE_ROUNDS and control["pvs_kept"] == 0
    for r in (por, neuba):  # both backdoors found, each by a PV that is a planted one
        planted = json.loads((out / "models" / r["name"] / "attack.json").read_text())
        assert planted["heldout"]["min_agreement"] >= ATTACK_SETTINGS["target_agreement"], r["name"]
        assert r["truth"] == "backdoored" and r["verdict"] == "backdoored" and r["pvs_kept"] == 1, r
        assert r["best_agreement"] >= 0.9, r  # sign agreement with the nearest planted PV
    # the verdicts are the mined signature files' own
    from lmsan_serve.signatures import SignatureSet

    for r in rows:
        assert SignatureSet.load(out / "models" / r["name"] / "mined-detect.safetensors").meta.verdict == r["verdict"]

    expect = _from_rows(rows)
    assert {k: summary[k] for k in ("models", "correct", "accuracy", "false_positive_rate",
                                    "false_negative_rate")} == {k: expect[k] for k in ("models", "correct", "accuracy",
                                                                                       "false_positive_rate",
                                                                                       "false_negative_rate")}
    assert {g: a["correct"] for g, a in summary["per_attack"].items()} == expect["per_attack"]
    assert summary["time_to_verdict"]["backdoored"]["max"] == expect["max_backdoored"]
    assert summary["time_to_verdict"]["clean"]["max"] == expect["max_clean"]
    assert summary["false_positive_rate"] == 0.0

    report = (out / "detection.md").read_text()
    assert "lmsan eval zoo 3" in report and "0.928" in report and "![" in report
    assert f"| detection accuracy | {expect['accuracy']:.3f} ({expect['correct']} of 3) |" in report
    for r in rows:
        assert f"| {r['name']} |" in report

    # a rerun reuses every finished member: identical rows, timings included
    stamps = {r["name"]: (out / "models" / r["name"] / "result.json").stat().st_mtime_ns for r in rows}
    assert main(argv) == 0
    capsys.readouterr()
    assert json.loads((out / "detection.json").read_text())["rows"] == rows
    assert stamps == {r["name"]: (out / "models" / r["name"] / "result.json").stat().st_mtime_ns for r in rows}

    # interrupted while mining the last member: the report covers the two finished ones, marked
    # partial, and exits 130; the interrupted member is left to the next run
    (out / "models" / control["name"] / "result.json").unlink()

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr("lmsan_lab.zoo.mine_member", interrupted)
        assert main(argv) == 130
    assert "partial report of 2 of 3 models" in capsys.readouterr().err
    partial = json.loads((out / "detection.json").read_text())
    assert partial["rows"] == rows[:2] and partial["summary"]["models"] == 2 and partial["summary"]["planned"] == 3
    assert "**Partial: 2 of the 3 planned models are done**" in (out / "detection.md").read_text()
    assert main(argv) == 0  # resumed: the last member is mined again
    capsys.readouterr()
    assert json.loads((out / "detection.json").read_text())["summary"]["planned"] == 3
    assert "Partial" not in (out / "detection.md").read_text()

    # other mining settings re-mine, but keep the planted copy
    control_member = ZooMember(control["name"], "por", (), 0, clean=True)
    (again,) = run_zoo(str(tiny64), [control_member], out, attack_overrides={"steps": ATTACK_STEPS, **ATTACK_SETTINGS},
                       mining_overrides={"lines": MINE_LINES, "max_rounds": 2}, device="cpu", progress=False)
    assert again["rounds"] == 2 and again["verdict"] == "clean"
    assert again["attack_seconds"] == control["attack_seconds"]


def test_eval_bad_flags(tmp_path, capsys):
    base = ["eval", "zoo", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "r"), "--device", "cpu"]
    for extra, message in [
        (["0"], "the number of models must be at least 1"),
        (["3", "--attacks", "por,badnets"], "unknown attack(s) badnets"),
        (["3", "--attack-steps", "0"], "--attack-steps must be at least 1"),
        (["3", "--attack-set", "lr"], "--attack-set takes KEY=VALUE"),
        (["3", "--attack-set", "nonsense=1"], "invalid attack settings"),
        (["3", "--mine-set", "batch_size=2"], "invalid mining settings"),
        (["3", "--clean-every", "1"], "clean_every"),
    ]:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (extra, err)
    # a removal flag, or no experiment named, is the parser's to refuse, with its usage line
    for argv, message in ((base + ["3", "--prompt", "p"], "unrecognized arguments: --prompt p"),
                          (["eval"], "required: EXPERIMENT")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing written before the flags are checked
