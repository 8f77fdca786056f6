"""How the held-out gain of the surgery depends on the validation size (docs/method.md §9).

With n validation images per class, each per-class accuracy carries a noise
of about √(a(1−a)/n) — ±4 points at n = 50 — as large as σ itself on
balanced data, and a loop that accepts steps on the same data can fit that
noise. For each dataset and seed the benchmark's model is trained once (with
a 200-per-class validation pool and a fixed 100-per-class test split); the
surgery then sees nested stratified subsets of n ∈ {10, 25, 50, 100, 200}
validation images per class, with three acceptance settings:

- ``tolerance``: the paper's rule (defaults);
- ``selection``: ``selection_fraction=0.5`` (half the validation data only
  decides accept/rollback);
- ``noise_aware``: ``acceptance="noise_aware"`` (accept only when the σ
  improvement exceeds its standard error).

Reported per cell: held-out Δσ and Δ balanced accuracy, and the validation
Δσ the loop saw (the gap between the two is the overfitting). Writes
``benchmarks/results/validation_size.json`` and ``validation_size.md``.

Usage::

    python benchmarks/validation_size.py [--datasets mnist:1 mnist-lt:10] [--seeds 3]
"""

from __future__ import annotations

import argparse

from _common import (
    command_line,
    log,
    mean_std,
    reference_checkpoint,
    setup,
    write_json,
    write_text,
)

from hessrebal import SpectralSurgeon
from hessrebal.bench import evaluate_model, validation_subset
from hessrebal.datasets import load_long_tailed

VARIANTS = {
    "tolerance": {},
    "selection": {"selection_fraction": 0.5},
    "noise_aware": {"acceptance": "noise_aware"},
}


def run_cell(dataset, ratio, seed, sizes, pool):
    splits = load_long_tailed(dataset, imbalance_ratio=ratio, random_state=seed,
                              val_per_class=pool, test_per_class=100)
    C = splits.n_classes
    model, curv = reference_checkpoint(dataset, splits, seed)
    X_te, y_te = splits.data("test")
    before = evaluate_model(model, X_te, y_te, C)
    out = {"dataset": dataset, "ratio": ratio, "seed": seed, "before": before, "cells": []}
    for n in sizes:
        Xv, yv = validation_subset(splits, n)
        val_before = evaluate_model(model, Xv, yv, C)
        for variant, kwargs in VARIANTS.items():
            s = SpectralSurgeon(random_state=seed, **kwargs).fit(model, Xv, yv,
                                                                curvature_data=curv)
            fixed = s.transform(model)
            after = evaluate_model(fixed, X_te, y_te, C)
            val_after = evaluate_model(fixed, Xv, yv, C)
            out["cells"].append({
                "n_per_class": n, "variant": variant,
                "test_delta_class_std": after["class_std"] - before["class_std"],
                "test_delta_balanced_accuracy": after["balanced_accuracy"]
                - before["balanced_accuracy"],
                "val_delta_class_std": val_after["class_std"] - val_before["class_std"],
                "accepted": int(sum(h["accepted"] for h in s.history_)),
            })
    return out


def table(runs, sizes):
    lines = ["| Data | val / class | variant | held-out Δσ | held-out Δ bal. acc. | "
             "validation Δσ (seen by the loop) | steps accepted |",
             "|---|---:|---|---:|---:|---:|---:|"]
    groups = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["ratio"]), []).append(r)
    for (dataset, ratio), rs in groups.items():
        for n in sizes:
            for variant in VARIANTS:
                cs = [c for r in rs for c in r["cells"]
                      if c["n_per_class"] == n and c["variant"] == variant]
                lines.append(
                    f"| {dataset} (r={ratio:g}) | {n} | {variant} | "
                    f"{mean_std([c['test_delta_class_std'] for c in cs], signed=True)} | "
                    f"{mean_std([c['test_delta_balanced_accuracy'] for c in cs], signed=True)}"
                    f" | {mean_std([c['val_delta_class_std'] for c in cs], signed=True)} | "
                    f"{mean_std([c['accepted'] for c in cs], 1, 1)} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["mnist:1", "mnist-lt:10"],
                    help="NAME:RATIO pairs")
    ap.add_argument("--sizes", nargs="+", type=int, default=[10, 25, 50, 100, 200])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--name", default="validation_size")
    args = ap.parse_args(argv)
    setup()
    pool = max(args.sizes)
    runs = []
    for item in args.datasets:
        dataset, _, ratio = item.partition(":")
        ratio = float(ratio) if ratio else None
        for seed in range(args.seeds):
            log(f"validation size {dataset} r={ratio} seed {seed}")
            runs.append(run_cell(dataset, ratio, seed, args.sizes, pool))
            write_json(args.name, {"settings": vars(args), "runs": runs})
    cmd = command_line("validation_size.py", argv)
    md = ("Held-out gain versus validation size: Δ against the trained model in percentage "
          f"points (mean ± std over {args.seeds} seeds), 100 test images per class.\n\n"
          + table(runs, args.sizes) + f"\n\nCommand: `{cmd}`\n")
    write_text(f"{args.name}.md", md)
    print(md)


if __name__ == "__main__":
    main()
