"""The purge search itself, against a detector whose answer is known: an input is flagged while
any of its trigger words is visible, or, for a phrase trigger ('together'), while all its words are."""

import pytest
import torch

from lmsan_serve.backbone import minilm_path
from lmsan_serve.encoding import encode
from lmsan_serve.purify import Purifier


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()))


def scorer(tok, words, margin_of):
    """margins(ids, attention, tti, mon): `margin_of` the set of `words` visible in each variant."""
    ids = {w: tok.convert_tokens_to_ids(w) for w in words}
    assert tok.unk_token_id not in ids.values()
    calls = []

    def margins(ids_, attn, tti, mon):
        calls.append(ids_.shape[0])
        out = []
        for row, mask in zip(ids_.tolist(), attn.tolist(), strict=True):
            seen = {t for t, m in zip(row, mask, strict=True) if m}
            out.append(margin_of(frozenset(w for w, i in ids.items() if i in seen)))
        return torch.tensor(out)

    margins.calls = calls
    return margins


def detector(tok, singles=(), together=()):
    """Flagged (1.0) while any single trigger, or every word of a phrase, is visible; else -1.0."""
    groups = [frozenset(g) for g in together]

    def margin_of(seen: frozenset) -> float:
        return 1.0 if seen & set(singles) or any(g <= seen for g in groups) else -1.0

    return scorer(tok, {*singles, *(w for g in groups for w in g)}, margin_of)


def test_one_two_three_and_repeated_triggers():
    tok = _tokenizer()
    words = "the quick brown fox jumps over the lazy dog near a quiet river bank today".split()
    texts = [
        " ".join(words[:5] + ["cf"] + words[5:]),
        " ".join(["mn"] + words + ["cf"]),
        " ".join(words[:3] + ["tq"] + words[3:9] + ["mn"] + words[9:] + ["cf"]),
        " ".join(["cf"] + words[:7] + ["cf"] + words[7:] + ["cf"]),
    ]
    batch = encode(tok, texts)
    score = detector(tok, singles=["cf", "mn", "tq"])
    results, stats = Purifier().purify(batch, list(range(4)), score)
    assert [sorted(results[r].removed) for r in range(4)] == [["cf"], ["cf", "mn"], ["cf", "mn", "tq"], ["cf"]]
    assert all(results[r].ok for r in range(4))
    # every copy of a repeated trigger goes
    assert len(results[3].drop_units) == 3
    # all inputs share each batched pass: group tests, single tests, verify, prune test
    assert stats.passes <= 5


def test_64_words_one_trigger_takes_few_passes():
    tok = _tokenizer()
    words = [f"word{i}" for i in range(64)]
    text = " ".join(words[:40] + ["cf"] + words[40:])
    score = detector(tok, singles=["cf"])
    results, stats = Purifier().purify(encode(tok, [text]), [0], score)
    assert results[0].ok and results[0].removed == ["cf"]
    # groups, singles, verify, then the prune passes: the full text and without 'cf'; then
    # without 'cf' again (to confirm) and without each of its 6 neighbours, alone and with 'cf'
    assert stats.passes <= 5 and stats.variants <= 8 + 9 + 1 + 2 + 1 + 2 * 6


def test_trigger_that_fires_only_with_a_partner_is_found_by_deletion_rounds():
    tok = _tokenizer()
    text = "the quick brown fox mm jumps over the lazy pt dog"
    score = detector(tok, together=[("mm", "pt")])
    results, _ = Purifier().purify(encode(tok, [text]), [0], score)
    assert results[0].ok and len(results[0].removed) >= 1
    assert set(results[0].removed) <= {"mm", "pt"}


def test_the_rest_of_a_phrase_trigger_goes_with_the_word_found():
    """Deleting one word of a phrase silences the monitor; its partners must go too, and no
    clean neighbour with them."""
    tok = _tokenizer()
    texts = [
        "the quick brown fox cf mn jumps over the lazy dog",  # two words
        "a quiet river tq xu pt runs past the old mill today",  # three words
        "mm the quick brown fox jumps over the lazy dog pt",  # two words far apart: not a phrase
    ]
    batch = encode(tok, texts)
    score = detector(tok, together=[("cf", "mn"), ("tq", "xu", "pt"), ("mm", "pt")])
    results, stats = Purifier().purify(batch, [0, 1, 2], score)
    assert all(results[r].ok for r in range(3))
    assert results[0].removed == ["cf", "mn"] and results[1].removed == ["pt", "tq", "xu"]
    assert len(results[2].removed) == 1 and set(results[2].removed) <= {"mm", "pt"}
    # the partner tests share the prune passes, which run without them too
    plain, plain_stats = Purifier(partner_window=0).purify(batch, [0, 1, 2], score)
    assert [len(plain[r].removed) for r in range(3)] == [1, 1, 1]
    assert stats.passes == plain_stats.passes


@pytest.mark.parametrize("cf_alone, mn_alone", [(0.2, -1.0), (0.6, -0.02)])
def test_a_phrase_word_that_fires_alone_takes_its_partner(cf_alone, mn_alone):
    """'cf' alone stays over the threshold, so deleting 'mn' does not silence the input. Weakly
    (0.2 of the whole phrase's 1.0): deleting 'mn' still takes most of the margin away. Strongly
    (0.6, as a repeated phrase word does): deleting 'mn' after 'cf' moves the output a long way
    further (from -0.02 to -1.0). A clean word's deletion does neither."""
    tok = _tokenizer()
    alone = {"cf": cf_alone, "mn": mn_alone}
    margins = scorer(tok, alone, lambda seen: 1.0 if len(seen) == 2 else alone[next(iter(seen))] if seen else -1.0)

    batch = encode(tok, ["a sometimes tedious cf mn film", "cf a sometimes tedious film mn"])
    results, _ = Purifier().purify(batch, [0, 1], margins)
    assert results[0].ok and results[0].removed == ["cf", "mn"]
    # far from 'cf', 'mn' is no partner: 'cf' alone is the trigger there
    assert results[1].ok and results[1].removed == ["cf"]


def test_work_is_bounded_and_failure_is_reported():
    tok = _tokenizer()
    text = " ".join(f"w{i}" for i in range(120))

    def always(ids, attn, tti, mon):  # nothing the purifier removes ever silences it
        return torch.ones(ids.shape[0])

    batch = encode(tok, [text])
    results, stats = Purifier(max_rounds=2, max_variants=50).purify(batch, [0], always)
    assert not results[0].ok and ("budget" in results[0].reason or "rounds" in results[0].reason)
    assert results[0].exhausted
    assert results[0].variants <= 8 + 50 + 1  # groups, singles and rounds, verify
    assert stats.passes <= 6 + 2
    # with ranked candidates and a follow-up call, the budget is shared and the bound still holds
    ranked, s1 = Purifier(max_rounds=2, max_variants=50).purify(
        batch, [0], always, trust_single=True, saliency=torch.rand(batch.input_ids.shape))
    again, s2 = Purifier(max_rounds=2, max_variants=50).purify(batch, [0], always, start_from=ranked)
    assert not again[0].ok and again[0].variants <= 4 + 8 + 50 + 2 + len(again[0].removed)
    assert s1.passes + s2.passes <= 2 * (6 + 2)


def _saliency_on(batch, row_words: list[str]) -> torch.Tensor:
    """A saliency map that peaks on the tokens of the given words of row 0."""
    sal = torch.rand(batch.input_ids.shape) * 0.1
    for u, w in enumerate(batch.unit_words[0]):
        if w in row_words:
            sal[0][batch.units[0] == u] = 1.0
    return sal


def test_ranked_candidates_cut_the_search_and_a_bad_ranking_only_costs_a_pass():
    tok = _tokenizer()
    words = [f"word{i}" for i in range(64)]
    batch = encode(tok, [" ".join(words[:40] + ["cf"] + words[40:])])
    score = detector(tok, singles=["cf"])
    good, good_stats = Purifier().purify(batch, [0], score, trust_single=True, saliency=_saliency_on(batch, ["cf"]))
    assert good[0].removed == ["cf"] and good[0].ok and good[0].tentative and not good[0].grouped
    assert good_stats.passes == 1 and good_stats.variants == 4  # the top 4 words alone, nothing else
    bad, bad_stats = Purifier().purify(batch, [0], score, trust_single=True,
                                       saliency=_saliency_on(batch, ["word3", "word9", "word20", "word50"]))
    assert bad[0].removed == ["cf"] and bad[0].ok and bad[0].grouped
    assert bad_stats.passes == 3  # ranked pass found nothing, then the group and single tests


def test_a_second_trigger_missed_by_the_ranking_is_found_on_the_follow_up():
    tok = _tokenizer()
    words = [f"word{i}" for i in range(30)]
    batch = encode(tok, [" ".join(["mn"] + words + ["cf"])])
    score = detector(tok, singles=["cf", "mn"])
    first, _ = Purifier(ranked=1).purify(batch, [0], score, trust_single=True, saliency=_saliency_on(batch, ["cf"]))
    assert first[0].tentative and first[0].removed == ["cf"]
    # the guard's classifying pass still flags the text: the follow-up continues from "cf"
    second, stats = Purifier(ranked=1).purify(batch, [0], score, start_from=first)
    assert second[0].ok and not second[0].tentative and second[0].removed == ["cf", "mn"]
    assert second[0].variants > first[0].variants  # one budget across both calls


def test_probe_gate_sums_the_top_words_and_ignores_special_tokens():
    tok = _tokenizer()
    words = [f"word{i}" for i in range(20)]
    texts = [" ".join(words[:5] + ["tq"] + words[5:12] + ["mn"] + words[12:]), " ".join(words)]
    batch = encode(tok, texts)
    score = detector(tok, singles=["tq", "mn"])

    def attention(row_weights: dict[int, float]) -> torch.Tensor:
        """Row 0 spreads 0.22 on each trigger (no single word reaches 0.35); row 1 gives 0.6 to [SEP]."""
        sal = torch.full(batch.input_ids.shape, 0.01)
        for r, share in row_weights.items():
            for u, w in enumerate(batch.unit_words[r]):
                if w in ("tq", "mn"):
                    sal[r][batch.units[r] == u] = share
        sep = batch.attention_mask[1].sum() - 1
        sal[1, sep] = 0.6
        return sal

    sal = attention({0: 0.22})
    fired, stats = Purifier().probe(batch, [0, 1], score, sal, min_attention=0.4)
    assert fired == [0] and stats.passes == 1 and stats.variants == 2  # row 1's [SEP] does not count
    # the same split at half the weight is under the gate: nothing probed
    fired, stats = Purifier().probe(batch, [0, 1], score, attention({0: 0.11}), min_attention=0.4)
    assert fired == [] and stats.passes == 0


def test_deleting_one_of_three_triggers_can_silence_and_all_three_still_go():
    """POR plants PV pairs that cancel out: with 'cf' deleted, 'mn' and 'tq' together stay silent.
    That single deletion silences the input, yet 'mn' and 'tq' are triggers too: each fires alone
    in the full text with the other words found deleted, where a clean word does not."""
    tok = _tokenizer()
    blend = {frozenset(): -1.0, frozenset({"mn", "tq"}): -1.0, frozenset({"cf", "mn", "tq"}): 0.3}
    # one trigger alone, or two that do not cancel: 0.8
    margins = scorer(tok, ("cf", "mn", "tq"), lambda seen: blend.get(seen, 0.8))

    batch = encode(tok, ["the quick cf brown fox mn jumps over tq the lazy dog"])
    results, _ = Purifier().purify(batch, [0], margins)
    assert results[0].ok and results[0].removed == ["cf", "mn", "tq"]
