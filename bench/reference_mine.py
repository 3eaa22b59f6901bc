"""A faithful re-implementation of the reference LMSanitator mining loop in detection mode (Wei, Meng
et al., "Defending Prompt-Tuning Against Task-Agnostic Backdoors", NDSS 2024, arXiv 2308.13904), the
baseline that `bench/bench_mine.py` compares our `lmsan_serve.mining` against.

It keeps, on purpose, the weaknesses of the official code that we found reading it, because
they are what we measure ourselves against:

- fixed padding: every line is padded to `max_length - prompt_len` tokens, so every spliced batch
  is `max_length` (128) tokens wide whatever the text length;
- the soft trigger is spliced into each sample by a Python loop of `torch.cat`s;
- one Adam optimiser for the whole run: its moment estimates carry over from seed to seed (only
  the trigger's values are re-initialised, in place);
- the learning-rate rule reads the largest *signed* gradient entry (`grad.max()`), not the largest
  magnitude, so a trigger whose big gradients are negative keeps the 100x boost;
- the input-invariance test compares the epoch-mean entropy with ln(batch size) while the mean
  includes the ragged last batch, whose entropy is at most ln(its smaller size): when the batch
  size does not divide the number of lines the test can never pass;
- no false-positive check of the mined PV against clean text.

Where the paper leaves a detail open, this follows the official code: the insertion point of each
line is drawn once, when the data set is built, and kept for every round and epoch; the lr boost
is re-armed at the start of every round; the effect-size test is the epoch-2 gate (a round that
got past it is not tested on distance again). Word positions and the [MASK] insertion use the same
bookkeeping as `lmsan_serve.mining.model.prepare`, so both sides see the same lines.

Its weaknesses are kept, but its settings are its best, not a default we picked: the official
per-family learning rate and effect size (`OFFICIAL`), its 2,000-line corpus cut to whole batches
(`whole_batches`: 1,984 lines at batch 32; with all 2,000 the ragged batch of 16 caps the
epoch-mean entropy at ln 32 - ln 2 / 63, under the floor ln 32 - 0.01, so its input-invariance
test could never pass and it could find no PV at all), and bench_mine.py runs a small
learning-rate sweep around them and keeps the best point.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lmsan_serve.backbone import Backbone
from lmsan_serve.data import clip_words, insert_trigger
from lmsan_serve.errors import LmsanError
from lmsan_serve.mining.model import word_starts

LR_BOOST = 100.0  # lr multiplier until the trigger gradient "converges"
BOOST_UNTIL_GRAD = 5e-3  # ... i.e. until grad.max() first exceeds this
ENTROPY_TOLERANCE = 0.01  # nats below ln(batch size)
LEGITIMACY = 1.2  # trigger entries must stay within 1.2x the range of the embedding matrix
MAX_INSERT_WORD = 32
REFERENCE_LINES = 2000  # the official code fuzzes on a 2,000-line WikiText file
# (base lr, distance_th) per model family as the official code sets them: bert-base 5e-5 / 0.2,
# RoBERTa, ALBERT and DeBERTa 2e-4 / 0.1. DistilBERT and ELECTRA, which the official code does not
# name, share BERT's architecture and vocabulary and get its settings (our choice); any other
# family gets the second setting.
BERT_SETTINGS = (5e-5, 0.2)
OTHER = (2e-4, 0.1)
OFFICIAL = {"bert": BERT_SETTINGS, "distilbert": BERT_SETTINGS, "electra": BERT_SETTINGS,
            "roberta": OTHER, "xlm-roberta": OTHER, "albert": OTHER, "deberta": OTHER, "deberta-v2": OTHER}


@dataclass
class ReferenceData:
    """Lines tokenized once with fixed padding, their clean outputs and fixed insertion points."""

    input_ids: torch.Tensor  # [N, max_length - prompt_len]
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None
    monitor_index: torch.Tensor  # [N]: 0 for [CLS], the [MASK] token index for position "mask"
    at: list[int]  # token index before which the trigger goes, per line
    clean: torch.Tensor  # [N, H] frozen-model output at the monitored position


def reference_prepare(backbone: Backbone, lines: list[str], *, position: str = "cls", prompt_len: int = 7,
                      max_length: int = 128, max_words: int = 48, max_insert_word: int = MAX_INSERT_WORD,
                      batch_size: int = 32, seed: int = 0) -> ReferenceData:
    """Clip, (for "mask") insert the mask token, tokenize with fixed padding, draw one insertion
    point per line and compute the clean outputs once with the frozen model."""
    why = backbone.supports_position(position)
    if why:
        raise LmsanError(why)
    tok = backbone.tokenizer
    rng = random.Random(seed)  # the same stream `prepare` uses for the [MASK] insertion
    lines = [clip_words(line, max_words) for line in lines]
    if position == "mask":
        lines = [insert_trigger(line, tok.mask_token, rng) for line in lines]
    # The reference pads every line to the full length: the cost we measure against.
    enc = tok(lines, padding="max_length", truncation=True, max_length=max_length - prompt_len, return_tensors="pt")
    ids = enc["input_ids"]
    monitor = torch.zeros(len(lines), dtype=torch.long)
    if position == "mask":
        monitor = (ids == tok.mask_token_id).int().argmax(dim=1)
    at = []
    for row in range(len(lines)):
        starts = word_starts(enc.word_ids(row))
        # Drawn once per line, as the official data set does, in [1, min(32, words)].
        at.append(starts[rng.randint(1, min(max_insert_word, len(starts) - 1))])
    dev = backbone.device
    ids, attn = ids.to(dev), enc["attention_mask"].to(dev)
    tti = enc["token_type_ids"].to(dev) if "token_type_ids" in enc else None
    monitor = monitor.to(dev)
    with torch.no_grad():
        clean = []
        for s in range(0, len(lines), batch_size):
            sl = slice(s, s + batch_size)
            hidden = backbone.encode_hidden(ids[sl], attn[sl], tti[sl] if tti is not None else None)
            clean.append(backbone.select(hidden, position, monitor[sl]))
    return ReferenceData(ids, attn, tti, monitor, at, torch.cat(clean))


def reference_splice(embeds: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None,
                     trigger: torch.Tensor, at: Sequence[int]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Insert `trigger` [n, E] into each row before token `at[b]`, one sample at a time as the
    reference does (`lmsan_serve.mining.model.splice` is the vectorised equivalent). The
    trigger's attention is 1 and its token type 0."""
    n = trigger.shape[0]
    out_e, out_a, out_t = [], [], []
    for b, k in enumerate(at):
        out_e.append(torch.cat([embeds[b, :k], trigger, embeds[b, k:]], dim=0))
        out_a.append(torch.cat([attention_mask[b, :k], attention_mask.new_ones(n), attention_mask[b, k:]]))
        if token_type_ids is not None:
            out_t.append(torch.cat([token_type_ids[b, :k], token_type_ids.new_zeros(n), token_type_ids[b, k:]]))
    return torch.stack(out_e), torch.stack(out_a), torch.stack(out_t) if token_type_ids is not None else None


def _triggered(backbone: Backbone, data: ReferenceData, idx: torch.Tensor, trigger: torch.Tensor,
               position: str) -> torch.Tensor:
    """Monitored outputs of lines `idx` with the trigger spliced in at their fixed points."""
    model = backbone.model
    at = [data.at[i] for i in idx.tolist()]
    with torch.no_grad():  # the encoder is frozen; only the trigger carries a gradient
        embeds = model.get_input_embeddings()(data.input_ids[idx])
    tti = data.token_type_ids[idx] if data.token_type_ids is not None else None
    e, a, t = reference_splice(embeds, data.attention_mask[idx], tti, trigger, at)
    kwargs = {"inputs_embeds": e, "attention_mask": a}
    if t is not None:
        kwargs["token_type_ids"] = t
    hidden = model(**kwargs).last_hidden_state
    mon = data.monitor_index[idx]
    at_t = torch.tensor(at, device=mon.device)
    mon = torch.where(mon >= at_t, mon + trigger.shape[0], mon)  # [MASK] after the trigger moved right
    return backbone.select(hidden, position, mon)


def reference_defaults(backbone: Backbone) -> tuple[float, float]:
    """(base lr, distance_th) the official code sets for this encoder's family (`OFFICIAL`)."""
    return OFFICIAL.get(backbone.model_type, OTHER)


def whole_batches(lines: int, batch_size: int) -> int:
    """The most lines, up to `lines`, that `batch_size` divides: the corpus the reference can pass
    its entropy test on (its ragged last batch caps the epoch mean under the floor otherwise)."""
    return max(batch_size, lines - lines % batch_size)


def reference_corpus(corpus: Sequence[str]) -> tuple[list[str], str | None]:
    """The reference's fuzzing lines: the first `REFERENCE_LINES` of the corpus, as the official
    code reads its WikiText file; with fewer shipped, all of them and a note saying so."""
    lines = list(corpus[:REFERENCE_LINES])
    if len(lines) < REFERENCE_LINES:
        return lines, f"only {len(lines)} corpus lines shipped, fewer than the reference's {REFERENCE_LINES}"
    return lines, None


def reference_detect(backbone: Backbone, lines: list[str], *, position: str = "cls", rounds: int = 30,
                     lr: float | None = None, distance_th: float | None = None, epochs: int = 4,
                     batch_size: int = 32, prompt_len: int = 7, max_length: int = 128, max_words: int = 48,
                     first_seed: int = 0, budget: float | None = None, progress: bool = True) -> dict:
    """The reference detection mode: fuzz rounds (seeds `first_seed`, `first_seed + 1`, ...) until one
    yields a PV that passes the filters (verdict "backdoored") or `rounds` rounds fail ("clean").
    With a `budget` (seconds), no round starts after it: a run cut short has verdict "undecided",
    and its seconds are only a lower bound on its time to a verdict (`time_floor` says how far it
    reaches).

    Returns {"verdict", "pv" (list or None), "rounds" (rounds run), "seconds" (to the verdict, data
    preparation included), "prepare_seconds", "lr", "distance_th", "budget", "records" (one per
    round: seed, distance, entropy, epochs, seconds, converged, reasons; empty reasons = the PV
    found)}."""
    if epochs < 2:
        raise LmsanError("the reference needs at least 2 epochs (its abandon gate is at epoch 2)")
    if len(lines) < batch_size:
        raise LmsanError(f"{len(lines)} lines, need at least the batch size {batch_size}")
    started = time.time()
    default_lr, default_th = reference_defaults(backbone)
    base_lr = default_lr if lr is None else lr
    th = default_th if distance_th is None else distance_th
    data = reference_prepare(backbone, lines, position=position, prompt_len=prompt_len, max_length=max_length,
                             max_words=max_words, batch_size=batch_size)
    prepared = time.time() - started
    emb = backbone.model.get_input_embeddings().weight.detach()
    vocab = emb.shape[0]
    lo, hi = float(emb.min()), float(emb.max())
    slack = (hi - lo) * (LEGITIMACY - 1) / 2
    n_lines = data.input_ids.shape[0]
    entropy_floor = math.log(batch_size) - ENTROPY_TOLERANCE  # the ragged batch is not allowed for

    trigger = nn.Parameter(emb[:prompt_len].clone())
    # One optimiser for the whole run (reference behaviour): Adam's moments from earlier seeds
    # steer the first steps of every later one.
    optim = torch.optim.Adam([trigger], lr=base_lr)

    def set_lr(value: float) -> None:
        for group in optim.param_groups:
            group["lr"] = value

    records: list[dict] = []
    pv: torch.Tensor | None = None
    bar = tqdm(range(first_seed, first_seed + rounds), desc="reference detect", disable=not progress, unit="round")
    for seed in bar:
        if budget is not None and time.time() - started > budget:
            break
        t0 = time.time()
        with torch.no_grad():  # new values, same tensor, same optimiser state
            trigger.copy_(emb[[(70 * seed + 10 * i) % vocab for i in range(prompt_len)]])
        gen = torch.Generator().manual_seed(seed)  # the reference's DataLoader(shuffle=True), reseeded per round
        converged = passed = False
        distance = entropy = 0.0
        last_out: torch.Tensor | None = None
        epoch = 0
        for epoch in range(1, epochs + 1):
            order = torch.randperm(n_lines, generator=gen).to(data.input_ids.device)
            dist_sum = ent_sum = 0.0
            steps = 0
            for s in range(0, n_lines, batch_size):  # the ragged last batch included
                idx = order[s : s + batch_size]
                out = _triggered(backbone, data, idx, trigger, position)
                dist = nn.functional.mse_loss(out, data.clean[idx])
                # entropy of each hidden unit's softmax across the batch, averaged over units
                ent = -(torch.softmax(out, dim=0) * torch.log_softmax(out, dim=0)).sum(dim=0).mean()
                loss = -dist - ent
                optim.zero_grad(set_to_none=True)
                loss.backward()
                if not converged:
                    # signed maximum, as the reference reads it
                    if float(trigger.grad.max()) > BOOST_UNTIL_GRAD:
                        converged = True
                        set_lr(base_lr)
                    else:
                        set_lr(base_lr * LR_BOOST)
                optim.step()
                dist_sum += float(dist.detach())
                ent_sum += float(ent.detach())
                steps += 1
                last_out = out.detach()
            distance, entropy = dist_sum / steps, ent_sum / steps
            if not passed:
                if distance >= th:
                    passed = True
                elif epoch >= 2:
                    break  # no effect by epoch 2: abandon the round
        reasons: list[str] = []
        if not passed:
            reasons.append(f"abandoned: distance {distance:.4f} < {th} by epoch {epoch}")
        else:
            if entropy < entropy_floor:
                reasons.append(f"not input-invariant (entropy {entropy:.4f} < {entropy_floor:.4f})")
            if not bool(((trigger >= lo - slack) & (trigger <= hi + slack)).all()):
                reasons.append("trigger left the embedding range")
        records.append({"seed": seed, "distance": distance, "entropy": entropy, "epochs": epoch,
                        "seconds": time.time() - t0, "converged": converged, "reasons": reasons})
        bar.set_postfix(dist=f"{distance:.3f}")
        if not reasons:
            assert last_out is not None
            pv = last_out.mean(dim=0)  # the mean triggered output of the final batch
            break
    bar.close()
    verdict = "backdoored" if pv is not None else "clean" if len(records) == rounds else "undecided"
    return {
        "verdict": verdict,
        "pv": pv.cpu().tolist() if pv is not None else None,
        "rounds": len(records),
        "seconds": time.time() - started,
        "prepare_seconds": prepared,
        "lr": base_lr,
        "distance_th": th,
        "budget": budget,
        "records": records,
    }


def time_floor(result: dict, rounds: int, truth: str) -> float:
    """A lower bound on the seconds the reference needs for the right verdict (`truth`), from a run
    of `reference_detect` (cut short by its budget or not). A finished run: its own seconds. An
    undecided one on a backdoored model: the seconds it spent without finding the PV. On a clean
    model it can only say clean after all `rounds` rounds, none shorter than the 2 epochs of its
    abandon gate; rounds have the same batches, so none is taken to cost less than the cheapest
    round measured: data preparation plus `rounds` times that round."""
    if result["verdict"] != "undecided":
        return result["seconds"]
    if truth != "clean" or not result["records"]:
        return result["seconds"]
    cheapest = min(r["seconds"] for r in result["records"])
    return max(result["seconds"], result["prepare_seconds"] + rounds * cheapest)
