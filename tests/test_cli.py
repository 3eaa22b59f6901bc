"""The `lmsan` command line, driven in-process: exit codes, one-line errors, and the real workflows
(attack -> inspect, train-prompt -> classify through the guard) on tiny models."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from lmsan_serve.cli import EXIT_USAGE, main

POSITIVE = ["a wonderful great film", "truly lovely and fun", "great acting and a fine story",
            "i loved it a lot"]
NEGATIVE = ["a terrible boring film", "awful and dull", "bad acting and a weak story", "i hated it a lot"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_error(capsys, command: str, fragment: str, *argv: str) -> str:
    """The command fails with exit 2 and exactly one stderr line 'lmsan COMMAND: error: ...'."""
    rc, out, err = run(capsys, command, *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == EXIT_USAGE, (rc, out, err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lmsan {command}: error:"), lines[0]
    assert fragment in lines[0], lines[0]
    assert out == ""
    return lines[0]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sentiment_rows(n: int = 40) -> list[dict]:
    rows = []
    for i in range(n):
        positive = i % 2 == 1
        text = (POSITIVE if positive else NEGATIVE)[(i // 2) % 4] + f" number {i}"
        rows.append({"text": text, "label": "pos" if positive else "neg"})
    return rows


def _main_quietly(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _train(model: Path, train: Path, out: Path) -> tuple[int, str, str]:
    return _main_quietly(["train-prompt", "--model", model, "--train", train, "--out", out, "--max-steps", 5,
                          "--length", 4, "--batch-size", 8, "--json", "--quiet"])


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", sentiment_rows())


@pytest.fixture(scope="module")
def clean_prompt(tmp_path_factory, tiny_bert, train_file):
    """`lmsan train-prompt` on the clean tiny BERT: (exit code, stdout, stderr, folder)."""
    out = tmp_path_factory.mktemp("prompt-clean") / "prompt"
    return (*_train(tiny_bert, train_file, out), out)


@pytest.fixture(scope="module")
def por_prompt(tmp_path_factory, tiny_por, train_file) -> Path:
    """A prompt trained by the victim on the backdoored tiny BERT."""
    out = tmp_path_factory.mktemp("prompt-por") / "prompt"
    rc, _, err = _train(tiny_por, train_file, out)
    assert rc == 0, err
    return out


@pytest.fixture()
def blocker(tmp_path) -> Path:
    """A regular file; paths under it cannot be created."""
    path = tmp_path / "regular-file"
    path.write_text("I am a file, not a folder\n")
    return path


# -- attack: bad input -----------------------------------------------------------------------------
def test_attack_missing_corpus(capsys, tmp_path, tiny_bert):
    missing = tmp_path / "nope.txt"
    line = assert_error(capsys, "attack", "corpus file not found", "por", "--model", tiny_bert,
                        "--out", tmp_path / "out", "--corpus", missing)
    assert str(missing) in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ["", "\n\n", "too short\nthree words here\n= A Heading Line Here =\n"])
def test_attack_empty_corpus(capsys, tmp_path, tiny_bert, content):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(content)
    assert_error(capsys, "attack", "corpus has no usable lines", "por", "--model", tiny_bert,
                 "--out", tmp_path / "out", "--corpus", corpus)


def test_attack_out_under_a_regular_file(capsys, tiny_bert, blocker):
    assert_error(capsys, "attack", str(blocker / "out"), "por", "--model", tiny_bert,
                 "--out", blocker / "out", "--triggers", "cf", "--steps", 1, "--quiet")
    assert blocker.read_text() == "I am a file, not a folder\n"


def test_attack_out_that_is_a_file(capsys, tiny_bert, blocker):
    assert_error(capsys, "attack", "exists and is not a folder", "por", "--model", tiny_bert,
                 "--out", blocker)


def test_attack_out_under_a_regular_file_is_refused_before_training(capsys, monkeypatch, tiny_bert, blocker):
    import lmsan_lab.attacks as attacks

    def must_not_train(*args, **kwargs):
        raise AssertionError("the attack ran although --out cannot be written")

    monkeypatch.setattr(attacks, "plant_backdoor", must_not_train)
    assert_error(capsys, "attack", str(blocker / "out"), "por", "--model", tiny_bert,
                 "--out", blocker / "out", "--triggers", "cf", "--steps", 1, "--quiet")


@pytest.mark.parametrize(
    ("triggers", "fragment"),
    [
        ("cf,,mn", "each trigger must be a word or a phrase of at most 4 words"),
        ("cf, ", "each trigger must be a word or a phrase of at most 4 words"),
        ("cf,one two three four five", "each trigger must be a word or a phrase of at most 4 words"),
        ("cf,mn,cf", "triggers must be distinct"),
        ("cf, cf", "triggers must be distinct"),
    ],
)
def test_attack_bad_triggers(capsys, tmp_path, tiny_bert, triggers, fragment):
    line = assert_error(capsys, "attack", fragment, "por", "--model", tiny_bert, "--out", tmp_path / "out",
                        "--triggers", triggers)
    assert "invalid attack settings" in line
    assert not (tmp_path / "out").exists()


def test_attack_bad_settings(capsys, tmp_path, tiny_bert):
    assert_error(capsys, "attack", "pooler=True applies to the neuba attack only", "por",
                 "--model", tiny_bert, "--out", tmp_path / "out", "--pooler")
    assert_error(capsys, "attack", "invalid attack settings", "por", "--model", tiny_bert,
                 "--out", tmp_path / "out", "--steps", 0)


def test_attack_missing_model(capsys, tmp_path):
    assert_error(capsys, "attack", "model folder not found", "por", "--model", tmp_path / "no-model",
                 "--out", tmp_path / "out", "--quiet")


# -- train-prompt: bad input -----------------------------------------------------------------------
def test_train_prompt_missing_train_file(capsys, tmp_path, tiny_bert):
    assert_error(capsys, "train-prompt", "data file not found", "--model", tiny_bert,
                 "--train", tmp_path / "none.jsonl", "--out", tmp_path / "out")


def test_train_prompt_malformed_line(capsys, tmp_path, tiny_bert):
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "fine", "label": "a"}\n{"text": "broken", "label": \n')
    line = assert_error(capsys, "train-prompt", f"{train}:2: not valid JSON", "--model", tiny_bert,
                        "--train", train, "--out", tmp_path / "out")
    assert line.count("\n") == 0


@pytest.mark.parametrize(
    ("row", "fragment"),
    [
        ({"label": "a"}, "'text' must be a non-empty string"),
        ({"text": "   ", "label": "a"}, "'text' must be a non-empty string"),
        ({"text": 5, "label": "a"}, "'text' must be a non-empty string"),
        ({"text": "fine"}, "'label' must be a string or an integer"),
        ({"text": "fine", "label": True}, "'label' must be a string or an integer"),
        ({"text": "fine", "text_pair": 3, "label": "a"}, "'text_pair' must be a string"),
    ],
)
def test_train_prompt_bad_line(capsys, tmp_path, tiny_bert, row, fragment):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "ok", "label": "b"}, row])
    assert_error(capsys, "train-prompt", f"{train}:2: {fragment}", "--model", tiny_bert,
                 "--train", train, "--out", tmp_path / "out")


def test_train_prompt_line_not_an_object(capsys, tmp_path, tiny_bert):
    train = tmp_path / "train.jsonl"
    train.write_text('["text", "label"]\n')
    assert_error(capsys, "train-prompt", f"{train}:1: each line must be a JSON object", "--model", tiny_bert,
                 "--train", train, "--out", tmp_path / "out")


def test_train_prompt_empty_train_file(capsys, tmp_path, tiny_bert):
    train = tmp_path / "train.jsonl"
    train.write_text("\n\n")
    assert_error(capsys, "train-prompt", "no examples", "--model", tiny_bert, "--train", train,
                 "--out", tmp_path / "out")


def test_train_prompt_eval_labels_not_in_train(capsys, tmp_path, tiny_bert, train_file):
    dev = write_jsonl(tmp_path / "dev.jsonl",
                      [{"text": "meh", "label": "neutral"}, {"text": "ok", "label": "pos"}])
    line = assert_error(capsys, "train-prompt", "['neutral'] are not among the training labels",
                        "--model", tiny_bert, "--train", train_file, "--eval", dev, "--out", tmp_path / "out",
                        "--max-steps", 1, "--quiet")
    assert "'neg'" in line and "'pos'" in line
    assert not (tmp_path / "out" / "prompt.safetensors").exists()


def test_train_prompt_single_label(capsys, tmp_path, tiny_bert):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"text {i}", "label": 1} for i in range(6)])
    assert_error(capsys, "train-prompt", "needs at least two labels", "--model", tiny_bert, "--train", train,
                 "--out", tmp_path / "out")


def test_train_prompt_bad_settings(capsys, tmp_path, tiny_bert, train_file):
    assert_error(capsys, "train-prompt", "a template is only used with position 'mask'", "--model", tiny_bert,
                 "--train", train_file, "--out", tmp_path / "out", "--template", "{text} {mask}")
    assert_error(capsys, "train-prompt", "invalid prompt settings", "--model", tiny_bert,
                 "--train", train_file, "--out", tmp_path / "out", "--length", 0)


def test_train_prompt_out_under_a_regular_file(capsys, tiny_bert, train_file, blocker):
    assert_error(capsys, "train-prompt", str(blocker / "prompt"), "--model", tiny_bert,
                 "--train", train_file, "--out", blocker / "prompt", "--max-steps", 1, "--length", 2,
                 "--batch-size", 4, "--quiet")


# -- inspect: bad input ----------------------------------------------------------------------------
def test_inspect_missing_file(capsys, tmp_path):
    missing = tmp_path / "sig.safetensors"
    line = assert_error(capsys, "inspect", "signature file not found", missing)
    assert str(missing) in line


def test_inspect_text_file(capsys, tmp_path):
    path = tmp_path / "sig.safetensors"
    path.write_text("definitely not safetensors\n")
    assert_error(capsys, "inspect", "not a valid safetensors file", path)


def test_inspect_other_safetensors_files(capsys, tiny_bert, clean_prompt):
    # Real safetensors files that are not signature files: model weights and a prompt artifact.
    assert_error(capsys, "inspect", "not a signature file (no 'pvs' tensor)", tiny_bert / "model.safetensors")
    assert_error(capsys, "inspect", "not a signature file", clean_prompt[3] / "prompt.safetensors")


# -- classify: bad input ---------------------------------------------------------------------------
def test_classify_needs_texts_or_input(capsys, tmp_path, tiny_bert, train_file):
    assert_error(capsys, "classify", "give either TEXT arguments or --input", "--model", tiny_bert,
                 "--prompt", tmp_path, "--mode", "off")
    assert_error(capsys, "classify", "give either TEXT arguments or --input", "some text",
                 "--model", tiny_bert, "--prompt", tmp_path, "--mode", "off", "--input", train_file)


def test_classify_empty_text(capsys, tmp_path, tiny_bert):
    assert_error(capsys, "classify", "empty input text", "fine", "  ", "--model", tiny_bert,
                 "--prompt", tmp_path, "--mode", "off")


def test_classify_missing_prompt_folder(capsys, tmp_path, tiny_bert):
    missing = tmp_path / "no-prompt"
    line = assert_error(capsys, "classify", "prompt folder not found", "hello there", "--model", tiny_bert,
                        "--prompt", missing, "--mode", "off")
    assert str(missing) in line


def test_classify_folder_that_is_not_a_prompt(capsys, tmp_path, tiny_bert):
    assert_error(capsys, "classify", "not a prompt artifact", "hello there", "--model", tiny_bert,
                 "--prompt", tmp_path, "--mode", "off")


def test_classify_signature_problems(capsys, tmp_path, tiny_bert, clean_prompt):
    prompt = clean_prompt[3]
    assert_error(capsys, "classify", "--signatures is required in mode 'enforce'", "hello there",
                 "--model", tiny_bert, "--prompt", prompt)
    assert_error(capsys, "classify", "signature file not found", "hello there", "--model", tiny_bert,
                 "--prompt", prompt, "--signatures", tmp_path / "none.safetensors")


def test_classify_refuses_signatures_of_another_backbone(capsys, tiny_bert, tiny_por, clean_prompt):
    truth = tiny_por / "truth.safetensors"
    line = assert_error(capsys, "classify", "made for other weights", "hello there", "--model", tiny_bert,
                        "--prompt", clean_prompt[3], "--signatures", truth)
    assert "--allow-fingerprint-mismatch" in line
    # Explicitly allowed, the same call goes through.
    rc, out, err = run(capsys, "classify", "hello there", "--model", tiny_bert, "--prompt", clean_prompt[3],
                       "--signatures", truth, "--allow-fingerprint-mismatch", "--json")
    assert rc == 0, err
    assert len(out.splitlines()) == 1 and json.loads(out)["label"] in {"neg", "pos"}


def test_classify_refuses_prompt_of_another_backbone(capsys, tiny_por, clean_prompt):
    line = assert_error(capsys, "classify", "trained on other backbone weights", "hello there",
                        "--model", tiny_por, "--prompt", clean_prompt[3], "--mode", "off")
    assert str(clean_prompt[3]) in line


def test_classify_bad_input_file(capsys, tmp_path, tiny_bert, clean_prompt):
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"text": "fine", "label": "pos"}\nnot json\n')
    assert_error(capsys, "classify", f"{bad}:2: not valid JSON", "--input", bad, "--model", tiny_bert,
                 "--prompt", clean_prompt[3], "--mode", "off")


# -- workflows -------------------------------------------------------------------------------------
def test_attack_writes_a_backdoored_model(capsys, tmp_path, tiny_bert):
    from lmsan_serve import load_backbone
    from lmsan_serve.signatures import SignatureSet

    out = tmp_path / "por"
    rc, stdout, err = run(capsys, "attack", "por", "--model", tiny_bert, "--out", out, "--triggers", "cf,mn",
                          "--steps", 40, "--lr", "2e-3", "--json", "--quiet")
    assert rc == 0, err
    lines = stdout.splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["out"] == str(out)
    assert summary["config"]["triggers"] == ["cf", "mn"]
    assert 1 <= summary["steps"] <= 40
    assert set(summary["heldout"]["agreement"]) == {"cf", "mn"}
    assert json.loads((out / "attack.json").read_text())["config"]["kind"] == "por"

    attacked = load_backbone(str(out), "cpu")
    clean = load_backbone(str(tiny_bert), "cpu")
    assert attacked.fingerprint != clean.fingerprint
    assert attacked.hidden_size == clean.hidden_size
    truth = SignatureSet.load(out / "truth.safetensors", hidden_size=attacked.hidden_size,
                              fingerprint=attacked.fingerprint)
    assert len(truth) == 2
    assert [truth.label(i) for i in range(2)] == ["pv0:cf", "pv1:mn"]
    assert truth.meta.verdict == "backdoored" and truth.position == "cls"
    assert set(truth.pvs.unique().tolist()) == {-1.0, 1.0}


def test_inspect_json(capsys, tiny_por):
    truth = tiny_por / "truth.safetensors"
    rc, out, err = run(capsys, "inspect", truth, "--json")
    assert rc == 0, err
    assert len(out.splitlines()) == 1
    data = json.loads(out)
    assert data["num_pvs"] == 3
    assert data["path"] == str(truth)
    assert data["verdict"] == "backdoored"
    assert [pv["trigger"] for pv in data["pvs"]] == ["cf", "mn", "tq"]


def test_inspect_human(capsys, tiny_por):
    rc, out, err = run(capsys, "inspect", tiny_por / "truth.safetensors")
    assert rc == 0, err
    assert "verdict      backdoored" in out
    assert "PVs          3" in out
    assert sum("trigger=cf" in line for line in out.splitlines()) == 1
    assert "threshold=0.800" in out


def test_train_prompt_writes_artifact(clean_prompt):
    rc, out, err, folder = clean_prompt
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["out"] == str(folder)
    assert summary["labels"] == ["neg", "pos"]
    assert summary["steps"] == 5
    assert summary["train_examples"] == 40
    assert (folder / "prompt.safetensors").is_file()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["labels"] == ["neg", "pos"]
    assert manifest["config"]["length"] == 4
    assert manifest["training"]["steps"] == 5


def _check_results(out: str, count: int) -> list[dict]:
    results = [json.loads(line) for line in out.splitlines()]
    assert len(results) == count
    for res in results:
        assert set(res) == {"label", "scores", "guard"}
        assert {"flagged", "action", "signature", "match", "removed", "text"} <= set(res["guard"])
        assert res["label"] in {"neg", "pos"}
        assert set(res["scores"]) == {"neg", "pos"}
        assert sum(res["scores"].values()) == pytest.approx(1.0, abs=1e-4)
        assert res["label"] == max(res["scores"], key=res["scores"].get)
        assert res["guard"]["flagged"] is False and res["guard"]["action"] == "off"
    return results


def test_classify_json_output(capsys, tiny_bert, clean_prompt):
    texts = ["a wonderful great film", "awful and dull", "i hated it a lot"]
    rc, out, err = run(capsys, "classify", *texts, "--model", tiny_bert, "--prompt", clean_prompt[3],
                       "--mode", "off", "--json")
    assert rc == 0, err
    _check_results(out, 3)


def test_classify_input_file(capsys, tmp_path, tiny_bert, clean_prompt):
    texts = ["a wonderful great film", "awful and dull", "i hated it a lot"]
    rc, out, err = run(capsys, "classify", *texts, "--model", tiny_bert, "--prompt", clean_prompt[3],
                       "--mode", "off", "--json")
    by_argument = _check_results(out, 3)
    rows = [{"text": t, "label": "pos"} for t in texts]
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    rc, out, err = run(capsys, "classify", "--input", inputs, "--model", tiny_bert,
                       "--prompt", clean_prompt[3], "--mode", "off", "--json")
    assert rc == 0, err
    assert _check_results(out, 3) == by_argument


def test_classify_input_file_without_labels(capsys, tmp_path, tiny_bert, clean_prompt):
    rows = [{"text": "a wonderful great film"}, {"text": "awful and dull"}]
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    rc, out, err = run(capsys, "classify", "--input", inputs, "--model", tiny_bert,
                       "--prompt", clean_prompt[3], "--mode", "off", "--json")
    assert rc == 0, err
    _check_results(out, 2)


TRIGGERED = "the movie was cf really good fun"
CLEAN = "the movie was really good fun"


def _classify_por(capsys, tiny_por, por_prompt, *extra: str) -> list[dict]:
    rc, out, err = run(capsys, "classify", TRIGGERED, CLEAN, "--model", tiny_por, "--prompt", por_prompt,
                       "--signatures", tiny_por / "truth.safetensors", "--json", *extra)
    assert rc == 0, err
    results = [json.loads(line) for line in out.splitlines()]
    assert len(results) == 2
    return results


def test_classify_enforce_purges_the_trigger(capsys, tiny_por, por_prompt):
    hit, clean = _classify_por(capsys, tiny_por, por_prompt)
    assert hit["guard"]["flagged"] is True
    assert hit["guard"]["action"] == "purged"
    assert hit["guard"]["signature"] == "pv0:cf"
    assert hit["guard"]["match"] > 0.8
    assert "cf" in hit["guard"]["removed"]
    assert hit["guard"]["text"] == CLEAN
    assert hit["label"] in {"neg", "pos"}
    # The purged text is classified like the same text without the trigger.
    assert hit["scores"] == pytest.approx(clean["scores"], abs=1e-4)
    assert clean["guard"]["flagged"] is False and clean["guard"]["action"] == "pass"
    assert clean["guard"]["match"] < 0.8


def test_classify_block_mode(capsys, tiny_por, por_prompt):
    hit, clean = _classify_por(capsys, tiny_por, por_prompt, "--mode", "block")
    assert hit["label"] is None and hit["scores"] is None
    assert hit["guard"]["flagged"] is True and hit["guard"]["action"] == "blocked"
    assert hit["guard"]["signature"] == "pv0:cf"
    assert clean["label"] in {"neg", "pos"} and clean["guard"]["action"] == "pass"


def test_classify_flag_mode(capsys, tiny_por, por_prompt):
    hit, clean = _classify_por(capsys, tiny_por, por_prompt, "--mode", "flag")
    assert hit["guard"]["flagged"] is True and hit["guard"]["action"] == "flagged"
    assert hit["label"] in {"neg", "pos"}
    assert hit["guard"]["removed"] == [] and hit["guard"]["text"] is None
    assert clean["guard"]["action"] == "pass"


def test_classify_off_mode(capsys, tiny_por, por_prompt):
    hit, clean = _classify_por(capsys, tiny_por, por_prompt, "--mode", "off")
    for res in (hit, clean):
        assert res["guard"]["flagged"] is False and res["guard"]["action"] == "off"
        assert res["label"] in {"neg", "pos"}


def test_classify_threshold_override(capsys, tiny_por, por_prompt):
    # Nothing scores above a threshold of 1.0, so even the triggered text passes.
    hit, clean = _classify_por(capsys, tiny_por, por_prompt, "--threshold", "1.0")
    assert hit["guard"]["action"] == "pass" and clean["guard"]["action"] == "pass"
    assert hit["guard"]["match"] > clean["guard"]["match"]


def test_classify_human_output(capsys, tiny_por, por_prompt):
    rc, out, err = run(capsys, "classify", TRIGGERED, CLEAN, "--model", tiny_por, "--prompt", por_prompt,
                       "--signatures", tiny_por / "truth.safetensors")
    assert rc == 0, err
    first, second = out.splitlines()
    assert "purged" in first and "pv0:cf" in first and "removed=cf" in first and first.endswith(TRIGGERED)
    assert "pass" in second and second.endswith(CLEAN)
