"""Every supported encoder family loads, fingerprints, and runs prompted passes with [CLS] at 0."""

import pytest
import torch
from transformers import (
    AlbertConfig,
    AlbertModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    DebertaV2Config,
    DebertaV2Model,
    DistilBertConfig,
    DistilBertModel,
    ElectraConfig,
    ElectraModel,
    RobertaConfig,
    RobertaModel,
)

from lmsan_serve import load_backbone
from lmsan_serve.backbone import minilm_path
from lmsan_serve.errors import LmsanError
from lmsan_serve.prompts import PromptConfig, train_prompt

from .toy import toy

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=128, pad_token_id=0, initializer_range=0.2)
ARCHS = {
    "bert": (BertConfig, BertModel, COMMON),
    "roberta": (RobertaConfig, RobertaModel, COMMON),
    "electra": (ElectraConfig, ElectraModel, {**COMMON, "embedding_size": 16}),
    "deberta-v2": (DebertaV2Config, DebertaV2Model, {**COMMON, "relative_attention": True,
                                                      "pos_att_type": ["c2p", "p2c"]}),
    "albert": (AlbertConfig, AlbertModel, {**COMMON, "embedding_size": 16, "num_hidden_layers": 3}),
    "distilbert": (DistilBertConfig, DistilBertModel,
                   dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=128, pad_token_id=0,
                        initializer_range=0.2)),
}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(minilm_path()))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_backbone_family(arch, tokenizer, tmp_path):
    config_cls, model_cls, kwargs = ARCHS[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(vocab_size=tokenizer.vocab_size, **kwargs)).eval()
    model.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    backbone = load_backbone(str(tmp_path), "cpu")
    assert backbone.model_type == model.config.model_type
    assert len(backbone.fingerprint) == 64
    assert backbone.fingerprint == load_backbone(str(tmp_path), "cpu").fingerprint
    expected_depth = 3 if arch == "albert" else 2
    assert backbone.num_layers == expected_depth

    for method in ("prefix", "prompt"):
        clf = train_prompt(backbone, PromptConfig(method=method, length=3, max_steps=2), toy(8), None,
                           progress=False)
        assert clf.prompt.shape == ((expected_depth if method == "prefix" else 1), 3, backbone.hidden_size)
        batch = clf.encode(backbone, ["simply great film"])
        with torch.no_grad():
            prompted = clf.forward_batch(backbone, batch).hidden
            # every depth of a deep prompt is used: changing the last one changes the output
            if method == "prefix":
                saved = clf.prompt.data.clone()
                clf.prompt.data[-1] += 1.0
                changed = clf.forward_batch(backbone, batch).hidden
                clf.prompt.data.copy_(saved)
                assert not torch.allclose(changed[:, 0], prompted[:, 0])
            bare = backbone.encode_hidden(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        assert prompted.shape == bare.shape
        assert not torch.allclose(prompted[:, 0], bare[:, 0])

    # the purge's candidate ranking: the last layer's attention of [CLS], rebuilt from its projections
    batch = clf.encode(backbone, ["simply great film", "a dull and boring waste of time"])
    with torch.no_grad(), backbone.capturing_last_layer() as captured:
        backbone.encode_hidden(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        row = backbone.attention_row(captured.hidden, batch.attention_mask, torch.zeros(2, dtype=torch.long))
    assert row is not None and row.shape == batch.input_ids.shape
    assert torch.allclose(row.sum(-1), torch.ones(2)) and (row[batch.attention_mask == 0] == 0).all()
    if arch != "deberta-v2":  # DeBERTa adds relative-position terms that the ranking leaves out
        eager = model_cls.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
        kwargs = {"token_type_ids": batch.token_type_ids} if batch.token_type_ids is not None else {}
        with torch.no_grad():
            att = eager(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_attentions=True,
                        **kwargs).attentions[-1]
        assert torch.allclose(row, att[:, :, 0, :].mean(1), atol=1e-5)

    assert (backbone.supports_position("pooler") is None) == (arch in ("bert", "roberta", "albert"))
    assert backbone.supports_position("mask") is None
    assert backbone.supports_position("middle") is not None


def test_missing_model_folder():
    with pytest.raises(LmsanError, match="not found"):
        load_backbone("./no/such/model", "cpu")
    with pytest.raises(LmsanError, match="model folder not found: lmsan-out/no/por"):
        load_backbone("lmsan-out/no/por", "cpu")  # three parts: no hub id has them
