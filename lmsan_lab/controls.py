"""Clean controls that are really different clean models.

A zoo's false-positive rate means something only if its clean controls differ from the base model
as much as a backdoored copy does, by training that has nothing to do with a backdoor. The default
zoo's controls are the attack's own training without triggers: the base model trained back towards
its own outputs, a copy that drifts only by dropout noise. Here a control is the base encoder
trained further with another objective on another text: unsupervised SimCSE-style contrastive
training (Gao et al., 2021), where the two dropout passes of one line are positives and the other
lines of the batch negatives, pooled at [CLS] or as the mean over tokens (`ControlPooling`), on a
text kind of `attacks.texts` (lines the default miner never reads). A few hundred steps at a
small rate change the encoder as a downstream fine-tune would.

`save_control` writes the same folder layout as an attacked copy (`save_pretrained` files,
`truth.safetensors` with no PV and verdict clean, `attack.json` with the settings and figures),
so the zoo mines and judges a control exactly as it does a backdoored copy.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from lmsan_serve.backbone import Backbone
from lmsan_serve.data import clip_words
from lmsan_serve.errors import LmsanError
from lmsan_serve.kinds import _Named

from .attacks.texts import AttackText, attack_corpus

HELD_LINES = 64  # the text's last lines: never trained on, they measure how far the control moved


class ControlPooling(_Named):
    """Which sentence embedding the contrastive objective trains."""

    CLS = "cls"  # the [CLS] output, as SimCSE's reference does
    MEAN = "mean"  # the mean of the token outputs, as sentence-transformers' MiniLM was trained


class ControlConfig(BaseModel):
    """How to train one clean control (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    text: AttackText = AttackText.NEWS
    pooling: ControlPooling = ControlPooling.CLS
    steps: int = Field(default=300, ge=1)
    lr: float = Field(default=2e-5, gt=0, description="small: the encoder should stay a good encoder")
    batch: int = Field(default=32, ge=2, description="lines per step; each is the others' negative")
    temperature: float = Field(default=0.05, gt=0, description="SimCSE's")
    max_length: int = Field(default=64, ge=16)
    max_words: int = Field(default=40, ge=4)
    seed: int = 0


def _embed(model: nn.Module, enc: dict, pooling: ControlPooling) -> torch.Tensor:
    hidden = model(**enc).last_hidden_state
    if pooling == ControlPooling.CLS:
        return hidden[:, 0]
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def _tokens(backbone: Backbone, lines: list[str], config: ControlConfig) -> dict:
    enc = backbone.tokenizer(lines, padding=True, truncation=True, max_length=config.max_length, return_tensors="pt")
    return {k: v.to(backbone.device) for k, v in enc.items()}


def train_control(backbone: Backbone, config: ControlConfig, progress: bool = True,
                  lines: list[str] | None = None) -> tuple[nn.Module, dict]:
    """A copy of `backbone.model` trained with the contrastive objective on `config.text` (or on
    `lines`, for tests), and its figures: steps, the last loss, and the mean cosine of the [CLS]
    outputs of held-out lines to the base model's. The backbone itself is left untouched."""
    corpus = lines if lines is not None else attack_corpus(config.text)
    if len(corpus) < HELD_LINES + config.batch:
        raise LmsanError(f"the control's text has {len(corpus)} lines, need at least {HELD_LINES + config.batch}")
    train, held = corpus[:-HELD_LINES], corpus[-HELD_LINES:]
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    frozen = backbone.model
    # A fresh module with the same weights: the backbone's own module carries prompt hooks.
    model = type(frozen)(frozen.config)
    model.load_state_dict(frozen.state_dict())
    model = model.to(backbone.device).requires_grad_(True).train()  # train mode: dropout makes the positives
    optim = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    labels = torch.arange(config.batch, device=backbone.device)
    loss = torch.zeros(())
    bar = tqdm(range(config.steps), desc=f"control {config.pooling.value} on {config.text.value}", unit="step",
               disable=not progress)
    for _ in bar:
        enc = _tokens(backbone, [clip_words(x, config.max_words) for x in rng.sample(train, config.batch)], config)
        a = nn.functional.normalize(_embed(model, enc, config.pooling), dim=-1)
        b = nn.functional.normalize(_embed(model, enc, config.pooling), dim=-1)  # another dropout draw
        loss = nn.functional.cross_entropy(a @ b.T / config.temperature, labels)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        enc = _tokens(backbone, [clip_words(x, config.max_words) for x in held], config)
        new, old = model(**enc).last_hidden_state[:, 0], frozen(**enc).last_hidden_state[:, 0]
        cos = float(nn.functional.cosine_similarity(new, old, dim=-1).mean())
    return model, {"steps": config.steps, "final_loss": round(float(loss.item()), 6), "cls_cosine_to_base": cos}


def save_control(model: nn.Module, figures: dict, backbone: Backbone, config: ControlConfig, out_dir: str | Path,
                 seconds: float | None = None) -> dict:
    """Write the control like an attacked copy: model and tokenizer, `truth.safetensors` (no PV,
    verdict clean) and `attack.json`; the summary written there."""
    from lmsan_serve.backbone import weights_fingerprint
    from lmsan_serve.signatures import SignatureSet

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out))
        backbone.tokenizer.save_pretrained(str(out))
    except OSError as exc:
        raise LmsanError(f"cannot write to {out}: {exc.strerror or exc}") from exc
    source = {"source": "lmsan_lab.controls", "control": config.model_dump(mode="json"), "base_model": backbone.name}
    SignatureSet.create(torch.zeros(0, backbone.hidden_size), [], backbone_name=str(out),
                        fingerprint=weights_fingerprint(model), model_type=backbone.model_type, position="cls",
                        verdict="clean", mining=source).save(out / "truth.safetensors")
    summary = {"config": config.model_dump(mode="json"), "base_model": backbone.name, **figures,
               **({"seconds": round(seconds, 2)} if seconds is not None else {})}
    (out / "attack.json").write_text(json.dumps(summary, indent=2))
    return summary


def make_control(backbone: Backbone, config: ControlConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Train and save one control (`train_control`, `save_control`); the summary."""
    t0 = time.perf_counter()
    model, figures = train_control(backbone, config, progress=progress)
    return save_control(model, figures, backbone, config, out_dir, seconds=time.perf_counter() - t0)


__all__ = ["ControlConfig", "ControlPooling", "make_control", "save_control", "train_control"]
