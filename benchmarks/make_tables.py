"""Write the tables of docs/benchmarks.md from the JSON results in benchmarks/results/.

Fills the sections between ``<!-- BEGIN name -->`` and ``<!-- END name -->``
markers in docs/benchmarks.md:

- ``coverage``: which grid cells ran, with how many seeds, any failures,
  their wall time and the commit they ran on;
- ``headline``: Δσ and Δ balanced accuracy of the main methods per cell;
- ``paired``: per-seed σ differences between the surgery and its rivals
  (mean ± std, and on how many seeds the surgery had the lower σ);
- ``grid``: the full comparison tables (``hessrebal.bench.format_table``);
- ``bulk_walk``, ``spike_count``, ``weight_power``, ``validation_size``,
  ``refresh_value``: the
  Markdown the side-experiment scripts wrote next to their JSON.

Also writes the full tables to ``benchmarks/results/tables.md``. Usage::

    python benchmarks/make_tables.py
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from hessrebal.bench import format_table, summarize

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOC = HERE.parent / "docs" / "benchmarks.md"
DATASETS = ("mnist-lt", "digits-lt")
RATIOS = (1, 10, 50, 100)
HEADLINE = ("logit_adjustment", "class_bias", "spectral_surgery",
            "logit_adjustment+spectral_surgery", "class_balanced_finetune",
            "random_directions", "bulk_directions")
SHORT = {"logit_adjustment": "LA", "class_bias": "class bias", "spectral_surgery": "surgery",
         "logit_adjustment+spectral_surgery": "LA → surgery",
         "class_balanced_finetune": "CB fine-tune", "random_directions": "random dirs",
         "bulk_directions": "bulk dirs"}


def load_grid():
    results = {}
    for dataset in DATASETS:
        for ratio in RATIOS:
            path = RESULTS / f"{dataset}_r{ratio:g}.json"
            if path.exists():
                results[(dataset, ratio)] = json.loads(path.read_text())
    return results


def coverage(results):
    lines = ["| Dataset | Ratio | Seeds run | Methods | Failed rows | Wall time | Commit |",
             "|---|---:|---|---:|---:|---:|---|"]
    for dataset in DATASETS:
        for ratio in RATIOS:
            r = results.get((dataset, ratio))
            if r is None:
                lines.append(f"| {dataset} | {ratio} | not run | – | – | – | – |")
                continue
            seeds = sorted({row["seed"] for row in r["rows"]})
            methods = {row["method"] for row in r["rows"]}
            failed = sum(1 for row in r["rows"] if row.get("error"))
            secs = r["settings"].get("seconds")
            commit = (r["settings"].get("git_commit") or "?")[:7]
            lines.append(f"| {dataset} | {ratio} | {len(seeds)} ({', '.join(map(str, seeds))})"
                         f" | {len(methods)} | {failed} | "
                         f"{'?' if secs is None else f'{secs / 60:.1f} min'} | {commit} |")
    return "\n".join(lines)


def headline(summary):
    by = {(e["dataset"], e["imbalance_ratio"], e["method"]): e for e in summary}
    head = "| Dataset | Ratio | Baseline σ / bal. acc. | " + " | ".join(
        SHORT[m] for m in HEADLINE) + " |"
    lines = [head, "|---|---:|---:|" + "---:|" * len(HEADLINE)]
    for dataset in DATASETS:
        for ratio in RATIOS:
            b = by.get((dataset, float(ratio), "baseline"))
            if b is None:
                continue
            cells = [f"{100 * b['class_std_mean']:.1f} / {100 * b['balanced_accuracy_mean']:.1f}"]
            for m in HEADLINE:
                e = by.get((dataset, float(ratio), m))
                if e is None or e["n_seeds"] == 0:
                    cells.append("–")
                    continue
                cells.append(f"{100 * e['delta_class_std_mean']:+.1f} / "
                             f"{100 * e['delta_balanced_accuracy_mean']:+.1f}")
            lines.append(f"| {dataset} | {ratio} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PAIRS = (("spectral_surgery", "logit_adjustment"), ("spectral_surgery", "class_bias"),
         ("logit_adjustment+spectral_surgery", "logit_adjustment"),
         ("spectral_surgery", "random_directions"), ("spectral_surgery", "bulk_directions"))


def paired(results):
    """Per-seed differences between two methods on the same checkpoint."""
    head = "| Dataset | Ratio | " + " | ".join(f"{SHORT.get(a, a)} − {SHORT.get(b, b)}"
                                             for a, b in PAIRS) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(PAIRS)]
    for dataset in DATASETS:
        for ratio in RATIOS:
            r = results.get((dataset, ratio))
            if r is None:
                continue
            by = {(row["method"], row["seed"]): row for row in r["rows"] if not row.get("error")}
            cells = []
            for a, b in PAIRS:
                seeds = sorted(s for (m, s) in by if m == a and (b, s) in by)
                d = [by[(a, s)]["class_std"] - by[(b, s)]["class_std"] for s in seeds]
                if not d:
                    cells.append("–")
                    continue
                sd = f" ± {100 * statistics.stdev(d):.1f}" if len(d) > 1 else ""
                wins = sum(x < 0 for x in d)
                cells.append(f"{100 * statistics.fmean(d):+.1f}{sd} ({wins}/{len(d)})")
            lines.append(f"| {dataset} | {ratio} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fill(doc: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
    if not pattern.search(doc):
        print(f"warning: no markers for {name} in {DOC}", file=sys.stderr)
        return doc
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), doc)


def main(argv: list[str] | None = None) -> int:
    # No options; parsing still answers --help instead of rewriting the docs.
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    results = load_grid()
    summary = summarize(list(results.values()))
    full = format_table(summary)
    (RESULTS / "tables.md").write_text(full + "\n")
    if not DOC.exists():
        print(full)
        return 0
    doc = DOC.read_text()
    doc = fill(doc, "coverage", coverage(results))
    doc = fill(doc, "headline", headline(summary))
    doc = fill(doc, "paired", paired(results))
    doc = fill(doc, "grid", full)
    for name in ("bulk_walk", "bulk_walk_small", "spike_count", "weight_power",
                 "validation_size", "refresh_value"):
        path = RESULTS / f"{name}.md"
        if path.exists():
            doc = fill(doc, name, path.read_text())
    DOC.write_text(doc)
    print(f"wrote {DOC} and {RESULTS / 'tables.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
