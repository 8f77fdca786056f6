"""Result files carry their provenance, and the tables of docs/performance.md
quote them.

Every ``benchmarks/results/perf_*.json`` must record the commit and date it
was measured at (``_common.provenance``), and the two tables of
docs/performance.md built from one file each (the HVP ratio details from
``perf_hvp.json``, the scaling table from ``perf_scaling.json``) must equal
that file to their printed rounding, so that a rerun without a doc update, or
a doc edit without a rerun, fails here.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from hessrebal.bench import _git_commit, git_commit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PERF_DOC = ROOT / "docs" / "performance.md"
COMMIT = re.compile(r"^[0-9a-f]{40}(\+dirty)?$")
PERF_FILES = sorted(RESULTS.glob("perf_*.json"))


def _common():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import _common
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return _common


def test_git_commit_is_public_and_the_old_name_still_works():
    assert _git_commit is git_commit
    commit = git_commit()
    if (ROOT / ".git").exists():
        assert commit is not None and COMMIT.match(commit), commit


def test_provenance_records_commit_date_versions_threads_and_load():
    prov = _common().provenance()
    assert set(prov) >= {"git_commit", "benchmarks_dirty", "date", "command", "hessrebal",
                         "torch", "python", "threads", "cpu_count", "cpu_model",
                         "load_average"}
    date = datetime.datetime.fromisoformat(prov["date"])
    assert date.tzinfo is not None
    assert abs((datetime.datetime.now(datetime.timezone.utc) - date).total_seconds()) < 60
    assert prov["threads"] == torch.get_num_threads()
    assert prov["torch"] == torch.__version__
    if (ROOT / ".git").exists():
        assert COMMIT.match(prov["git_commit"])
    if prov["load_average"] is not None:
        assert len(prov["load_average"]) == 3


@pytest.mark.parametrize("path", PERF_FILES, ids=[p.name for p in PERF_FILES])
def test_every_perf_result_file_records_its_provenance(path):
    prov = json.loads(path.read_text())["provenance"]
    assert COMMIT.match(prov["git_commit"]), prov["git_commit"]
    datetime.datetime.fromisoformat(prov["date"])
    assert prov["threads"] >= 1 and prov["torch"] and prov["command"]
    assert len(prov["load_average"]) == 3


def _table(text: str, header_start: str) -> list[list[str]]:
    """The body rows (cells stripped) of the first Markdown table whose header
    line starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _number(cell: str) -> float:
    return float(cell.replace(",", "").split()[0])


def test_hvp_ratio_table_quotes_perf_hvp_json():
    results = json.loads((RESULTS / "perf_hvp.json").read_text())["results"]
    rows = _table(PERF_DOC.read_text(), "| model | kept graphs (median / best)")
    assert [r[0].split()[0] for r in rows] == [r["model"].split("(")[0] for r in results]
    for row, res in zip(rows, results):
        for cell, key in ((row[1], "ratio_cached"), (row[2], "ratio_uncached")):
            median, best = (float(x) for x in cell.split("/"))
            assert median == round(res[key]["median"], 2), (res["model"], key)
            assert best == round(res[key]["best"], 2), (res["model"], key)
        assert float(row[3]) == round(res["ratio_first_product"], 2), res["model"]


def test_scaling_table_quotes_perf_scaling_json():
    data = json.loads((RESULTS / "perf_scaling.json").read_text())
    rows = _table(PERF_DOC.read_text(), "| N | seconds per matvec")
    measured = data["rows"]
    assert len(rows) == len(measured) + 1  # the last row is the control run
    for row, res, r in zip(rows, measured, data["time_ratio_vs_n"]):
        assert _number(row[0]) == res["n_samples"]
        assert _number(row[1]) == round(res["seconds_per_matvec"], 2)
        assert _number(row[2]) == round(r, 2)
        assert _number(row[3]) == round(res["peak_rss_mib"], 1)
    control = data["control_all_graphs_kept"]
    assert _number(rows[-1][1]) == round(control["seconds_per_matvec"], 2)
    assert _number(rows[-1][3]) == round(control["peak_rss_mib"], 1)
