import pytest

from lmsan_serve.encoding import encode, normalize_text, remove_units
from lmsan_serve.errors import LmsanError


def test_units_map_tokens_to_words(tiny_backbone):
    tok = tiny_backbone.tokenizer
    b = encode(tok, ["An cinematographically cf, film cf"], prompt_len=3)
    words = b.unit_words[0]
    assert words == ["an", "cinematographically", "cf", ",", "film", "cf"]
    # every token of a multi-piece word maps to that word; [CLS], prompt slots, [SEP], pads map to -1
    units = b.units[0].tolist()
    assert units[:4] == [-1, -1, -1, -1]
    pieces = [i for i, u in enumerate(units) if u == 1]
    assert len(pieces) >= 2  # four word pieces, one word
    assert b.attention_mask.shape == b.input_ids.shape == b.units.shape
    assert b.monitor_index.tolist() == [0]


def test_remove_units_drops_every_copy():
    tok_text = "An cinematographically cf, film cf"
    from transformers import AutoTokenizer

    from lmsan_serve.backbone import minilm_path

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    b = encode(tok, [tok_text])
    drop = {i for i, w in enumerate(b.unit_words[0]) if w == "cf"}
    assert remove_units(b.texts[0], b.unit_spans[0], drop, 0) == "An cinematographically , film"


def test_pairs_and_template(tiny_backbone):
    tok = tiny_backbone.tokenizer
    b = encode(tok, ["premise here"], ["hypothesis cf"])
    assert b.unit_spans[0][-1][0] == 1 and b.unit_words[0][-1] == "cf"
    t = encode(tok, ["good movie"], template="{text} It was {mask} .", prompt_len=2)
    assert t.input_ids[0, t.monitor_index[0]].item() == tok.mask_token_id
    # template words are not user words: only "good" and "movie" can be removed
    assert t.unit_words[0] == ["good", "movie"]
    # a user text holding a literal [MASK] does not move the monitored position
    t2 = encode(tok, ["[MASK] trick"], template="{text} It was {mask} .")
    assert t2.monitor_index[0].item() > 2


def test_normalize_folds_invisible_and_lookalike_characters():
    assert normalize_text("c\u200bf  ｃｆ") == "cf cf"


def test_bad_input():
    from transformers import AutoTokenizer

    from lmsan_serve.backbone import minilm_path

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    with pytest.raises(LmsanError):
        encode(tok, [])
    with pytest.raises(LmsanError):
        encode(tok, ["a"], ["b", "c"])
    with pytest.raises(LmsanError):
        encode(tok, ["a"], template="no placeholders")


def test_template_with_text_before_the_user_text(tiny_backbone):
    tok = tiny_backbone.tokenizer
    b = encode(tok, ["a fine cf movie"], template="Review: {text} It was {mask} .")
    assert b.unit_words[0] == ["a", "fine", "cf", "movie"]
    drop = {b.unit_words[0].index("cf")}
    assert remove_units(b.texts[0], b.unit_spans[0], drop, 0) == "a fine movie"
