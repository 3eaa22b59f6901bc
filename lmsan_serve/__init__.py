"""lmsan-serve: guard prompt-tuned language models against task-agnostic backdoors.

Method: LMSanitator (Wei, Meng et al., NDSS 2024, arXiv 2308.13904).

The public API, importable from here:

- `load_backbone(model, device)`: a frozen encoder from a folder, a hub id or "minilm".
- `mine(backbone, MiningConfig(...), corpus, out)`: invert the encoder's PVs; the verdict and the
  signature file (`MiningResult`).
- `SignatureSet.load(path, ...)`: a signature file, checked against the encoder it is bound to.
- `PromptClassifier.load(folder, backbone)` / `train_prompt(...)` with `PromptConfig`: a task's soft
  prompt and head.
- `Guard(backbone, classifier, signatures, mode=...)`: `classify(texts)` gives one `GuardResult`
  per input, its `guard` a `Verdict` (flagged, action, PV, score, removed words, purged text).
- `ServeConfig`, `parse_config`: the HTTP endpoint's settings (`lmsan_serve.serving`).
- `GuardClient(url)`: calls a running endpoint, retrying as documented (`RetryPolicy`); a 4xx
  raises `RequestRejected`, no usable answer `EndpointError` (`lmsan_serve.client`).

Names load on first use, so `import lmsan_serve` stays cheap for the CLI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Backbone": "backbone", "load_backbone": "backbone",
    "LmsanError": "errors",
    "SignatureSet": "signatures",
    "Guard": "guard", "GuardResult": "guard", "Verdict": "guard",
    "MiningConfig": "mining", "MiningResult": "mining", "mine": "mining",
    "PromptClassifier": "prompts", "PromptConfig": "prompts", "train_prompt": "prompts",
    "ServeConfig": "serving", "parse_config": "serving",
    "GuardClient": "client", "RetryPolicy": "client", "EndpointError": "client", "RequestRejected": "client",
}

__all__ = ["Backbone", "EndpointError", "Guard", "GuardClient", "GuardResult", "LmsanError", "MiningConfig",
           "MiningResult", "PromptClassifier", "PromptConfig", "RequestRejected", "RetryPolicy", "ServeConfig",
           "SignatureSet", "Verdict", "__version__", "load_backbone", "mine", "parse_config", "train_prompt"]

if TYPE_CHECKING:
    from .backbone import Backbone, load_backbone
    from .client import EndpointError, GuardClient, RequestRejected, RetryPolicy
    from .errors import LmsanError
    from .guard import Guard, GuardResult, Verdict
    from .mining import MiningConfig, MiningResult, mine
    from .prompts import PromptClassifier, PromptConfig, train_prompt
    from .serving import ServeConfig, parse_config
    from .signatures import SignatureSet


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lmsan_serve' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
