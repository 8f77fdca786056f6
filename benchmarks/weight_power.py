"""Weight-power ablation: p ∈ {0, ½, 1, 2} against the paper's e_max/e_min rule.

The surgery's objective weights class j by ``w_j ∝ e_j^p`` (``e_j`` its
validation error). The paper's rule: ``p = 2`` when ``e_max/e_min < 5``,
``p = ½`` otherwise (severe imbalance). For each dataset, imbalance ratio and
seed the benchmark's model is trained once and the surgery (defaults, Hessian
on the training sample) runs with each fixed ``p`` and with
``weight_power="auto"`` (the rule); every result is measured on the held-out
test split. Writes ``benchmarks/results/weight_power.json`` and
``weight_power.md``.

Usage::

    python benchmarks/weight_power.py [--datasets digits-lt mnist-lt]
                                      [--ratios 1 10 100] [--seeds 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import command_line, mean_std, reference_checkpoint, run_cells, setup, write_text

from hessrebal import SpectralSurgeon
from hessrebal.bench import evaluate_model
from hessrebal.datasets import load_long_tailed

POWERS = (0.0, 0.5, 1.0, 2.0, "auto")


def rule(val_acc: np.ndarray) -> float:
    """The paper's rule, as the surgeon applies it (e_min floored at 0.001)."""
    e = 1.0 - val_acc[np.isfinite(val_acc)]
    return 2.0 if float(e.max()) / max(float(e.min()), 1e-3) < 5 else 0.5


def run_cell(dataset, ratio, seed):
    splits = load_long_tailed(dataset, imbalance_ratio=ratio, random_state=seed)
    C = splits.n_classes
    model, curv = reference_checkpoint(dataset, splits, seed)
    X_val, y_val = splits.data("val")
    X_te, y_te = splits.data("test")
    before = evaluate_model(model, X_te, y_te, C)
    val_before = evaluate_model(model, X_val, y_val, C)
    out = {"dataset": dataset, "ratio": ratio, "seed": seed,
           "rule_pick": rule(np.asarray(val_before["per_class_accuracy"])),
           "val_error_ratio": float(
               (1 - np.min(val_before["per_class_accuracy"]))
               / max(1 - np.max(val_before["per_class_accuracy"]), 1e-3)),
           "before": before, "val_before": val_before, "runs": {}}
    for p in POWERS:
        t0 = time.perf_counter()
        s = SpectralSurgeon(weight_power=p, random_state=seed).fit(model, X_val, y_val,
                                                                   curvature_data=curv)
        fixed = s.transform(model)
        after = evaluate_model(fixed, X_te, y_te, C)
        out["runs"][str(p)] = {
            "test": after,
            "val_class_std_after": float(np.nanstd(s.per_class_accuracy_after_)),
            "val_class_std_before": float(np.nanstd(s.per_class_accuracy_before_)),
            "accepted": int(sum(h["accepted"] for h in s.history_)),
            "seconds": time.perf_counter() - t0,
        }
    return out


def table(cells):
    groups = {}
    for c in cells:
        groups.setdefault((c["dataset"], c["ratio"]), []).append(c)
    head = ("| Data | Ratio | e_max/e_min (val) | rule picks | "
            + " | ".join(f"p = {p}" for p in POWERS) + " | best fixed p |")
    lines = [head, "|---|---:|---:|---|" + "---:|" * len(POWERS) + "---|"]
    for (dataset, ratio), cs in groups.items():
        picks = [c["rule_pick"] for c in cs]
        pick_txt = ", ".join(f"{v:g}×{picks.count(v)}" for v in sorted(set(picks)))
        cells_txt, means = [], {}
        for p in POWERS:
            ds = [c["runs"][str(p)]["test"]["class_std"] - c["before"]["class_std"] for c in cs]
            db = [c["runs"][str(p)]["test"]["balanced_accuracy"]
                  - c["before"]["balanced_accuracy"] for c in cs]
            means[p] = float(np.mean(ds))
            cells_txt.append(f"{mean_std(ds, signed=True)} / {mean_std(db, signed=True)}")
        best = min((p for p in POWERS if p != "auto"), key=lambda p: means[p])
        ratios = [c["val_error_ratio"] for c in cs]
        lines.append(f"| {dataset} | {ratio:g} | {mean_std(ratios, 1, 1)} | {pick_txt} | "
                     + " | ".join(cells_txt) + f" | {best:g} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["digits-lt", "mnist-lt"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[1.0, 10.0, 100.0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--name", default="weight_power")
    args = ap.parse_args(argv)
    setup()
    cells = run_cells(args, "weight power", run_cell)
    cmd = command_line("weight_power.py", argv)
    md = ("Weight-power ablation: held-out Δσ / Δ balanced accuracy (percentage points, "
          f"mean ± std over {args.seeds} seeds) of the surgery with w_j ∝ e_j^p, against the "
          "trained model. 'auto' is the paper's rule (p = 2 if e_max/e_min < 5, else ½); "
          "'best fixed p' has the lowest mean held-out σ.\n\n" + table(cells)
          + f"\n\nCommand: `{cmd}`\n")
    write_text(f"{args.name}.md", md)
    print(md)


if __name__ == "__main__":
    main()
