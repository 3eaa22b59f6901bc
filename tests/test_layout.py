"""The product package stands alone: it imports nothing from the lab (attacks, evaluations, zoo,
demo), needs no plotting library, and stays readable (no file over 450 lines). The lab's commands
reach the `lmsan` CLI through the entry point, not through an import."""

from __future__ import annotations

import ast
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

import lmsan_serve
from lmsan_serve.cli import subcommands

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ROOT / "lmsan_serve"
MAX_FILE_LINES = 450  # what a reader takes in at once; past it a module holds more than one idea
MAX_FUNCTION_LINES = 80  # a function read at once; longer ones hide steps that want names


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_product_never_imports_the_lab():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in _imported_modules(p) if m.split(".")[0] == "lmsan_lab")
                 for p in PRODUCT.rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_the_product_loads_neither_the_lab_nor_a_plotting_library():
    code = ("import sys, lmsan_serve.guard, lmsan_serve.mining, lmsan_serve.serving.service, lmsan_serve.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lmsan_lab', 'matplotlib')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_core_dependencies_hold_no_plotting_library():
    declared = requires("lmsan-serve") or []  # the installed metadata, as pip sees it
    core = [r for r in declared if "extra ==" not in r]
    assert not any(r.lower().startswith("matplotlib") for r in core)
    assert any(r.lower().startswith("matplotlib") and "extra == \"lab\"" in r for r in declared), declared


def test_the_lab_commands_come_through_the_entry_point():
    # the product's own commands, then the lab's from `lmsan_serve.commands`
    names = subcommands()
    product = ["train-prompt", "import-prompt", "classify", "mine", "inspect", "keygen", "sign", "serve"]
    assert names[:len(product)] == product
    assert {"attack", "eval", "demo"} <= set(names[len(product):])


def test_no_product_module_is_over_the_line_budget():
    long = {str(p.relative_to(ROOT)): n for p in PRODUCT.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES}
    assert long == {}


def test_no_product_function_is_over_the_line_budget():
    long = {}
    for path in PRODUCT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = lines
    assert long == {}


def test_the_public_api_is_importable_from_the_package():
    for name in lmsan_serve.__all__:
        assert getattr(lmsan_serve, name) is not None, name


def test_lab_reports_without_matplotlib_fail_before_any_work(monkeypatch, capsys, tmp_path):
    from lmsan_serve.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as in the serving image: no `lab` extra
    assert main(["eval", "zoo", "3", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'lmsan-serve[lab]'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
