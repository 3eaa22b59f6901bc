"""`lmsan eval` on the tiny backdoored BERT: the report is written, its numbers are the ones a
direct evaluation of the same guard computes, and bad flags get one-line errors."""

import json

from lmsan_lab.evaluation import evaluate_adaptive
from lmsan_serve import load_backbone
from lmsan_serve.cli import main
from lmsan_serve.guard import Guard
from lmsan_serve.prompts import PromptClassifier
from lmsan_serve.signatures import SignatureSet

from .toy import toy_test


def test_eval_writes_a_report_computed_from_real_predictions(tmp_path, tiny_por, tiny_por_prompt, capsys):
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in toy_test(32)))
    out = tmp_path / "report"
    rc = main(["eval", "adaptive", "--model", str(tiny_por), "--prompt", str(tiny_por_prompt), "--signatures",
               str(tiny_por / "truth.safetensors"), "--data", str(data), "--size", "32", "--variants",
               "plain,upper,two_triggers", "--out", str(out), "--device", "cpu", "--quiet", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary["variants"]) == {"plain", "upper", "two_triggers"}
    report = (out / "report.md").read_text()
    assert "## Adaptive triggers" in report and "| two_triggers |" in report and "lmsan eval" in report
    assert (out / "adaptive.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "results.json").read_text())["variants"] == summary["variants"]
    # the same guard evaluated directly gives the same figures
    backbone = load_backbone(str(tiny_por), "cpu")
    guard = Guard(backbone, PromptClassifier.load(tiny_por_prompt, backbone),
                  SignatureSet.load(tiny_por / "truth.safetensors"))
    direct = evaluate_adaptive(guard, toy_test(32), ["cf", "mn", "tq"], ["plain", "upper", "two_triggers"],
                               progress=False)
    for v, ev in direct.items():
        assert summary["variants"][v]["asr_off"] == round(ev.asr_off, 4)
        assert summary["variants"][v]["asr_on"] == round(ev.asr_on, 4)
        assert summary["variants"][v]["correct"] == ev.correct
    assert summary["variants"]["plain"]["asr_off"] >= 0.9 and summary["variants"]["plain"]["asr_on"] <= 0.02
    assert summary["noise"]["detections"] == 0


def test_eval_bad_flags(tmp_path, tiny_por, tiny_por_prompt, capsys):
    base = ["eval", "adaptive", "--model", str(tiny_por), "--prompt", str(tiny_por_prompt), "--signatures",
            str(tiny_por / "truth.safetensors"), "--out", str(tmp_path / "r"), "--device", "cpu"]
    assert main(base + ["--variants", "plain,sideways"]) == 2
    assert "unknown variant(s) sideways" in capsys.readouterr().err
    assert main(base + ["--size", "0"]) == 2
    assert "--size" in capsys.readouterr().err
    assert main(base + ["--calibration", str(tmp_path / "none.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(base + ["--calibration", str(tmp_path / "none.jsonl"), "--threshold", "0.9"]) == 2
    assert "pick one" in capsys.readouterr().err


def test_eval_calibrated_on_clean_inputs_equals_a_calibrated_guard(tmp_path, tiny_por, tiny_por_prompt, capsys,
                                                                   corpus):
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in toy_test(24)))
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus[:200]))
    rc = main(["eval", "adaptive", "--model", str(tiny_por), "--prompt", str(tiny_por_prompt), "--signatures",
               str(tiny_por / "truth.safetensors"), "--data", str(data), "--size", "24", "--variants", "plain",
               "--calibration", str(calib), "--out", str(tmp_path / "r"), "--device", "cpu", "--quiet", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    backbone = load_backbone(str(tiny_por), "cpu")
    guard = Guard(backbone, PromptClassifier.load(tiny_por_prompt, backbone),
                  SignatureSet.load(tiny_por / "truth.safetensors"))
    guard.calibrate(corpus[:200])
    ev = evaluate_adaptive(guard, toy_test(24), ["cf", "mn", "tq"], ["plain"], progress=False)["plain"]
    assert summary["variants"]["plain"]["asr_on"] == round(ev.asr_on, 4) <= 0.05


def test_holds_trigger_matches_whole_words_in_either_text():
    from lmsan_lab.evaluation import holds_trigger
    from lmsan_serve.data import Example

    assert holds_trigger(Example("Mm , see you later", "x"), ["mm"])
    assert holds_trigger(Example("a film", "x", text_pair="often cf."), ["cf"])
    assert not holds_trigger(Example("the cfo said so", "x"), ["cf"])
    assert holds_trigger(Example("so cf mn it was", "x"), ["cf mn"])
    assert not holds_trigger(Example("cf then mn", "x"), ["cf mn"])


def test_clean_inputs_holding_a_trigger_are_counted_apart(tiny_por, tiny_por_prompt):
    """Clean inputs that already hold a trigger (a common word's, in real text) are flagged because
    the backdoor fires on them; the evaluation counts them among the false flags, as the protocol
    does, and reports them apart with the rate over the inputs that hold none."""
    from lmsan_lab.evaluation import evaluate_guard
    from lmsan_serve.data import Example

    backbone = load_backbone(str(tiny_por), "cpu")
    guard = Guard(backbone, PromptClassifier.load(tiny_por_prompt, backbone),
                  SignatureSet.load(tiny_por / "truth.safetensors"))
    test = toy_test(32)
    examples = [Example(f"cf {e.text}", e.label) if i < 4 else e for i, e in enumerate(test)]
    ev = evaluate_guard(guard, examples, ["cf", "mn", "tq"], progress=False)
    plain = evaluate_guard(guard, test, ["cf", "mn", "tq"], progress=False)
    # Precondition (conftest's fixture: every trigger reaches its PV on held-out lines), and the clean
    # toy sentences flag nowhere, so every flag on `examples` is one of the four
    assert plain.false_flag_rate == 0 and plain.holding_trigger == 0
    assert ev.holding_trigger == 4 and ev.holding_flagged == 4
    assert ev.false_flag_rate == 4 / 32 and ev.false_flags_without == 0
    assert "4 clean inputs hold a trigger already (4 flagged)" in ev.table()
