"""The docs' generated tables say what their committed JSON says (bench/results_tables.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _tables():
    spec = importlib.util.spec_from_file_location("results_tables", BENCH / "results_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["results_tables"] = module
    spec.loader.exec_module(module)
    return module


def test_every_generated_table_matches_its_json(capsys):
    tables = _tables()
    assert tables.main(["--check"]) == 0, capsys.readouterr().out
    text = "".join(doc.read_text(encoding="utf-8") for doc in tables.DOCS)
    assert {m["name"] for m in tables.REGION.finditer(text)} == set(tables.TABLES), "a table is not in the docs"


def test_a_table_that_disagrees_with_its_json_is_found():
    """A figure edited by hand in a generated table (the attack success rate with the guard) is
    reported and put back from the JSON."""
    tables = _tables()
    good = "intro\n<!-- generated: demo -->\n" + tables.render("demo") + "<!-- end generated -->\n"
    import json

    asr_on = json.loads((tables.RESULTS / "demo.json").read_text())["asr_on"]
    line = next(ln for ln in good.splitlines() if ln.startswith("| attack success rate"))
    edited = good.replace(line, line.replace(f"**{asr_on:.3f}** |", f"**{asr_on + 0.001:.3f}** |", 1))
    assert edited != good
    fixed, changed = tables.regenerate(edited)
    assert changed == ["demo"] and fixed == good
    assert tables.regenerate(good) == (good, [])
