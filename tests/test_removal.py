"""`lmsan_lab.removal` on the tiny backdoored BERT: prompts are trained per shipped task, the
figures equal a direct evaluation of the same guard, and the monitor's precision and recall come
from the flags it raised."""

import json

import pytest

from lmsan_lab.evaluation import evaluate_guard, holds_trigger
from lmsan_lab.removal import TASKS, parse_tasks, run_removal, write_removal
from lmsan_serve import load_backbone
from lmsan_serve.data import Example, load_examples
from lmsan_serve.errors import LmsanError
from lmsan_serve.guard import Guard
from lmsan_serve.prompts import PromptClassifier, PromptConfig
from lmsan_serve.signatures import SignatureSet

TINY_PROMPT = PromptConfig(method="prefix", length=4, max_steps=30, lr=3e-2, batch_size=16, eval_every=30)


def test_removal_figures_are_computed_from_real_predictions(tmp_path, tiny_por, tiny_por_mined):
    """With the set mined from the copy and the triggers whose PV it recovered; the adaptive
    variants asked for are measured on the same inputs (a pair-only one on the pair task only)."""
    sig = str(tiny_por_mined.path)
    triggers = tiny_por_mined.caught
    res = run_removal(str(tiny_por), sig, triggers, ["sms_spam", "rte"], tmp_path, size=24, device="cpu",
                      serve=False, calibrate=0, prompt=TINY_PROMPT, variants=["two_triggers", "second_text"],
                      progress=False, say=lambda m: None)
    assert set(res["tasks"]) == {"sms_spam", "rte"} and not res["over_http"]
    assert res["variants"] == ["two_triggers", "second_text"]
    assert set(res["tasks"]["sms_spam"]["adaptive"]) == {"two_triggers"}
    assert set(res["tasks"]["rte"]["adaptive"]) == {"two_triggers", "second_text"}
    backbone = load_backbone(str(tiny_por), "cpu")
    for task in ("sms_spam", "rte"):
        row = res["tasks"][task]
        guard = Guard(backbone, PromptClassifier.load(tmp_path / "prompts" / task, backbone), SignatureSet.load(sig))
        ev = evaluate_guard(guard, TASKS[task].load()[1][:24], triggers, progress=False)
        assert row["asr_on"] == round(ev.asr_on, 4) and row["cacc_off"] == round(ev.cacc_off, 4)
        assert row["attacked"] == ev.attacked == len(triggers) * ev.correct
        assert row["reference_asr"] == round((ev.type1 + ev.type2) / ev.attacked, 4)
        # the mined PVs catch the triggers they recovered, and clean inputs are not flagged
        assert row["recall"] >= 0.9 and row["false_flag_rate"] <= 0.1 and row["precision"] >= 0.9
        assert row["holding_trigger"] == sum(holds_trigger(e, triggers) for e in TASKS[task].load()[1][:24])
        two = evaluate_guard(guard, TASKS[task].load()[1][:24], triggers, variant="two_triggers", progress=False)
        assert row["adaptive"]["two_triggers"] == {"asr_off": round(two.asr_off, 4), "asr_on": round(two.asr_on, 4),
                                                   "attacked": two.attacked,
                                                   "triggered_flag_rate": round(two.triggered_flag_rate, 4)}
    # a second run reuses the trained prompts; calibrated on the task's last 200 training pairs, its
    # figures are those of a guard calibrated on them directly
    again = run_removal(str(tiny_por), sig, triggers, ["rte"], tmp_path, size=24, device="cpu", serve=False,
                        calibrate=200, prompt=TINY_PROMPT, progress=False, say=lambda m: None)
    assert again["tasks"]["rte"]["prompt_train_seconds"] == 0.0 and again["calibration_lines"] == 200
    train, test = TASKS["rte"].load()
    calib = load_examples(tmp_path / "calibration" / "rte.jsonl", require_label=False)
    assert [(e.text, e.text_pair) for e in calib] == [(e.text, e.text_pair) for e in train[-200:]]
    assert not {e.text for e in calib} & {e.text for e in test[:24]}
    guard = Guard(backbone, PromptClassifier.load(tmp_path / "prompts" / "rte", backbone), SignatureSet.load(sig))
    done = guard.calibrate([e.text for e in calib], [e.text_pair for e in calib])
    assert again["tasks"]["rte"]["calibration"] == done.to_dict()  # the report says what calibration did
    assert "Per-task calibration" in write_removal(again, tmp_path / "again", "lmsan eval").read_text()
    ev = evaluate_guard(guard, test[:24], triggers, progress=False)
    assert again["tasks"]["rte"]["asr_on"] == round(ev.asr_on, 4)
    assert again["tasks"]["rte"]["false_flag_rate"] == round(ev.false_flag_rate, 4)
    with pytest.raises(LmsanError, match="--calibrate"):
        run_removal(str(tiny_por), sig, triggers, ["rte"], tmp_path, calibrate=501, serve=False)
    report = write_removal(res, tmp_path / "report", "lmsan eval --removal sms_spam,rte")
    text = report.read_text()
    assert "Per-task calibration" not in text and "calibration" not in res["tasks"]["rte"]
    assert "| RTE (entailment, sentence pairs) | " in text.split("Adaptive variants")[1]
    assert "| SMS spam (2 classes) |" in text and "| RTE (entailment, sentence pairs) |" in text
    assert (tmp_path / "report" / "removal.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "report" / "removal.json").read_text())["tasks"] == res["tasks"]


def test_clean_inputs_holding_a_trigger_are_counted():
    rows = [Example("Mm that time you dont like fun", "ham"), Example("see you at ten", "ham"),
            Example("a premise", "entailment", "a cf hypothesis"), Example("common commerce", "ham")]
    assert sum(holds_trigger(e, ["mm", "cf"]) for e in rows) == 2
    assert sum(holds_trigger(e, ["zq"]) for e in rows) == 0


def test_task_splits_are_fixed():
    train, test = TASKS["sms_spam"].load()
    assert len(test) == 1115 and len(train) + len(test) == 5574
    assert [e.text for e in TASKS["sms_spam"].load()[1][:5]] == [e.text for e in test[:5]]
    assert {e.label for e in TASKS["ag_news"].load()[1]} == {"World", "Sports", "Business", "Sci/Tech"}
    assert all(e.text_pair for e in TASKS["rte"].load()[1])


def test_bad_task_names_get_one_line_errors():
    assert parse_tasks("all") == list(TASKS)
    assert parse_tasks("sst2, rte") == ["sst2", "rte"]
    with pytest.raises(LmsanError, match="unknown task"):
        parse_tasks("sst2,imdb")
    with pytest.raises(LmsanError, match="unknown task"):
        parse_tasks(",")


def test_removal_cli_errors_are_one_line(tmp_path, capsys):
    from lmsan_serve.cli import main

    base = ["eval", "removal", "--model", str(tmp_path), "--out", str(tmp_path / "o")]
    for extra, reason in ((["imdb", "--signatures", "x"], "unknown task"),
                          (["sst2", "--signatures", str(tmp_path / "none.safetensors")], "not found"),
                          (["sst2", "--signatures", "x", "--variants", "wiggle"], "unknown adaptive variant")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert reason in err and len(err.strip().splitlines()) == 1
    # flags the removal experiment does not take are the parser's to refuse, with its usage line
    for extra, reason in ((["sst2"], "required: --signatures"), (["sst2", "--signatures", "x", "--prompt", "p"],
                                                                  "unrecognized arguments: --prompt p")):
        with pytest.raises(SystemExit) as exit_info:
            main(base + extra)
        assert exit_info.value.code == 2 and reason in capsys.readouterr().err
