"""No code path unpickles data: signature files and prompts are safetensors + JSON. The scan runs
over the whole code base and is itself checked against snippets it must catch."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unsafe_loads(source: str) -> list[str]:
    """What in `source` can unpickle: imports of pickle-like modules, torch.load without
    weights_only=True, numpy load with allow_pickle=True."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
            owner = ast.unparse(node.func.value)
            kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if owner == "torch" and kwargs.get("weights_only") != "True":
                found.append(f"line {node.lineno}: torch.load without weights_only=True")
            if owner in ("np", "numpy") and kwargs.get("allow_pickle") == "True":
                found.append(f"line {node.lineno}: numpy load with allow_pickle=True")
    return found


def test_the_scan_catches_what_it_looks_for():
    assert unsafe_loads("import pickle\npickle.loads(b'')")
    assert unsafe_loads("from joblib import load")
    assert unsafe_loads("import torch\ntorch.load('x.pt')")
    assert unsafe_loads("import numpy as np\nnp.load('x.npy', allow_pickle=True)")
    assert not unsafe_loads("import torch\ntorch.load('x.pt', weights_only=True)")
    assert not unsafe_loads("from safetensors.torch import load_file\nload_file('x')")


def test_code_base_loads_no_pickles():
    files = [p for d in ("lmsan_serve", "bench", "tests", "mining", "deployments") for p in (REPO / d).rglob("*.py")]
    assert len(files) > 20
    offenders = {str(p.relative_to(REPO)): hits for p in files
                 if p.name != Path(__file__).name and (hits := unsafe_loads(p.read_text(encoding="utf-8")))}
    assert offenders == {}
