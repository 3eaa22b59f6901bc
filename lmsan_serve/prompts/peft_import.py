"""Soft prompts trained with Hugging Face peft: read, check against the encoder, import exactly.

A peft prompt-tuning adapter for sequence classification (`PROMPT_TUNING`, or `P_TUNING`, whose
saved `prompt_embeddings` already hold the prompt encoder's output) differs from a prompt trained
by lmsan in two ways, both of which the artifact holds through `PromptConfig`:

- peft puts its n virtual tokens *before* [CLS]: the sequence is `v_0 .. v_{n-1} [CLS] text`, with
  positions 0.. in that order, and the virtual tokens go through the embedding layer (position and
  token-type embeddings, LayerNorm) like words. Text positions agree with lmsan's encoding ([CLS],
  n slots, text: text token i sits at n + 1 + i in both), so on an encoder with absolute positions
  the two differ only in the first n + 1 layer inputs. The imported prompt is those n + 1 states,
  [CLS] at position n included, written over indices 0..n: layout `over_cls`.
- BERT's sequence classifier reads index 0, which under peft is `v_0`, through the frozen pooler
  (dense + tanh) and then the trained linear `classifier`: head position `pooler`.

The tests check the imported artifact reproduces peft's logits. `PREFIX_TUNING` stores keys and
values per layer, which no hidden state reproduces in general (2H numbers from H), so it is refused
outright, as are two-layer heads (RoBERTa, ELECTRA, DistilBERT, DeBERTa) and encoders other than
BERT, where an approximation would silently change the adapter's predictions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..backbone import Backbone
from ..errors import LmsanError
from ..kinds import Position, PromptLayout, PromptMethod
from .config import PromptConfig
from .model import PromptClassifier

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLE = "adapter_model.bin"
MAX_VIRTUAL_TOKENS = 128  # the longest prompt lmsan's format takes (PromptConfig.length)
MAX_LENGTH = 512  # the longest sequence a prompt artifact asks for (PromptConfig.max_length)
# encoders whose embeddings number positions 0, 1, 2, ... by index and whose sequence classifier is
# the pooler plus one linear layer: the ones where peft's layout converts exactly
EXACT_MODEL_TYPES = ("bert",)


class PeftType(str, Enum):
    """The peft adapter kinds this module knows, spelled as peft writes them."""

    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"


SOFT_PROMPTS = (PeftType.PROMPT_TUNING, PeftType.P_TUNING)


@dataclass(frozen=True)
class PeftAdapter:
    """What a saved peft prompt adapter holds, checked on its own (no encoder yet)."""

    folder: Path
    peft_type: PeftType
    num_virtual_tokens: int
    token_dim: int
    num_layers: int | None
    base_model: str | None
    prompt: torch.Tensor  # [n, token_dim]: virtual token embeddings, fed in as word embeddings
    head_weight: torch.Tensor  # [C, token_dim]: peft's trained `classifier` (modules_to_save)
    head_bias: torch.Tensor  # [C]


@dataclass(frozen=True)
class PeftPrompt:
    """A peft prompt in exact lmsan terms: the first n + 1 layer inputs (v_0 .. v_{n-1}, then [CLS]
    at position n) replace indices 0..n of lmsan's layout, and the head reads the pooler at index 0."""

    states: torch.Tensor  # [n + 1, H]
    head_weight: torch.Tensor  # [C, H], applied to backbone.model.pooler(hidden)
    head_bias: torch.Tensor  # [C]
    labels: list[str]
    length: int  # n, the virtual tokens: `states` holds them and then [CLS]
    adapter: PeftAdapter  # what it was converted from


def _read_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise LmsanError(f"peft adapter folder not found: {folder}")
    path = folder / PEFT_CONFIG
    if not path.is_file():
        raise LmsanError(f"{folder}: not a peft adapter (no {PEFT_CONFIG})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise LmsanError(f"{path}: invalid JSON ({type(exc).__name__}: {exc})") from exc
    if not isinstance(config, dict):
        raise LmsanError(f"{path}: expected a JSON object, not {type(config).__name__}")
    return config


def _peft_type(config: dict, folder: Path) -> PeftType:
    name = str(config.get("peft_type"))
    if name == PeftType.PREFIX_TUNING:
        raise LmsanError(f"{folder}: PREFIX_TUNING stores attention keys and values per layer, which lmsan's "
                         "deep prompt (one hidden state per slot and layer) cannot reproduce; use PROMPT_TUNING")
    if name not in {t.value for t in SOFT_PROMPTS}:
        raise LmsanError(f"{folder}: peft type {name} is not a soft prompt lmsan can serve "
                         f"(supported: {', '.join(t.value for t in SOFT_PROMPTS)})")
    task = config.get("task_type")
    if task != "SEQ_CLS":
        raise LmsanError(f"{folder}: task type {task} is not supported; lmsan serves SEQ_CLS (sequence "
                         "classification) adapters")
    return PeftType(name)


def _positive_int(config: dict, key: str, folder: Path, required: bool = True) -> int | None:
    value = config.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise LmsanError(f"{folder}: {PEFT_CONFIG} field {key} must be a positive integer, not {value!r}")
    return value


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / PEFT_WEIGHTS
    if not path.is_file():
        if (folder / PEFT_PICKLE).is_file():
            raise LmsanError(f"{folder}: only {PEFT_PICKLE} (a pickle, which lmsan never loads); save the adapter "
                             "with save_pretrained(..., safe_serialization=True) to get " + PEFT_WEIGHTS)
        raise LmsanError(f"{folder}: no {PEFT_WEIGHTS}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LmsanError(f"{path}: unreadable ({exc})") from exc
    for name, tensor in tensors.items():
        if not tensor.dtype.is_floating_point or not bool(torch.isfinite(tensor).all()):
            raise LmsanError(f"{path}: tensor {name} is not finite floating point")
    return {name: tensor.float() for name, tensor in tensors.items()}


def _head(tensors: dict[str, torch.Tensor], path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The trained classifier: peft saves `modules_to_save` (`classifier`, or `score`) behind a prefix."""
    for module in ("classifier", "score"):
        names = sorted(n for n in tensors if module in n.split(".")[:-1])
        if not names:
            continue
        deeper = [n for n in names if n.split(".")[-2] != module]
        if deeper:
            raise LmsanError(f"{path}: the classifier has more than one layer ({', '.join(deeper)}), which "
                             "lmsan's linear head cannot reproduce")
        weight = next((n for n in names if n.endswith(".weight")), None)
        if weight is None:
            break
        w = tensors[weight]
        b = tensors.get(weight[: -len("weight")] + "bias", torch.zeros(w.shape[0]))
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise LmsanError(f"{path}: classifier weight {tuple(w.shape)} and bias {tuple(b.shape)} do not fit")
        return w, b
    raise LmsanError(f"{path}: no classifier weights (peft saves them for SEQ_CLS as modules_to_save)")


def read_peft_adapter(folder: str | Path) -> PeftAdapter:
    """A saved peft prompt adapter, with every field and tensor checked; one-line LmsanError otherwise."""
    p = Path(folder)
    config = _read_config(p)
    peft_type = _peft_type(config, p)
    n = _positive_int(config, "num_virtual_tokens", p)
    dim = _positive_int(config, "token_dim", p)
    assert n is not None and dim is not None  # required fields
    if n > MAX_VIRTUAL_TOKENS:
        raise LmsanError(f"{p}: {n} virtual tokens; lmsan prompts hold at most {MAX_VIRTUAL_TOKENS}")
    if config.get("num_transformer_submodules", 1) != 1:
        raise LmsanError(f"{p}: num_transformer_submodules must be 1 (an encoder), not "
                         f"{config.get('num_transformer_submodules')!r}")
    tensors = _read_tensors(p)
    prompt = tensors.get("prompt_embeddings")
    if prompt is None:
        raise LmsanError(f"{p / PEFT_WEIGHTS}: no prompt_embeddings tensor")
    if tuple(prompt.shape) != (n, dim):
        raise LmsanError(f"{p / PEFT_WEIGHTS}: prompt_embeddings is {tuple(prompt.shape)}, but {PEFT_CONFIG} "
                         f"says {n} virtual tokens of width {dim}")
    weight, bias = _head(tensors, p / PEFT_WEIGHTS)
    base = config.get("base_model_name_or_path")
    return PeftAdapter(folder=p, peft_type=peft_type, num_virtual_tokens=n, token_dim=dim,
                       num_layers=_positive_int(config, "num_layers", p, required=False),
                       base_model=str(base) if base else None, prompt=prompt, head_weight=weight,
                       head_bias=bias)


def _same_model(recorded: str, given: str) -> bool:
    """Paths move between machines: the same folder name (or hub id) counts as the same model."""
    def tail(name: str) -> str:
        return name.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]

    return recorded == given or tail(recorded) == tail(given)


def check_encoder(adapter: PeftAdapter, backbone: Backbone, allow_other_base: bool = False) -> None:
    """Refuse an adapter trained for another encoder: width, depth and the recorded base model name.

    peft records no weight hash, so the name is the only link to the weights it was trained on."""
    where = adapter.folder
    if adapter.token_dim != backbone.hidden_size:
        raise LmsanError(f"{where}: prompt vectors are {adapter.token_dim} wide (token_dim), but {backbone.name} "
                         f"is {backbone.hidden_size} wide")
    if adapter.num_layers is not None and backbone.num_layers is not None and \
            adapter.num_layers != backbone.num_layers:
        raise LmsanError(f"{where}: trained on a {adapter.num_layers}-layer encoder, {backbone.name} has "
                         f"{backbone.num_layers} layers")
    if adapter.base_model and not allow_other_base and not _same_model(adapter.base_model, backbone.name):
        raise LmsanError(f"{where}: trained on base model {adapter.base_model!r}, not {backbone.name!r} "
                         "(pass --allow-other-base if it is the same model under another name)")
    if adapter.head_weight.shape[1] != backbone.hidden_size:
        raise LmsanError(f"{where}: the classifier reads {adapter.head_weight.shape[1]} features, "
                         f"{backbone.name} is {backbone.hidden_size} wide")


def _labels(adapter: PeftAdapter, labels: list[str] | None) -> list[str]:
    count = int(adapter.head_weight.shape[0])
    if labels is None:
        return [str(i) for i in range(count)]
    if len(labels) != count or len(set(labels)) != count or any(not x.strip() for x in labels):
        raise LmsanError(f"{adapter.folder}: the classifier has {count} classes; give {count} distinct label "
                         f"names, not {labels}")
    return list(labels)


def convert_peft_prompt(folder: str | Path, backbone: Backbone, labels: list[str] | None = None,
                        allow_other_base: bool = False) -> PeftPrompt:
    """The exact lmsan form of a peft SEQ_CLS prompt adapter on `backbone` (see the module docstring)."""
    adapter = read_peft_adapter(folder)
    check_encoder(adapter, backbone, allow_other_base)
    names = _labels(adapter, labels)
    if backbone.model_type not in EXACT_MODEL_TYPES or getattr(backbone.model, "pooler", None) is None:
        raise LmsanError(f"{adapter.folder}: peft prompts convert exactly on BERT encoders with a pooler, "
                         f"not {backbone.model_type}")
    model, n = backbone.model, adapter.num_virtual_tokens
    tokenizer = backbone.tokenizer
    cls_id = getattr(tokenizer, "cls_token_id", None)
    if cls_id is None:
        raise LmsanError(f"{backbone.name}: its tokenizer has no [CLS] token")
    with torch.no_grad():
        words = model.get_input_embeddings().weight
        embeds = torch.cat([adapter.prompt.to(words.device, words.dtype), words[cls_id][None]])[None]
        types = torch.zeros(1, n + 1, dtype=torch.long, device=words.device)
        states = model.embeddings(inputs_embeds=embeds, token_type_ids=types)[0]
    return PeftPrompt(states=states.detach().cpu(), head_weight=adapter.head_weight, head_bias=adapter.head_bias,
                      labels=names, length=n, adapter=adapter)


def _import_config(backbone: Backbone, n: int, folder: Path) -> PromptConfig:
    """The artifact's settings: peft's layout and head, and as much text as the encoder's position
    embeddings take after the n + 1 leading states (peft itself cuts nothing, so cut late)."""
    positions = getattr(backbone.model.config, "max_position_embeddings", MAX_LENGTH)
    max_length = min(MAX_LENGTH, int(positions))
    if max_length - n < 16:
        raise LmsanError(f"{folder}: {n} virtual tokens leave {backbone.name} room for {max(0, max_length - n)} "
                         "text tokens; lmsan needs at least 16")
    return PromptConfig(method=PromptMethod.PROMPT, length=n, position=Position.POOLER,
                        layout=PromptLayout.OVER_CLS, max_length=max_length, dropout=0.0)


def import_peft_prompt(folder: str | Path, backbone: Backbone, out: str | Path, labels: list[str] | None = None,
                       allow_other_base: bool = False) -> PromptClassifier:
    """Write a peft adapter as an lmsan prompt artifact at `out` (layout `over_cls`, head on the
    pooler) and return it loaded. Every check runs before anything is written, so a wrong encoder,
    label list or file leaves `out` untouched."""
    converted = convert_peft_prompt(folder, backbone, labels, allow_other_base)
    config = _import_config(backbone, converted.length, Path(folder))
    model = PromptClassifier(config, converted.labels, backbone.hidden_size, depth=1)
    with torch.no_grad():
        model.prompt.copy_(converted.states[None])
        model.head.weight.copy_(converted.head_weight)
        model.head.bias.copy_(converted.head_bias)
    model.manifest = model.describe(backbone)
    adapter = converted.adapter
    model.manifest["imported"] = {"from": "peft", "peft_type": adapter.peft_type.value,
                                  "num_virtual_tokens": adapter.num_virtual_tokens,
                                  "base_model": adapter.base_model}
    model.save(out)
    return model.to(backbone.device).eval()
