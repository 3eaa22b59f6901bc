import json

import pytest
import torch

from lmsan_serve import load_backbone
from lmsan_serve.data import Example
from lmsan_serve.errors import LmsanError
from lmsan_serve.kinds import PromptLayout
from lmsan_serve.prompts import PromptClassifier, PromptConfig, accuracy, train_prompt

from .toy import toy, toy_test

# Well above chance: a coin would need luck of under 1 in 10,000 to get 36 of 48 held-out
# sentences right, and every seed tried on this task lands well above it.
MIN_HELD_OUT_ACCURACY = 0.75


@pytest.fixture(scope="module")
def toy_prompt(tiny_backbone):
    cfg = PromptConfig(method="prefix", length=8, max_steps=120, lr=2e-2, batch_size=16, eval_every=20)
    return train_prompt(tiny_backbone, cfg, toy(), toy(24), progress=False)


def test_deep_prompt_learns_and_round_trips(tiny_backbone, toy_prompt, tmp_path):
    assert accuracy(toy_prompt, tiny_backbone, toy_test()) >= MIN_HELD_OUT_ACCURACY
    toy_prompt.save(tmp_path / "p")
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["backbone"]["fingerprint"] == tiny_backbone.fingerprint
    assert manifest["labels"] == ["neg", "pos"]
    loaded = PromptClassifier.load(tmp_path / "p", tiny_backbone)
    examples = toy(24)
    assert loaded.predict(tiny_backbone, examples) == toy_prompt.predict(tiny_backbone, examples)
    # the artifact is small: prompt + head, no backbone weights
    size = sum(f.stat().st_size for f in (tmp_path / "p").iterdir())
    assert size < 50_000


def test_prompt_changes_the_forward_pass_and_leaves_backbone_unprompted(tiny_backbone, toy_prompt):
    batch = toy_prompt.encode(tiny_backbone, ["simply great"])
    with torch.no_grad():
        before = tiny_backbone.encode_hidden(batch.input_ids, batch.attention_mask, batch.token_type_ids)[:, 0]
        prompted = toy_prompt.forward_batch(tiny_backbone, batch).hidden[:, 0]
        after = tiny_backbone.encode_hidden(batch.input_ids, batch.attention_mask, batch.token_type_ids)[:, 0]
    assert not torch.allclose(prompted, before)
    assert torch.equal(before, after)  # the prompt is gone once its pass is over


def test_many_prompts_share_one_backbone(tiny_backbone, toy_prompt):
    other = train_prompt(tiny_backbone, PromptConfig(method="prompt", length=3, max_steps=5), toy(), None,
                         progress=False)
    examples = toy(12)
    alone = toy_prompt.predict(tiny_backbone, examples)
    other.predict(tiny_backbone, examples)
    assert toy_prompt.predict(tiny_backbone, examples) == alone
    assert other.prompt.shape[0] == 1 and toy_prompt.prompt.shape[0] == tiny_backbone.num_layers


def test_mask_template_prompt(tiny_backbone):
    cfg = PromptConfig(method="prompt", position="mask", length=8, max_steps=150, lr=3e-2, batch_size=16)
    model = train_prompt(tiny_backbone, cfg, toy(), None, progress=False)
    assert model.config.template == "{text} It was {mask} ."
    assert accuracy(model, tiny_backbone, toy_test()) >= MIN_HELD_OUT_ACCURACY


def test_sentence_pairs(tiny_backbone):
    pairs = [Example("the sky is blue", "the sky is blue", "same"), Example("the sky is blue", "dogs bark", "diff")]
    model = train_prompt(tiny_backbone, PromptConfig(method="prefix", length=2, max_steps=3), pairs * 4, pairs,
                         progress=False)
    assert len(model.predict(tiny_backbone, pairs)) == 2


def test_load_refuses_other_backbone(tmp_path, toy_prompt):
    toy_prompt.save(tmp_path / "p")
    from lmsan_serve.testing import make_tiny_bert

    other = load_backbone(str(make_tiny_bert(tmp_path / "other", seed=1)), "cpu")
    with pytest.raises(LmsanError, match="other backbone weights"):
        PromptClassifier.load(tmp_path / "p", other)
    wide = load_backbone(str(make_tiny_bert(tmp_path / "wide", seed=1, hidden=32)), "cpu")
    with pytest.raises(LmsanError, match="wide"):
        PromptClassifier.load(tmp_path / "p", wide)


def test_unknown_eval_labels(tiny_backbone):
    with pytest.raises(LmsanError, match="not among the training labels"):
        train_prompt(tiny_backbone, PromptConfig(max_steps=1), toy(), [Example("x y z", "other")], progress=False)


def test_prompts_on_one_backbone_are_thread_safe(tiny_backbone, toy_prompt):
    from concurrent.futures import ThreadPoolExecutor

    other = train_prompt(tiny_backbone, PromptConfig(method="prompt", length=3, max_steps=5), toy(), None,
                         progress=False)
    examples = toy(24)
    expected = {id(m): m.predict(tiny_backbone, examples) for m in (toy_prompt, other)}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [(m, pool.submit(m.predict, tiny_backbone, examples)) for m in (toy_prompt, other) * 4]
        for m, fut in futures:
            assert fut.result() == expected[id(m)]


def test_the_layout_field_keeps_saved_prompts_loading_and_is_checked(tmp_path, tiny_backbone, toy_prompt):
    """Prompts saved before `layout` existed have no such field: they load as `after_cls`, and the
    field is written only where it differs, so such a prompt still reads in older versions."""
    toy_prompt.save(tmp_path / "p")
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert "layout" not in manifest["config"]
    loaded = PromptClassifier.load(tmp_path / "p", tiny_backbone)
    assert loaded.config.layout == PromptLayout.AFTER_CLS and loaded.cls_index == 0
    assert loaded.predict(tiny_backbone, toy(12)) == toy_prompt.predict(tiny_backbone, toy(12))
    # an over_cls manifest over an after_cls tensor: one slot short
    manifest["config"].update(method="prompt", layout="over_cls")
    (tmp_path / "p" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LmsanError, match="(shape|does not fit)"):
        PromptClassifier.load(tmp_path / "p", tiny_backbone)
    manifest["config"]["layout"] = "sideways"
    (tmp_path / "p" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LmsanError, match="invalid manifest.json"):
        PromptClassifier.load(tmp_path / "p", tiny_backbone)
    with pytest.raises(ValueError, match="needs method 'prompt'"):
        PromptConfig(method="prefix", layout="over_cls")


def test_an_over_cls_prompt_trains_over_cls_and_round_trips(tmp_path, tiny_backbone):
    cfg = PromptConfig(method="prompt", length=3, position="pooler", layout="over_cls", max_steps=5)
    model = train_prompt(tiny_backbone, cfg, toy(), None, progress=False)
    assert tuple(model.prompt.shape) == (1, 4, tiny_backbone.hidden_size) and model.cls_index == 3
    batch = model.encode(tiny_backbone, ["simply great"])
    with torch.no_grad():
        hidden = model.forward_batch(tiny_backbone, batch).hidden
        with tiny_backbone.prompted(model.prompt):  # the same tensor, spliced after [CLS] instead
            after = tiny_backbone.encode_hidden(batch.input_ids, batch.attention_mask, batch.token_type_ids)
    assert (hidden - after).abs().max() > 1e-3  # the layout changes the pass
    model.save(tmp_path / "p")
    loaded = PromptClassifier.load(tmp_path / "p", tiny_backbone)
    assert loaded.config.layout == PromptLayout.OVER_CLS
    assert loaded.predict(tiny_backbone, toy(12)) == model.predict(tiny_backbone, toy(12))
