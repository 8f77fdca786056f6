"""Every Python snippet of README.md and docs/*.md runs, page by page, in page
order, in one namespace per page (as a reader pasting them one after the
other would run them), in a scratch working directory.

A snippet is skipped only when it needs something a test machine does not
have; :data:`SKIPS` names it by a line it contains, with the reason.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]

#: (page, a line of the snippet) -> why it cannot run here.
SKIPS = {
    ("docs/benchmarks.md", 'json.load(open("mnist-lt_r10.json"))'):
        "reads the JSON file a full `hessrebal bench` run writes (hours of CPU)",
    ("docs/performance.md", 'dist.init_process_group("nccl")'):
        "a torchrun job: needs NCCL, GPUs and a launcher (tests/test_distributed.py "
        "runs the same calls on gloo)",
    ("docs/user-guide-tuning.md", 'storage="postgresql://'):
        "needs a PostgreSQL server",
    ("docs/user-guide-tuning.md", 'storage = RDBStorage("postgresql://'):
        "needs a PostgreSQL server",
}

_FENCE = re.compile(r"^```python\s*\n(.*?)^```\s*$", re.S | re.M)


def snippets(page: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of each fenced Python block of ``page``."""
    text = (ROOT / page).read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in _FENCE.finditer(text)]


def _skip_reason(page: str, code: str) -> str | None:
    for (skip_page, line), reason in SKIPS.items():
        if skip_page == page and line in code:
            return reason
    return None


def test_every_skip_names_an_existing_snippet():
    # A skip whose snippet changed or vanished would silently skip nothing.
    for page, line in SKIPS:
        assert any(line in code for _, code in snippets(page)), (page, line)


def test_pages_have_snippets():
    counts = {page: len(snippets(page)) for page in PAGES}
    assert counts["README.md"] >= 3 and counts["docs/user-guide.md"] >= 9
    assert counts["docs/user-guide-tuning.md"] >= 8


@pytest.mark.parametrize("page", [p for p in PAGES if snippets(p)])
def test_snippets_run_in_page_order(page, tmp_path, monkeypatch, one_torch_thread):
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    # The tuning guide's worker script reads its worker number from argv.
    monkeypatch.setattr(sys, "argv", ["worker.py", "0"])
    namespace: dict = {"__name__": "__snippet__"}
    skipped = []
    for line, code in snippets(page):
        reason = _skip_reason(page, code)
        if reason is not None:
            skipped.append(f"{page}:{line} ({reason})")
            continue
        try:
            exec(compile(code, f"{page}:{line}", "exec"), namespace)
        except Exception as exc:  # name the snippet, keep the traceback
            raise AssertionError(f"the snippet at {page}:{line} failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
    for entry in skipped:
        print("skipped", entry)
