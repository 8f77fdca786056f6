"""Write the tables and the regime-map figure of docs/benchmarks.md from benchmarks/results/.

Fills the sections between ``<!-- BEGIN name -->`` and ``<!-- END name -->``
markers in docs/benchmarks.md:

- ``coverage``: which grid cells ran (model, validation sizes, seeds, failures,
  wall time, commit);
- ``regime``: per cell (dataset × model × ratio × validation size), the
  post-hoc method with the best balanced accuracy, the best worst class and
  the lowest σ, with paired wins over the runner-up;
- ``moonshot``: in the cells with r ≥ 50 and ≥ 20 validation images per
  class, the best surgery row against the best other post-hoc method;
- ``harm``: what the default surgery costs: Δ balanced accuracy and the
  largest per-class loss against the untouched model;
- ``headline`` and ``paired``: Δσ / Δ balanced accuracy and paired σ
  differences on the cells with the whole validation split;
- ``grid``: the full tables of those cells (every cell is in
  ``benchmarks/results/tables.md``);
- ``ablation``, ``joint_head``, ``bulk_walk``, ``spike_count``,
  ``weight_power``, ``validation_size``, ``refresh_value``: the Markdown the
  side-experiment scripts wrote next to their JSON.

Also draws ``docs/images/regime_map.png`` and ``docs/images/cap_tradeoff.png``
(from the ablation's JSON). ``--check`` writes nothing and exits 1 when a
committed table differs from what the saved results give (the test suite
runs it). Usage::

    python benchmarks/make_tables.py [--check]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import numpy as np
from _common import IMAGES, pyplot, save_figure

from hessrebal.bench import _LABELS, format_table, summarize

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOC = HERE.parent / "docs" / "benchmarks.md"
#: The post-hoc choices a user has (no retraining, no controls).
CHOICES = ("baseline", "logit_adjustment", "tau_normalization", "class_bias",
           "last_layer_retraining", "spectral_surgery", "spectral_surgery+logit_adjustment",
           "logit_adjustment+spectral_surgery", "last_layer_retraining+spectral_surgery")
SURGERY = tuple(m for m in CHOICES if "spectral_surgery" in m)
HEADLINE = ("logit_adjustment", "class_bias", "last_layer_retraining", "spectral_surgery",
            "logit_adjustment+spectral_surgery", "last_layer_retraining+spectral_surgery",
            "class_balanced_finetune", "random_directions", "bulk_directions")
SHORT = {"baseline": "untouched", "logit_adjustment": "LA", "tau_normalization": "τ-norm",
         "class_bias": "class bias", "last_layer_retraining": "LLR",
         "spectral_surgery": "surgery", "spectral_surgery+logit_adjustment": "surgery → LA",
         "logit_adjustment+spectral_surgery": "LA → surgery",
         "last_layer_retraining+spectral_surgery": "LLR → surgery",
         "class_balanced_finetune": "CB fine-tune", "random_directions": "random dirs",
         "bulk_directions": "bulk dirs"}
METRIC = {"balanced_accuracy": (1, "best balanced accuracy"),
          "worst_class_accuracy": (1, "best worst class"), "class_std": (-1, "lowest σ")}


def load_grid() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*-lt*_r*.json"))}


def all_rows(results) -> list[dict]:
    rows = []
    for r in results.values():
        counts = r["settings"]
        for row in r["rows"]:
            if not row.get("error"):
                rows.append({**row, "_counts": counts.get(f"class_counts_seed_{row['seed']}")})
    return rows


def cell_key(row):
    return (row["dataset"], row.get("model") or "mlp", float(row["imbalance_ratio"]),
            int(row.get("val_per_class") or 0))


def by_cell(rows):
    cells: dict[tuple, dict[str, dict[int, dict]]] = {}
    for row in rows:
        cells.setdefault(cell_key(row), {}).setdefault(row["method"], {})[row["seed"]] = row
    return dict(sorted(cells.items(), key=lambda kv: (kv[0][1] != "mlp", kv[0])))


def mean(values) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def paired_wins(a: dict, b: dict, metric: str) -> tuple[int, int]:
    """Seeds on which method a beats b on ``metric`` (strictly), and the seeds shared."""
    sign = METRIC[metric][0]
    seeds = sorted(set(a) & set(b))
    return sum(sign * (a[s][metric] - b[s][metric]) > 1e-12 for s in seeds), len(seeds)


def ranked(methods: dict, metric: str, candidates) -> list[str]:
    sign = METRIC[metric][0]
    present = [m for m in candidates if m in methods]
    return sorted(present, key=lambda m: -sign * mean([r[metric] for r in methods[m].values()]))


def cell_label(key) -> str:
    dataset, model, ratio, n_val = key
    return f"{dataset} | {model.upper() if model == 'mlp' else 'SmallCNN'} | {ratio:g} | {n_val}"


def coverage(results) -> str:
    lines = ["| File | Model | Ratio | Validation sizes | Seeds | Methods | Failed rows | "
             "Wall time | Commit |", "|---|---|---:|---|---|---:|---:|---:|---|"]
    for stem, r in results.items():
        rows = r["rows"]
        s = r["settings"]
        seeds = sorted({row["seed"] for row in rows})
        sizes = sorted({row.get("val_per_class") or 0 for row in rows})
        failed = sum(1 for row in rows if row.get("error"))
        secs = s.get("seconds")
        lines.append(
            f"| {stem} | {s['bench']['model']} | {s['imbalance_ratio']:g} | "
            f"{', '.join(map(str, sizes))} | {len(seeds)} | {len({x['method'] for x in rows})} "
            f"| {failed} | {'?' if secs is None else f'{secs / 60:.1f} min'} | "
            f"{(s.get('git_commit') or '?')[:7]} |")
    return "\n".join(lines)


def regime(cells) -> str:
    lines = ["| Dataset | Model | Ratio | Val/class | " + " | ".join(
        label for _, label in METRIC.values()) + " |", "|---|---|---:|---:|---|---|---|"]
    for key, methods in cells.items():
        out = []
        for metric in METRIC:
            order = ranked(methods, metric, CHOICES)
            best, second = order[0], order[1]
            wins, n = paired_wins(methods[best], methods[second], metric)
            value = 100 * mean([r[metric] for r in methods[best].values()])
            out.append(f"{SHORT[best]} {value:.1f} ({wins}/{n} vs {SHORT[second]})")
        lines.append(f"| {cell_label(key)} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def _diff(a: dict, b: dict, metric: str) -> str:
    seeds = sorted(set(a) & set(b))
    d = [100 * (a[s][metric] - b[s][metric]) for s in seeds]
    sd = f" ± {statistics.stdev(d):.1f}" if len(d) > 1 else ""
    return f"{statistics.fmean(d):+.1f}{sd}"


def moonshot(cells) -> str:
    lines = ["| Dataset | Model | Ratio | Val/class | best surgery row | best other | "
             "Δ bal. acc. (wins) | Δ worst class (wins) | target met |",
             "|---|---|---:|---:|---|---|---:|---:|---|"]
    for key, methods in cells.items():
        if key[2] < 50 or key[3] < 20:
            continue
        surgery = ranked(methods, "balanced_accuracy", SURGERY)[0]
        other = ranked(methods, "balanced_accuracy",
                       [m for m in CHOICES if m not in SURGERY])[0]
        a, b = methods[surgery], methods[other]
        ba_w, n = paired_wins(a, b, "balanced_accuracy")
        wc_w, _ = paired_wins(a, b, "worst_class_accuracy")
        d_ba = mean([a[s]["balanced_accuracy"] - b[s]["balanced_accuracy"] for s in a if s in b])
        d_wc = mean([a[s]["worst_class_accuracy"] - b[s]["worst_class_accuracy"]
                     for s in a if s in b])
        met = "yes" if d_ba >= 0 and d_wc >= 0.05 else "no"
        lines.append(f"| {cell_label(key)} | {SHORT[surgery]} | {SHORT[other]} | "
                     f"{_diff(a, b, 'balanced_accuracy')} ({ba_w}/{n}) | "
                     f"{_diff(a, b, 'worst_class_accuracy')} ({wc_w}/{n}) | {met} |")
    return "\n".join(lines)


def class_losses(method: dict, base: dict) -> tuple[float, float]:
    """Two readings of "no class loses more than x points" against the untouched
    model: classes ranked head to tail by training count (the tail is seeded),
    the largest mean-over-seeds loss of one rank; and the mean over seeds of
    each seed's largest single-class loss (stricter: the class may differ)."""
    by_rank, largest = [], []
    for s, row in method.items():
        if s not in base:
            continue
        counts = np.asarray(row["_counts"] if row["_counts"] is not None else
                            np.ones(len(row["per_class_accuracy"])))
        order = np.argsort(-counts, kind="stable")
        loss = (np.asarray(base[s]["per_class_accuracy"], dtype=float)
                - np.asarray(row["per_class_accuracy"], dtype=float))[order]
        by_rank.append(loss)
        largest.append(loss.max())
    if not by_rank:
        return float("nan"), float("nan")
    return float(np.max(np.mean(by_rank, axis=0))), float(np.mean(largest))


def harm(cells) -> str:
    shown = ("spectral_surgery", "logit_adjustment", "last_layer_retraining")
    lines = ["| Dataset | Model | Ratio | Val/class | " + " | ".join(
        f"{SHORT[m]}: Δ bal. acc. / class loss (rank; per seed)" for m in shown) + " |",
             "|---|---|---:|---:|" + "---:|" * len(shown)]
    for key, methods in cells.items():
        base = methods["baseline"]
        out = []
        for m in shown:
            if m not in methods:
                out.append("–")
                continue
            rank, per_seed = class_losses(methods[m], base)
            out.append(f"{_diff(methods[m], base, 'balanced_accuracy')} / "
                       f"{100 * rank:.1f}; {100 * per_seed:.1f}")
        lines.append(f"| {cell_label(key)} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def full_size_cells(cells) -> dict:
    """The MLP cells with each dataset's whole validation split."""
    largest: dict[str, int] = {}
    for dataset, model, _, n_val in cells:
        if model == "mlp":
            largest[dataset] = max(largest.get(dataset, 0), n_val)
    return {k: v for k, v in cells.items() if k[1] == "mlp" and k[3] == largest[k[0]]}


def headline(cells) -> str:
    lines = ["| Dataset | Ratio | Val/class | Untouched σ / bal. acc. | " + " | ".join(
        SHORT[m] for m in HEADLINE) + " |", "|---|---:|---:|---:|" + "---:|" * len(HEADLINE)]
    for (dataset, _, ratio, n_val), methods in full_size_cells(cells).items():
        base = methods["baseline"]
        out = [f"{100 * mean([r['class_std'] for r in base.values()]):.1f} / "
               f"{100 * mean([r['balanced_accuracy'] for r in base.values()]):.1f}"]
        for m in HEADLINE:
            if m not in methods:
                out.append("–")
                continue
            seeds = [s for s in methods[m] if s in base]
            dsig = mean([methods[m][s]["class_std"] - base[s]["class_std"] for s in seeds])
            dba = mean([methods[m][s]["balanced_accuracy"] - base[s]["balanced_accuracy"]
                        for s in seeds])
            out.append(f"{100 * dsig:+.1f} / {100 * dba:+.1f}")
        lines.append(f"| {dataset} | {ratio:g} | {n_val} | " + " | ".join(out) + " |")
    return "\n".join(lines)


PAIRS = (("spectral_surgery", "logit_adjustment"), ("spectral_surgery", "last_layer_retraining"),
         ("logit_adjustment+spectral_surgery", "logit_adjustment"),
         ("last_layer_retraining+spectral_surgery", "last_layer_retraining"),
         ("spectral_surgery", "random_directions"), ("spectral_surgery", "bulk_directions"))


def paired(cells) -> str:
    """Per-seed σ differences between two methods on the same checkpoint."""
    lines = ["| Dataset | Ratio | Val/class | " + " | ".join(
        f"{SHORT[a]} − {SHORT[b]}" for a, b in PAIRS) + " |",
             "|---|---:|---:|" + "---:|" * len(PAIRS)]
    for (dataset, _, ratio, n_val), methods in full_size_cells(cells).items():
        out = []
        for a, b in PAIRS:
            if a not in methods or b not in methods:
                out.append("–")
                continue
            wins, n = paired_wins(methods[a], methods[b], "class_std")
            out.append(f"{_diff(methods[a], methods[b], 'class_std')} ({wins}/{n})")
        lines.append(f"| {dataset} | {ratio:g} | {n_val} | " + " | ".join(out) + " |")
    return "\n".join(lines)


FIGURE_METHODS = ("baseline", "logit_adjustment", "class_bias", "last_layer_retraining",
                  "spectral_surgery", "logit_adjustment+spectral_surgery",
                  "last_layer_retraining+spectral_surgery")


def figure(cells, path: Path) -> None:
    """Held-out balanced accuracy against validation size, one panel per
    (dataset, model) and ratio."""
    plt = pyplot()
    panels = sorted({(k[0], k[1]) for k in cells}, key=lambda p: (p[1] != "mlp", p))
    ratios = sorted({k[2] for k in cells})
    fig, axes = plt.subplots(len(panels), len(ratios), figsize=(3.1 * len(ratios),
                                                                2.6 * len(panels)),
                             squeeze=False)
    styles = {"baseline": ("0.6", ":"), "logit_adjustment": ("C0", "-"),
              "class_bias": ("C4", "-"), "last_layer_retraining": ("C2", "-"),
              "spectral_surgery": ("C3", "--"), "logit_adjustment+spectral_surgery": ("C1", "--"),
              "last_layer_retraining+spectral_surgery": ("C5", "--")}
    for i, (dataset, model) in enumerate(panels):
        for j, ratio in enumerate(ratios):
            ax = axes[i][j]
            keys = sorted(k for k in cells if k[:3] == (dataset, model, ratio))
            if not keys:
                ax.axis("off")
                continue
            for m in FIGURE_METHODS:
                xs = [k[3] for k in keys if m in cells[k]]
                ys = [100 * mean([r["balanced_accuracy"] for r in cells[k][m].values()])
                      for k in keys if m in cells[k]]
                if xs:
                    color, ls = styles[m]
                    ax.plot(xs, ys, ls, color=color, marker="o", ms=3, label=SHORT[m])
            ax.set_xscale("log")
            ax.set_xticks([k[3] for k in keys])
            ax.set_xticklabels([str(k[3]) for k in keys])
            ax.minorticks_off()
            name = "MLP" if model == "mlp" else "SmallCNN"
            ax.set_title(f"{dataset}, {name}, r = {ratio:g}", fontsize=9)
            if j == 0:
                ax.set_ylabel("held-out bal. acc. (%)")
            if i == len(panels) - 1:
                ax.set_xlabel("validation images per class")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    save_figure(fig, path)


CAPS = (("cap=0.05", 0.05), ("default", 0.10), ("cap=0.15", 0.15), ("no cap", None))


def cap_figure(path: Path) -> None:
    """The total class-drop cap's trade-off from benchmarks/results/ablation.json:
    held-out Δ balanced accuracy against the mean per-seed largest class loss,
    one line per (dataset, ratio, validation size) with r > 1."""
    runs = json.loads((RESULTS / "ablation.json").read_text())["runs"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if r["ratio"] > 1:
            groups.setdefault((r["dataset"], r["ratio"]), []).append(r)
    for i, ((dataset, ratio), rs) in enumerate(sorted(groups.items())):
        for n, marker in zip(sorted({c["n_per_class"] for r in rs for c in r["cells"]}), "os"):
            xs, ys = [], []
            for variant, _ in CAPS:
                cs = [c for r in rs for c in r["cells"]
                      if c["variant"] == variant and c["n_per_class"] == n]
                xs.append(100 * mean([c["largest_class_drop"] for c in cs]))
                ys.append(100 * mean([c["delta_balanced_accuracy"] for c in cs]))
            ax.plot(xs, ys, "-", marker=marker, color=f"C{i}", ms=4,
                    label=f"{dataset} r={ratio:g}, {n}/class")
            ax.annotate("0.05", (xs[0], ys[0]), fontsize=7, xytext=(3, -8),
                        textcoords="offset points")
    ax.set_xlabel("largest class loss, mean over seeds (points)")
    ax.set_ylabel("Δ balanced accuracy (points)")
    ax.set_title("Total class-drop cap 0.05 → 0.10 (default) → 0.15 → none", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def fill(doc: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
    if not pattern.search(doc):
        print(f"warning: no markers for {name} in {DOC}", file=sys.stderr)
        return doc
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), doc)


def render(doc: str) -> tuple[str, str, dict]:
    """``doc`` with every marker block refilled from the saved results, the
    full tables of ``benchmarks/results/tables.md``, and the grid's cells."""
    assert set(SHORT) <= set(_LABELS)
    results = load_grid()
    summary = summarize(list(results.values()))
    cells = by_cell(all_rows(results))
    full = [e for e in summary if (e["dataset"], e.get("model") or "mlp",
                                   e["imbalance_ratio"], e.get("val_per_class") or 0)
            in full_size_cells(cells)]
    for name, body in (("coverage", coverage(results)), ("regime", regime(cells)),
                       ("moonshot", moonshot(cells)), ("harm", harm(cells)),
                       ("headline", headline(cells)), ("paired", paired(cells)),
                       ("grid", format_table(full))):
        doc = fill(doc, name, body)
    for name in ("ablation", "joint_head", "bulk_walk", "bulk_walk_small", "spike_count",
                 "weight_power", "validation_size", "refresh_value"):
        path = RESULTS / f"{name}.md"
        if path.exists():
            doc = fill(doc, name, path.read_text())
    return doc, format_table(summary) + "\n", cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when a table in docs/benchmarks.md or "
                             "benchmarks/results/tables.md differs from the saved results")
    args = parser.parse_args(argv)
    current = DOC.read_text()
    doc, tables, cells = render(current)
    if args.check:
        stale = [str(p) for p, new, old in ((DOC, doc, current),
                                            (RESULTS / "tables.md", tables,
                                             (RESULTS / "tables.md").read_text()))
                 if new != old]
        if stale:
            print("out of date with benchmarks/results: " + ", ".join(stale)
                  + " (run python benchmarks/make_tables.py)")
            return 1
        return 0
    (RESULTS / "tables.md").write_text(tables)
    figure(cells, IMAGES / "regime_map.png")
    cap_figure(IMAGES / "cap_tradeoff.png")
    DOC.write_text(doc)
    print(f"wrote {DOC}, {RESULTS / 'tables.md'} and the figures in {IMAGES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
