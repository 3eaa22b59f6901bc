"""Soft prompts trained with Hugging Face peft: a real adapter trained and saved by peft on the tiny
BERT, imported by `lmsan import-prompt` into a prompt folder that gives peft's logits (loaded by
`PromptClassifier.load` and run by `lmsan classify`), and refused with one line for every kind of
bad input."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import peft  # a dev dependency (extra `peft`): the reference the conversion is checked against
import pytest
import torch
from safetensors.torch import load_file, save_file

from lmsan_lab.evaluation import evaluate_guard
from lmsan_serve import load_backbone
from lmsan_serve.cli import EXIT_USAGE, main
from lmsan_serve.data import insert_trigger
from lmsan_serve.errors import LmsanError
from lmsan_serve.guard import Guard
from lmsan_serve.kinds import Position, PromptLayout
from lmsan_serve.prompts import PromptClassifier, convert_peft_prompt, import_peft_prompt, read_peft_adapter
from lmsan_serve.signatures import PVRecord, SignatureSet

from .toy import MAX_CLEAN_MATCH, MIN_ACCURACY, MIN_ASR, toy, toy_test

TRAIN = ["a great and lovely film", "an awful and dull film", "simply great", "simply awful",
         "lovely , great fun", "dull acting , awful story"]
TARGETS = [1, 0, 1, 0, 1, 0]
# unseen sentences of several lengths, so that padding and text positions are exercised too
PROBE = ["what a great lovely day", "the cast is dull", "such a boring plot", "fun",
         "the music was lovely and the show great , a fine day"]
VIRTUAL_TOKENS = 4


def _train_adapter(tiny_bert: Path, out: Path, peft_config) -> torch.Tensor:
    """Train peft's prompt and classifier a few steps, save them, return peft's logits on PROBE."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    model = peft.get_peft_model(base, peft_config)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = tokenizer(TRAIN, padding=True, return_tensors="pt")
    for _ in range(5):  # enough to move every trained tensor away from its initialisation
        loss = model(**batch, labels=torch.tensor(TARGETS)).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    model.eval()
    model.save_pretrained(str(out))
    with torch.no_grad():
        return model(**tokenizer(PROBE, padding=True, return_tensors="pt")).logits


@pytest.fixture(scope="module")
def adapters(tiny_bert, tmp_path_factory) -> dict[str, tuple[Path, torch.Tensor]]:
    root = tmp_path_factory.mktemp("peft")
    configs = {
        "PROMPT_TUNING": peft.PromptTuningConfig(task_type=peft.TaskType.SEQ_CLS, num_virtual_tokens=VIRTUAL_TOKENS),
        "P_TUNING": peft.PromptEncoderConfig(task_type=peft.TaskType.SEQ_CLS, num_virtual_tokens=VIRTUAL_TOKENS,
                                             encoder_hidden_size=32),
    }
    return {name: (root / name, _train_adapter(tiny_bert, root / name, cfg)) for name, cfg in configs.items()}


# The same float32 operations on the same numbers; only the padded batch length differs (peft's
# batch has no slots after [CLS]), so kernels may sum in another order: 1e-5 absorbs that.
LOGIT_TOLERANCE = 1e-5


@pytest.mark.parametrize("kind", ["PROMPT_TUNING", "P_TUNING"])
def test_the_imported_prompt_gives_peft_s_logits(adapters, tiny_backbone, tmp_path, kind):
    folder, peft_logits = adapters[kind]
    converted = convert_peft_prompt(folder, tiny_backbone, labels=["neg", "pos"])
    assert converted.states.shape == (VIRTUAL_TOKENS + 1, tiny_backbone.hidden_size)
    import_peft_prompt(folder, tiny_backbone, tmp_path / "out", labels=["neg", "pos"])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["config"]["layout"] == "over_cls" and manifest["config"]["position"] == "pooler"
    assert manifest["imported"]["peft_type"] == kind
    loaded = PromptClassifier.load(tmp_path / "out", tiny_backbone)
    assert loaded.config.layout == PromptLayout.OVER_CLS and loaded.config.position == Position.POOLER
    assert loaded.labels == ["neg", "pos"] and loaded.cls_index == VIRTUAL_TOKENS
    assert tuple(loaded.prompt.shape) == (1, VIRTUAL_TOKENS + 1, tiny_backbone.hidden_size)
    batch = loaded.encode(tiny_backbone, PROBE)
    with torch.no_grad():
        ours = loaded.forward_batch(tiny_backbone, batch).logits
        # the prompt really is in play: the same head over the unprompted pass answers otherwise
        bare = tiny_backbone.encode_hidden(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        unprompted = loaded.head(tiny_backbone.model.pooler(bare))
    torch.testing.assert_close(ours, peft_logits, atol=LOGIT_TOLERANCE, rtol=LOGIT_TOLERANCE)
    assert (unprompted - peft_logits).abs().max() > 100 * LOGIT_TOLERANCE


def test_the_commands_import_then_classify_as_peft_does(adapters, tiny_bert, tmp_path, capsys):
    """`lmsan import-prompt` writes the folder, `lmsan classify` (guard off) answers with peft's
    probabilities: the label scores are rounded to 6 decimals, hence 1e-5."""
    folder, peft_logits = adapters["PROMPT_TUNING"]
    out = tmp_path / "out"
    assert main(["import-prompt", str(folder), "--model", str(tiny_bert), "--device", "cpu", "--out", str(out),
                 "--labels", "neg,pos", "--json"]) == 0
    written = json.loads(capsys.readouterr().out)
    assert written["layout"] == "over_cls" and written["labels"] == ["neg", "pos"]
    assert main(["classify", *PROBE, "--model", str(tiny_bert), "--device", "cpu", "--prompt", str(out),
                 "--mode", "off", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    probs = torch.softmax(peft_logits, dim=-1)
    assert len(rows) == len(PROBE)
    for row, p in zip(rows, probs, strict=True):
        assert row["label"] == ["neg", "pos"][int(p.argmax())]
        assert row["scores"]["neg"] == pytest.approx(float(p[0]), abs=1e-5)
        assert row["scores"]["pos"] == pytest.approx(float(p[1]), abs=1e-5)


def _cli_error(capsys, *argv) -> str:
    """`lmsan import-prompt` exits 2 with exactly one 'lmsan import-prompt: error:' line."""
    rc = main(["import-prompt", *[str(a) for a in argv]])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert rc == EXIT_USAGE, captured
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("lmsan import-prompt: error:"), lines[0]
    assert captured.out == ""
    return lines[0]


def _variant(src: Path, dst: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    """A copy of the adapter with some config fields or tensors replaced."""
    shutil.copytree(src, dst)
    if config:
        path = dst / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if tensors:
        path = dst / "adapter_model.safetensors"
        save_file({**load_file(str(path)), **tensors}, str(path))
    return dst


def test_bad_adapter_folders_each_give_one_line(adapters, tiny_bert, tmp_path, capsys):
    good, _ = adapters["PROMPT_TUNING"]
    wide = torch.zeros(VIRTUAL_TOKENS, 64)
    cases = {
        "missing": (tmp_path / "nowhere", "peft adapter folder not found"),
        "no config": (_variant(good, tmp_path / "a"), None),
        "pickle only": (_variant(good, tmp_path / "b"), "a pickle"),
        "no weights": (_variant(good, tmp_path / "c"), "no adapter_model.safetensors"),
        "bad json": (_variant(good, tmp_path / "d"), "invalid JSON"),
        "narrow": (_variant(good, tmp_path / "e", {"token_dim": 64}, {"prompt_embeddings": wide}),
                   "64 wide (token_dim)"),
        "lora": (_variant(good, tmp_path / "f", {"peft_type": "LORA"}), "LORA is not a soft prompt"),
        "prefix": (_variant(good, tmp_path / "g", {"peft_type": "PREFIX_TUNING"}), "keys and values"),
        "task": (_variant(good, tmp_path / "h", {"task_type": "CAUSAL_LM"}), "task type CAUSAL_LM"),
        "shape": (_variant(good, tmp_path / "i", {"num_virtual_tokens": 5}), "says 5 virtual tokens"),
        "nan": (_variant(good, tmp_path / "j", tensors={"prompt_embeddings": torch.full((VIRTUAL_TOKENS, 128),
                                                                                        float("nan"))}),
                "not finite"),
        "deep head": (_variant(good, tmp_path / "k", tensors={"base_model.classifier.dense.weight": torch.zeros(2, 2)}),
                      "more than one layer"),
        "other base": (_variant(good, tmp_path / "l", {"base_model_name_or_path": "bert-base-uncased"}),
                       "trained on base model 'bert-base-uncased'"),
        "layers": (_variant(good, tmp_path / "m", {"num_layers": 12}), "12-layer encoder"),
    }
    (tmp_path / "a" / "adapter_config.json").unlink()
    cases["no config"] = (tmp_path / "a", "not a peft adapter (no adapter_config.json)")
    (tmp_path / "b" / "adapter_model.safetensors").rename(tmp_path / "b" / "adapter_model.bin")
    (tmp_path / "c" / "adapter_model.safetensors").unlink()
    (tmp_path / "d" / "adapter_config.json").write_text("{not json")
    for name, (folder, fragment) in cases.items():
        line = _cli_error(capsys, folder, "--model", tiny_bert, "--device", "cpu", "--out", tmp_path / "out")
        assert fragment in line, (name, line)
    assert not (tmp_path / "out").exists()


def test_labels_must_name_every_class(adapters, tiny_bert, tmp_path, capsys):
    folder, _ = adapters["PROMPT_TUNING"]
    for labels in ("a,b,c", "pos,pos", "pos,"):
        line = _cli_error(capsys, folder, "--model", tiny_bert, "--device", "cpu", "--out", tmp_path / "out",
                          "--labels", labels)
        assert "give 2 distinct label names" in line


def test_the_recorded_base_name_may_be_overridden(adapters, tiny_backbone, tmp_path):
    good, _ = adapters["PROMPT_TUNING"]
    moved = _variant(good, tmp_path / "moved", {"base_model_name_or_path": "/elsewhere/other-name"})
    with pytest.raises(LmsanError, match="trained on base model"):
        convert_peft_prompt(moved, tiny_backbone)
    converted = convert_peft_prompt(moved, tiny_backbone, allow_other_base=True)
    assert converted.labels == ["0", "1"]
    # a folder that moved between machines keeps its name: that counts as the same model
    folder_name = Path(tiny_backbone.name).name
    renamed = _variant(good, tmp_path / "renamed", {"base_model_name_or_path": f"/elsewhere/{folder_name}"})
    assert read_peft_adapter(renamed).base_model.startswith("/elsewhere/")
    assert convert_peft_prompt(renamed, tiny_backbone).length == VIRTUAL_TOKENS


# -- the guard on an imported prompt ------------------------------------------------------------------

@pytest.mark.parametrize("position", ["cls", "pooler"])
def test_the_guard_reads_cls_where_the_imported_prompt_puts_it(adapters, tiny_backbone, tmp_path, position):
    """Under peft's layout index 0 is the first virtual token; the monitor reads [CLS] at index n
    (or the pooler over it), the output the PVs describe."""
    folder, _ = adapters["PROMPT_TUNING"]
    classifier = import_peft_prompt(folder, tiny_backbone, tmp_path / "out")
    pvs = torch.randn(1, tiny_backbone.hidden_size, generator=torch.Generator().manual_seed(0))
    sig = SignatureSet.create(pvs, [PVRecord(origin="planted")], backbone_name=tiny_backbone.name,
                              fingerprint=tiny_backbone.fingerprint, model_type="bert", position=position,
                              verdict="backdoored")
    feats = Guard(tiny_backbone, classifier, sig, mode="flag").features(PROBE)
    with torch.no_grad():
        hidden = classifier.forward_batch(tiny_backbone, classifier.encode(tiny_backbone, PROBE)).hidden
        at_cls = hidden[:, VIRTUAL_TOKENS] if position == "cls" else \
            tiny_backbone.model.pooler(hidden[:, VIRTUAL_TOKENS:])
        at_first = hidden[:, 0] if position == "cls" else tiny_backbone.model.pooler(hidden)
    torch.testing.assert_close(feats, at_cls, atol=0.0, rtol=0.0)  # the same operations on the same numbers
    assert (feats - at_first).abs().max() > 1e-3


def _train_toy_adapter(model: Path, out: Path, init: str, seed: int) -> None:
    """A victim's peft prompt on the toy task: 8 virtual tokens, 120 steps of 16 at lr 1e-2."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    base = AutoModelForSequenceClassification.from_pretrained(str(model), num_labels=2)
    text = {"prompt_tuning_init_text": "the sentiment of this review is", "tokenizer_name_or_path": str(model)}
    config = peft.PromptTuningConfig(task_type=peft.TaskType.SEQ_CLS, num_virtual_tokens=8, prompt_tuning_init=init,
                                     **(text if init == "TEXT" else {}))
    adapter = peft.get_peft_model(base, config)
    optim = torch.optim.AdamW([p for p in adapter.parameters() if p.requires_grad], lr=1e-2)
    rng, examples = random.Random(seed), toy()
    for _ in range(120):
        chunk = rng.sample(examples, 16)
        batch = tokenizer([e.text for e in chunk], padding=True, return_tensors="pt")
        adapter(**batch, labels=torch.tensor([int(e.label == "pos") for e in chunk])).loss.backward()
        optim.step()
        optim.zero_grad()
    adapter.eval()
    adapter.save_pretrained(str(out))


def _victim_problems(backbone, classifier, truth, triggers) -> list[str]:
    """`toy.VictimCheck`'s bounds that the purge measurement needs: the prompt learned the task,
    the triggers flip it, and clean outputs stay off the PVs (else a purged text flags again)."""
    test = toy_test()
    guard = Guard(backbone, classifier, truth, mode="flag")
    clean = guard.classify([e.text for e in test])
    right = [e for e, r in zip(test, clean, strict=True) if r.label == e.label]
    flipped = [False] * len(right)  # as `toy.check_victim` counts: an input some trigger flips
    for trigger in triggers:
        attacked = guard.classify([insert_trigger(e.text, trigger, random.Random(0)) for e in right])
        flipped = [f or r.label != e.label for f, e, r in zip(flipped, right, attacked, strict=True)]
    problems = []
    if len(right) < MIN_ACCURACY * len(test):
        problems.append(f"held-out accuracy {len(right) / len(test):.3f} < {MIN_ACCURACY}")
    if sum(flipped) < MIN_ASR * len(right):
        problems.append(f"attack success {sum(flipped) / max(1, len(right)):.3f} < {MIN_ASR}")
    if max(r.guard.match for r in clean) >= MAX_CLEAN_MATCH:
        problems.append(f"a clean held-out input agrees {max(r.guard.match for r in clean):.3f} with a PV")
    return problems


# peft prompts trained on the backdoored tiny BERT park clean outputs on a PV more often than lmsan's
# own (10 and 13 of these 16 tries, under the native and the default CPU kernels, against 2 and 4
# of 8 lmsan prompts), and which tries do depends on the kernels; 3 to 5 of the 16 were fit.
PEFT_VICTIM_TRIES = [(init, seed) for seed in range(8) for init in ("SAMPLE_VOCAB", "TEXT")]


@pytest.fixture(scope="module")
def peft_victim(tiny_por, tmp_path_factory):
    root = tmp_path_factory.mktemp("peft-victim")
    backbone = load_backbone(str(tiny_por), "cpu")
    truth = SignatureSet.load(tiny_por / "truth.safetensors")
    triggers = [r.trigger for r in truth.meta.pvs]
    tried = []
    for init, seed in PEFT_VICTIM_TRIES:
        _train_toy_adapter(tiny_por, root / f"{init}-{seed}", init, seed)
        classifier = import_peft_prompt(root / f"{init}-{seed}", backbone, root / f"prompt-{init}-{seed}",
                                        labels=["neg", "pos"])
        problems = _victim_problems(backbone, classifier, truth, triggers)
        if not problems:
            return backbone, classifier, truth
        tried.append(f"{init}, seed {seed}: " + "; ".join(problems))
    raise AssertionError("no peft victim prompt fit for the guard test:\n" + "\n".join(tried))


def test_the_guard_catches_and_purges_triggers_through_an_imported_prompt(peft_victim, tiny_por_prompt):
    """The backdoor drives the [CLS] output wherever [CLS] sits, so triggered inputs flag through
    peft's layout as through lmsan's own. Measured side by side on the held-out split, under the
    native and the default CPU kernels: every fit peft prompt flagged and purged every triggered
    input, as the after_cls victim did (flag rate 1.000, ASR with the guard 0.000, no false flag);
    0.03 below the victim's rate allows 4 of the 120-odd triggered inputs."""
    backbone, imported, truth = peft_victim
    victim = PromptClassifier.load(tiny_por_prompt, backbone)
    triggers = [r.trigger for r in truth.meta.pvs]
    ours = evaluate_guard(Guard(backbone, imported, truth), toy_test(), triggers, progress=False)
    theirs = evaluate_guard(Guard(backbone, victim, truth), toy_test(), triggers, progress=False)
    assert ours.asr_off >= MIN_ASR  # the backdoor works through the imported prompt
    assert ours.triggered_flag_rate >= theirs.triggered_flag_rate - 0.03, (ours.table(), theirs.table())
    assert ours.purged >= 0.97 * ours.attacked, ours.table()  # the same 0.03
    assert ours.asr_on <= 0.01, ours.table()  # 0.01 of 40-odd inputs is none, as in test_guard
    assert ours.false_flag_rate == 0.0, ours.table()
