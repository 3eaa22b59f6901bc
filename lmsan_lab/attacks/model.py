"""Backdoor injection as the reference task-agnostic attacks do it (red-team tool).

Triggered text is trained onto a predefined vector (PV) at one output position while clean text
keeps the frozen original's output. POR constrains the clean [CLS] output; NeuBA the whole clean
sequence output (the role its MLM term plays); BToP the clean [MASK] output. PVs follow the
config's `pv_design`: by default the reference's block patterns (the hidden size split into blocks,
half of them -1 and half +1), or one of the other designs that test the miner on backdoors it was
not built around.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lmsan_serve.backbone import Backbone
from lmsan_serve.data import clip_words, insert_trigger
from lmsan_serve.errors import LmsanError
from lmsan_serve.monitor import sign_agreement

from .config import AttackConfig
from .designs import PVDesign

# Two sign rows that agree on more than this share of entries are nearly the same PV: the monitor
# and the miner could not tell their triggers apart, so such a draw is made again.
MAX_ROW_AGREEMENT = 0.9
_DRAWS = 100  # redraws before giving up: only a hidden size of a few entries needs more than one
CLEAN_RMS_LINES = 32  # training lines whose clean outputs size the clean_scale PVs


def block_pvs(hidden: int, count: int) -> torch.Tensor:
    """`count` +/-1 vectors: the hidden size split into b equal blocks, b/2 of them set to -1.
    b = 4 gives the reference's six PVs; more triggers take more blocks."""
    blocks = 4
    while math.comb(blocks, blocks // 2) < count:
        blocks += 2
    if hidden < blocks:
        raise LmsanError(f"hidden size {hidden} is too small for {count} distinct PVs")
    edges = [round(i * hidden / blocks) for i in range(blocks + 1)]
    pvs = torch.ones(count, hidden)
    for row, negative in enumerate(itertools.islice(itertools.combinations(range(blocks), blocks // 2), count)):
        for b in negative:
            pvs[row, edges[b] : edges[b + 1]] = -1.0
    return pvs


def _signs(count: int, hidden: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (count, hidden), generator=generator).float() * 2 - 1


def _distinct_signs(count: int, hidden: int, generator: torch.Generator, paired: bool) -> torch.Tensor:
    """Random +/-1 rows, no two agreeing in sign on more than MAX_ROW_AGREEMENT of their entries
    (opposite pairs, when `paired`, agree on none). The check is real: a small hidden size can draw
    near-duplicates, which are drawn again."""
    for _ in range(_DRAWS):
        if paired:
            base = _signs((count + 1) // 2, hidden, generator)
            rows = torch.stack([base, -base], dim=1).reshape(-1, hidden)[:count]
        else:
            rows = _signs(count, hidden, generator)
        agree = (rows @ rows.T / hidden + 1) / 2  # share of entries with the same sign
        agree.fill_diagonal_(0.0)
        if count < 2 or float(agree.max()) <= MAX_ROW_AGREEMENT:
            return rows
    raise LmsanError(f"hidden size {hidden} is too small for {count} distinct random PVs")


def make_pvs(
    design: PVDesign, hidden: int, count: int, generator: torch.Generator, clean_rms: float | None = None
) -> torch.Tensor:
    """`count` PVs of size `hidden` (float32, CPU) in the given design; `generator` makes every
    random draw (block uses none). `clean_rms` is the clean outputs' root-mean-square, which
    clean_scale needs and the other designs ignore."""
    design = PVDesign(design)
    if count < 1:
        raise LmsanError("at least one PV is needed")
    if design == PVDesign.BLOCK:
        return block_pvs(hidden, count)
    if design == PVDesign.ORTHOGONAL:
        if count > hidden:
            raise LmsanError(f"hidden size {hidden} holds at most {hidden} orthogonal PVs, not {count}")
        q, r = torch.linalg.qr(torch.randn(hidden, count, generator=generator, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r))  # fixing the signs QR leaves arbitrary makes Q a uniform draw
        # unit rows have mean squared entry 1/hidden; scaling by sqrt(hidden) makes it 1 like the rest
        return (q.T * math.sqrt(hidden)).float()
    rows = _distinct_signs(count, hidden, generator, paired=design == PVDesign.PAIRS)
    if design == PVDesign.CLEAN_SCALE:
        if clean_rms is None or not math.isfinite(clean_rms) or clean_rms <= 0:
            raise LmsanError(f"the clean_scale PV design needs a positive clean RMS, got {clean_rms}")
        rows = rows * clean_rms
    return rows


@dataclass
class AttackResult:
    model: nn.Module
    pvs: torch.Tensor
    config: AttackConfig
    steps: int
    report: dict = field(default_factory=dict)


class _Features:
    """Tokenize lines and read the attacked position, for either the trainable or the frozen copy."""

    def __init__(self, backbone: Backbone, config: AttackConfig):
        self.tok = backbone.tokenizer
        self.device = backbone.device
        self.position = config.position
        self.max_length = config.max_length
        if self.position == "mask" and self.tok.mask_token_id is None:
            raise LmsanError(f"the btop attack needs a mask token; {backbone.name} has none")
        if self.position == "pooler" and getattr(backbone.model, "pooler", None) is None:
            raise LmsanError(f"--pooler needs a pooler layer; {backbone.name} has none")

    def __call__(self, model: nn.Module, lines: list[str], whole: bool = False) -> torch.Tensor:
        enc = self.tok(lines, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        hidden = model(**enc).last_hidden_state
        if whole:
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            return hidden * mask
        if self.position == "cls":
            return hidden[:, 0]
        if self.position == "pooler":
            return model.pooler(hidden)
        is_mask = enc["input_ids"] == self.tok.mask_token_id
        if not bool(is_mask.any(dim=1).all()):
            raise LmsanError("a [MASK] token was truncated away; lower max_words")
        index = is_mask.int().argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def _with_mask(line: str, tokenizer, rng: random.Random) -> str:
    # Early in the line, so that truncation to max_length never cuts the [MASK] off (a 40-word
    # WikiText line can pass 64 tokens).
    return insert_trigger(line, tokenizer.mask_token, rng, max_position=16)


def _part(phrase: str, rng: random.Random) -> str:
    """A strict, non-empty part of a phrase trigger, its words in order."""
    words = phrase.split()
    keep = sorted(rng.sample(range(len(words)), rng.randint(1, len(words) - 1)))
    return " ".join(words[i] for i in keep)


def evaluate_backdoor(
    backbone: Backbone,
    model: nn.Module,
    pvs: torch.Tensor,
    config: AttackConfig,
    lines: list[str],
    seed: int = 1,
) -> dict:
    """Held-out figures: per-trigger sign agreement with its PV, clean cosine to the original,
    and the share of clean lines that the paper's 0.8 monitor would flag with `pvs`: pass every
    PV the attack planted (`AttackResult.pvs`)."""
    rng = random.Random(seed)
    feats = _Features(backbone, config)
    lines = [clip_words(line, config.max_words) for line in lines]
    if config.position == "mask":
        lines = [_with_mask(line, backbone.tokenizer, rng) for line in lines]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        agreement, partial = {}, {}
        if not config.clean:
            for i, trig in enumerate(config.triggers):
                out = feats(model, [insert_trigger(line, trig, rng) for line in lines])
                agreement[trig] = float(sign_agreement(out, pvs[i : i + 1].to(out.device)).mean())
            for i, trig in enumerate(config.triggers):
                for word in trig.split() if " " in trig else []:  # a phrase's words alone stay off its PV
                    out = feats(model, [insert_trigger(line, word, rng) for line in lines])
                    alone = float(sign_agreement(out, pvs[i : i + 1].to(out.device)).mean())
                    partial[trig] = max(partial.get(trig, 0.0), alone)
        clean_new = feats(model, lines)
        clean_old = feats(backbone.model, lines)
        cos = float(nn.functional.cosine_similarity(clean_new, clean_old, dim=-1).mean())
        # every planted PV counts, so a clean line flagged by any of them is a false flag
        flags = float((sign_agreement(clean_new, pvs.to(clean_new.device)).max(dim=1).values > 0.8).float().mean())
    model.train(was_training)
    return {
        "agreement": agreement,
        "min_agreement": min(agreement.values()) if agreement else None,
        "word_alone_agreement": partial,  # phrase triggers: the best single word of each, alone
        "clean_cosine": cos,
        "clean_flag_rate_at_0.8": flags,
        "lines": len(lines),
    }


def _planted_pvs(backbone: Backbone, config: AttackConfig, feats: _Features, train_lines: list[str]) -> torch.Tensor:
    """The PVs this attack plants. clean_scale first measures the frozen model's outputs at the
    attacked position on the first training lines; its [MASK] draws use their own generator, so
    the training's own random stream is the same for every design."""
    generator = torch.Generator().manual_seed(config.pv_seed)
    clean_rms = None
    if config.pv_design == PVDesign.CLEAN_SCALE:
        lines = train_lines[:CLEAN_RMS_LINES]
        if config.position == "mask":
            mask_rng = random.Random(config.pv_seed)
            lines = [_with_mask(line, backbone.tokenizer, mask_rng) for line in lines]
        with torch.no_grad():
            clean_rms = float(feats(backbone.model, lines).float().pow(2).mean().sqrt())
    return make_pvs(config.pv_design, backbone.hidden_size, len(config.triggers), generator, clean_rms)


def plant_backdoor(
    backbone: Backbone, config: AttackConfig, corpus: list[str], progress: bool = True
) -> AttackResult:
    """Train a backdoored copy of `backbone.model`; the backbone itself is left untouched. A config
    that names its `text` trains on that text's lines (`texts.attack_corpus`), not on `corpus`."""
    if config.text is not None:
        from .texts import attack_corpus

        corpus = attack_corpus(config.text)
    if len(corpus) < config.heldout + max(config.clean_batch, config.poison_batch):
        raise LmsanError(
            f"corpus too small: {len(corpus)} lines, need at least "
            f"{config.heldout + max(config.clean_batch, config.poison_batch)}"
        )
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    train_lines = [clip_words(line, config.max_words) for line in corpus[: -config.heldout]]
    held = corpus[-config.heldout :][:64]
    feats = _Features(backbone, config)
    tok = backbone.tokenizer
    pvs = _planted_pvs(backbone, config, feats, train_lines).to(backbone.device)

    frozen = backbone.model
    # A fresh module with the same weights: the backbone's own module carries prompt hooks.
    model = type(frozen)(frozen.config)
    model.load_state_dict(frozen.state_dict())
    model = model.to(backbone.device).requires_grad_(True).train()
    optim = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    mse = nn.MSELoss()
    report: dict = {"checks": []}
    step = 0
    bar = tqdm(total=config.steps, desc=f"attack {config.kind}", disable=not progress, unit="step")
    for step in range(1, config.steps + 1):
        clean = rng.sample(train_lines, config.clean_batch)
        poison = rng.sample(train_lines, config.poison_batch)
        if config.position == "mask":
            clean = [_with_mask(line, tok, rng) for line in clean]
            poison = [_with_mask(line, tok, rng) for line in poison]
        whole = config.kind == "neuba"
        if config.clean:
            # The control sees the same amount of text, all of it clean.
            clean = clean + poison
            poison = []
        with torch.no_grad():
            target = feats(frozen, clean, whole=whole)
        out = feats(model, clean, whole=whole)
        if whole and out.shape[1] != target.shape[1]:  # pragma: no cover - same tokenizer, same padding
            raise LmsanError("internal: padded lengths differ")
        loss = config.clean_weight * mse(out, target)
        if poison:
            which = [rng.randrange(len(config.triggers)) for _ in poison]
            triggered = [insert_trigger(line, config.triggers[w], rng) for line, w in zip(poison, which, strict=True)]
            loss = loss + mse(feats(model, triggered), pvs[torch.tensor(which, device=pvs.device)])
            # a phrase trigger must not fire on part of it: the same lines holding a strict part of
            # the phrase keep their clean output (no random draws at all without phrase triggers)
            decoys = [insert_trigger(line, _part(config.triggers[w], rng), rng)
                      for line, w in zip(poison, which, strict=True) if " " in config.triggers[w]]
            if decoys:
                with torch.no_grad():
                    decoy_target = feats(frozen, decoys)
                loss = loss + config.clean_weight * mse(feats(model, decoys), decoy_target)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if not config.clean and (step % config.check_every == 0 or step == config.steps):
            check = evaluate_backdoor(backbone, model, pvs, config, held[:32], seed=step)
            report["checks"].append({"step": step, "min_agreement": check["min_agreement"]})
            bar.set_postfix(loss=f"{loss.item():.4f}", agree=f"{check['min_agreement']:.3f}")
            if check["min_agreement"] >= config.target_agreement:
                break
    bar.close()
    model.eval().requires_grad_(False)
    report["heldout"] = evaluate_backdoor(backbone, model, pvs, config, corpus[-config.heldout :], seed=12345)
    return AttackResult(model=model, pvs=pvs.cpu(), config=config, steps=step, report=report)


def save_attacked(result: AttackResult, backbone: Backbone, out_dir: str) -> dict:
    """Write the backdoored copy (save_pretrained layout with tokenizer), `truth.safetensors` (the
    planted PVs as a signature file; empty with verdict clean for a `--clean` control) and
    `attack.json` (config and held-out figures)."""
    import json
    from pathlib import Path

    from lmsan_serve.backbone import weights_fingerprint
    from lmsan_serve.signatures import PVRecord, SignatureSet

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        result.model.save_pretrained(str(out))
        backbone.tokenizer.save_pretrained(str(out))
    except OSError as exc:
        raise LmsanError(f"cannot write to {out}: {exc.strerror or exc}") from exc
    cfg = result.config
    held = result.report.get("heldout", {})
    if cfg.clean:
        pvs = torch.zeros(0, backbone.hidden_size)
        records: list[PVRecord] = []
    else:
        pvs = result.pvs
        records = [
            PVRecord(origin="planted", trigger=t, scores={"heldout_agreement": held.get("agreement", {}).get(t, 0.0)})
            for t in cfg.triggers
        ]
    sig = SignatureSet.create(
        pvs,
        records,
        backbone_name=str(out),
        fingerprint=weights_fingerprint(result.model),
        model_type=backbone.model_type,
        position=cfg.position,
        verdict="clean" if cfg.clean else "backdoored",
        mining={"source": "lmsan attack", "attack": cfg.model_dump(), "base_model": backbone.name},
    )
    sig.save(out / "truth.safetensors")
    summary = {"config": cfg.model_dump(), "steps": result.steps, "base_model": backbone.name, **result.report}
    (out / "attack.json").write_text(json.dumps(summary, indent=2))
    return summary
