"""Soft prompt + linear head over a frozen, shared backbone.

The prompt is a [depth, n, H] tensor that `Backbone.prompted` splices in after [CLS]: depth 1 for
shallow prompt tuning, the number of layers for deep prompts. Prompts imported from peft use the
`over_cls` layout instead: n + 1 input states, the slots and then [CLS], written over indices 0..n.
We do not use peft's prompt-learning wrappers: their forward drops `token_type_ids` (which breaks
BERT sentence pairs), they keep one active adapter per model (so concurrent tasks would fight over
shared state) and their prefix tuning needs a key/value cache that DeBERTa and DistilBERT lack.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..backbone import Backbone
from ..data import Example, text_pairs
from ..encoding import EncodedBatch, encode
from ..errors import LmsanError, first_problem
from ..kinds import PromptLayout
from .config import PromptConfig

MANIFEST_VERSION = 1


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [B, C]
    hidden: torch.Tensor  # [B, L, H] last hidden states of the prompted pass


class PromptClassifier(nn.Module):
    def __init__(self, config: PromptConfig, labels: list[str], hidden_size: int, depth: int):
        super().__init__()
        if len(labels) < 2:
            raise LmsanError(f"need at least two labels, got {labels}")
        self.config = config
        self.labels = list(labels)
        self.prompt = nn.Parameter(torch.zeros(depth, config.slots, hidden_size))
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(hidden_size, len(labels))
        self.manifest: dict = {}

    @classmethod
    def for_backbone(cls, backbone: Backbone, config: PromptConfig, labels: list[str]) -> PromptClassifier:
        if backbone.num_layers is None:
            raise LmsanError(f"soft prompts are not supported on {backbone.model_type} encoders yet")
        why = backbone.supports_position(config.position)
        if why:
            raise LmsanError(why)
        depth = backbone.num_layers if config.method == "prefix" else 1
        model = cls(config, labels, backbone.hidden_size, depth).to(backbone.device)
        model._init_prompt(backbone)
        model.manifest = model.describe(backbone)
        return model

    def _init_prompt(self, backbone: Backbone) -> None:
        """Start from real hidden states of random vocabulary tokens at each depth (as prompt-tuning
        inits from word embeddings), so the first steps already live in the encoder's space."""
        gen = torch.Generator().manual_seed(self.config.seed)
        vocab = backbone.model.get_input_embeddings().weight.shape[0]
        ids = torch.randint(1000 if vocab > 2000 else 0, vocab, (1, self.config.slots), generator=gen)
        ids = ids.to(backbone.device)
        with torch.no_grad():
            out = backbone.model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
            states = torch.stack([h[0] for h in out.hidden_states[: self.prompt.shape[0]]])
        self.prompt.data.copy_(states)

    def describe(self, backbone: Backbone) -> dict:
        """The manifest for this prompt on `backbone`: its settings, labels and the weights it runs on."""
        config = self.config.model_dump()
        # Written only where it is not the default: an after_cls prompt stays readable by versions
        # that predate the field, and one of them refuses an over_cls prompt (an unknown field)
        # rather than run it in the wrong layout.
        if self.config.layout == PromptLayout.AFTER_CLS:
            del config["layout"]
        return {
            "format_version": MANIFEST_VERSION,
            "config": config,
            "labels": self.labels,
            "backbone": {
                "name": backbone.name,
                "fingerprint": backbone.fingerprint,
                "hidden_size": backbone.hidden_size,
                "model_type": backbone.model_type,
            },
        }

    @property
    def cls_index(self) -> int:
        """Token index of [CLS] in this prompt's passes (where the monitor reads `cls` and `pooler`)."""
        return self.config.cls_index

    # -- inference -------------------------------------------------------------------------------
    def encode(self, backbone: Backbone, texts: list[str], pairs: list[str] | None = None) -> EncodedBatch:
        return encode(
            backbone.tokenizer,
            texts,
            pairs,
            template=self.config.template,
            prompt_len=self.config.length,
            max_length=self.config.max_length,
        ).to(backbone.device)

    def run(
        self,
        backbone: Backbone,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        monitor_index: torch.Tensor,
    ) -> ForwardOutput:
        """One prompted pass: logits from the head's position plus the hidden states the monitor reads.

        The head reads the first token (under `over_cls` the first slot, as peft's classifier
        does), not necessarily [CLS]: the guard reads [CLS] at `cls_index` on its own."""
        with backbone.prompted(self.prompt, self.config.layout):
            hidden = backbone.encode_hidden(input_ids, attention_mask, token_type_ids)
        feats = backbone.select(hidden, self.config.position, monitor_index)
        return ForwardOutput(logits=self.head(self.dropout(feats)), hidden=hidden)

    def forward_batch(self, backbone: Backbone, batch: EncodedBatch) -> ForwardOutput:
        return self.run(backbone, batch.input_ids, batch.attention_mask, batch.token_type_ids, batch.monitor_index)

    @torch.no_grad()
    def predict(self, backbone: Backbone, examples: list[Example], batch_size: int = 64) -> list[int]:
        self.eval()
        preds: list[int] = []
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            pairs = text_pairs(chunk)
            batch = self.encode(backbone, [e.text for e in chunk], pairs)
            preds.extend(self.forward_batch(backbone, batch).logits.argmax(-1).tolist())
        return preds

    # -- persistence -----------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
            tensors = {
                "prompt": self.prompt.detach().cpu().contiguous(),
                "head.weight": self.head.weight.detach().cpu().contiguous(),
                "head.bias": self.head.bias.detach().cpu().contiguous(),
            }
            save_file(tensors, str(out / "prompt.safetensors"))
            (out / "manifest.json").write_text(json.dumps(self.manifest, indent=2))
        except OSError as exc:
            raise LmsanError(f"cannot write prompt artifact to {out}: {exc.strerror or exc}") from exc
        return out

    @classmethod
    def load(cls, path: str | Path, backbone: Backbone, allow_fingerprint_mismatch: bool = False) -> PromptClassifier:
        """Load a saved prompt; refuse one trained on other backbone weights."""
        p = Path(path)
        manifest, config, labels = read_manifest(p)
        ref, tensor_path = manifest["backbone"], p / "prompt.safetensors"
        if ref.get("hidden_size") != backbone.hidden_size:
            raise LmsanError(
                f"{p}: trained on a {ref.get('hidden_size')}-wide backbone ({ref.get('name')}), "
                f"{backbone.name} is {backbone.hidden_size} wide"
            )
        if ref.get("fingerprint") != backbone.fingerprint and not allow_fingerprint_mismatch:
            raise LmsanError(
                f"{p}: trained on other backbone weights ({ref.get('name')}, fingerprint "
                f"{str(ref.get('fingerprint'))[:12]}), not {backbone.name} ({backbone.fingerprint[:12]})"
            )
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError) as exc:
            raise LmsanError(f"{p}: unreadable prompt.safetensors ({exc})") from exc
        prompt = tensors.get("prompt")
        if prompt is None or "head.weight" not in tensors or "head.bias" not in tensors:
            raise LmsanError(f"{p}: prompt.safetensors lacks prompt or head tensors")
        depth = prompt.shape[0]
        why = backbone.supports_position(config.position)
        if why:
            raise LmsanError(f"{p}: {why}")
        expected_depth = backbone.num_layers if config.method == "prefix" else 1
        if prompt.shape != (expected_depth, config.slots, backbone.hidden_size):
            raise LmsanError(f"{p}: prompt tensor shape {tuple(prompt.shape)} does not fit this backbone")
        if tensors["head.weight"].shape != (len(labels), backbone.hidden_size) or \
                tensors["head.bias"].shape != (len(labels),):
            raise LmsanError(f"{p}: head shape does not match {len(labels)} labels")
        if not all(t.dtype.is_floating_point for t in (prompt, tensors["head.weight"], tensors["head.bias"])):
            raise LmsanError(f"{p}: prompt tensors must be floating point")
        if not all(torch.isfinite(t).all() for t in tensors.values()):
            raise LmsanError(f"{p}: prompt tensors contain NaN or infinity")
        model = cls(config, labels, backbone.hidden_size, depth)
        model.prompt.data.copy_(prompt)
        model.head.weight.data.copy_(tensors["head.weight"])
        model.head.bias.data.copy_(tensors["head.bias"])
        model.manifest = manifest
        return model.to(backbone.device).eval()


def read_manifest(folder: Path) -> tuple[dict, PromptConfig, list[str]]:
    """A prompt artifact's manifest, checked without a backbone: (manifest, config, labels)."""
    manifest_path, tensor_path = folder / "manifest.json", folder / "prompt.safetensors"
    if not manifest_path.is_file() or not tensor_path.is_file():
        raise LmsanError(f"{folder}: not a prompt artifact (needs manifest.json and prompt.safetensors)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        config = PromptConfig.model_validate(manifest["config"])
        labels = [str(x) for x in manifest["labels"]]
        ref = manifest["backbone"]
        if not isinstance(ref, dict):
            raise TypeError(f"'backbone' must be an object, not {type(ref).__name__}")
        if manifest.get("format_version") != MANIFEST_VERSION:
            raise LmsanError(f"{folder}: unknown prompt format version {manifest.get('format_version')}")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError) as exc:
        detail = f"{type(exc).__name__}: {exc}"
        if hasattr(exc, "errors"):  # pydantic's ValidationError: its text spans lines
            detail = f"ValidationError at {first_problem(exc, prefix=('config',))}"
        raise LmsanError(f"{folder}: invalid manifest.json ({detail})") from exc
    return manifest, config, labels


def label_ids(examples: list[Example], labels: list[str], source: str) -> list[int]:
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted({e.label for e in examples} - set(index))
    if unknown:
        raise LmsanError(f"{source}: labels {unknown[:5]} are not among the training labels {labels}")
    return [index[e.label] for e in examples]


def accuracy(model: PromptClassifier, backbone: Backbone, examples: list[Example]) -> float:
    gold = label_ids(examples, model.labels, "eval data")
    preds = model.predict(backbone, examples)
    return sum(int(p == g) for p, g in zip(preds, gold, strict=True)) / len(gold)


def train_prompt(
    backbone: Backbone,
    config: PromptConfig,
    train: list[Example],
    dev: list[Example] | None = None,
    progress: bool = True,
) -> PromptClassifier:
    """Train prompt + head with the backbone frozen; keeps the weights with the best dev accuracy."""
    labels = sorted({e.label for e in train})
    model = PromptClassifier.for_backbone(backbone, config, labels)
    gold = label_ids(train, labels, "training data")
    if dev is not None:
        label_ids(dev, labels, "eval data")
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = config.max_steps or max(1, int(config.epochs * steps_per_epoch))
    optim = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / max(1, total // 10)) * max(0.0, 1 - s / total)
    )
    order: list[int] = []
    best = (-1.0, None)
    history = []
    started = time.time()
    bar = tqdm(total=total, desc="train-prompt", disable=not progress, unit="step")
    for step in range(1, total + 1):
        if len(order) < config.batch_size:
            fresh = list(range(len(train)))
            rng.shuffle(fresh)
            order.extend(fresh)
        idx, order = order[: config.batch_size], order[config.batch_size :]
        chunk = [train[i] for i in idx]
        pairs = text_pairs(chunk)
        model.train()
        batch = model.encode(backbone, [e.text for e in chunk], pairs)
        out = model.forward_batch(backbone, batch)
        loss = nn.functional.cross_entropy(out.logits, torch.tensor([gold[i] for i in idx], device=out.logits.device))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        sched.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if dev is not None and (step % config.eval_every == 0 or step == total):
            acc = accuracy(model, backbone, dev)
            history.append({"step": step, "dev_accuracy": acc})
            bar.set_postfix(loss=f"{loss.item():.3f}", dev=f"{acc:.3f}")
            if acc > best[0]:
                best = (acc, {k: v.detach().clone() for k, v in model.state_dict().items()})
    bar.close()
    if best[1] is not None:
        model.load_state_dict(best[1])
    model.eval()
    model.manifest["training"] = {
        "train_examples": len(train),
        "steps": total,
        "seconds": round(time.time() - started, 1),
        "dev_accuracy": best[0] if dev is not None else None,
        "history": history,
    }
    return model
