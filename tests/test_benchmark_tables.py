"""docs/benchmarks.md and benchmarks/results/tables.md stay in step with the saved results."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def make_tables():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("make_tables")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_committed_tables_match_the_saved_results(make_tables):
    assert make_tables.main(["--check"]) == 0


def test_a_changed_number_is_caught(make_tables, tmp_path, monkeypatch, capsys):
    doc = make_tables.DOC.read_text()
    start = doc.index("<!-- BEGIN regime -->")
    line_end = doc.index("\n", doc.index("| digits-lt | MLP | 100 | 40 |", start))
    row = doc[doc.rindex("\n", 0, line_end) + 1:line_end]
    edited = doc[:line_end - len(row)] + row.replace("LLR 93.8", "LLR 93.9") + doc[line_end:]
    assert edited != doc
    copy = tmp_path / "benchmarks.md"
    copy.write_text(edited)
    monkeypatch.setattr(make_tables, "DOC", copy)
    assert make_tables.main(["--check"]) == 1
    assert "out of date" in capsys.readouterr().out
    assert copy.read_text() == edited  # --check writes nothing
