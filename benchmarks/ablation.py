"""Ablation of the surgery's variants on held-out data (issue "Where Spectral Surgery wins").

For each dataset, imbalance ratio and seed the benchmark's MLP is trained once
(``hessrebal bench``'s settings); every variant then runs on the same
checkpoint with ``n`` validation images per class (nested subsets of the
validation split) and is measured on the balanced test split. Variants:

- ``paper``: ``SpectralSurgeon.paper_faithful()`` (finite-difference accuracy
  sensitivity, the paper's weight-power rule, per-step guards only);
- ``v0.1``: the 0.1.0 defaults (margin surrogate, p = 1, per-step guards only);
- ``+cap``: v0.1 with the total class-drop cap ``max_total_class_drop=0.1``;
- ``+cap+ba``: and the balanced-accuracy guard ``max_balanced_accuracy_drop=0``;
- ``+noise-aware``: and noise-aware acceptance;
- ``default``: and the imbalance test before the loop (today's defaults);
- ``cap=0.05`` / ``cap=0.15`` / ``no cap``: the default with another total cap
  (the trade-off between gain and the largest class loss);
- ``(a) balanced H``: the default with its Hessian on a class-balanced resample
  of the training data (each class drawn with replacement to the same count,
  i.e. the Hessian of the class-balanced loss in expectation);
- ``(c) bagged``: the mean of the perturbations of five default fits, each on a
  different stratified half of the validation data;
- ``(d) held-out``: the default with ``selection_fraction=0.5`` (the
  accept/rollback decisions on a held-out half of the validation data);
- references: logit adjustment (LA), last-layer retraining (LLR), and the
  default surgery run on each of them.

Writes ``benchmarks/results/ablation.json`` and ``ablation.md`` (paired
differences against the untouched model, mean ± std over seeds, and the
largest per-class loss). Usage::

    python benchmarks/ablation.py [--datasets digits-lt mnist-lt] [--ratios 1 10 100]
                                  [--seeds 5]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _common import command_line, reference_checkpoint, run_cells, setup, variant_table, write_text

from hessrebal import SpectralSurgeon
from hessrebal.baselines import LastLayerRetraining, LogitAdjustment
from hessrebal.bench import default_settings, evaluate_model, validation_subset
from hessrebal.datasets import load_long_tailed

SIZES = {"digits-lt": (20, 40), "mnist-lt": (20, 50)}
PAPER = dict(acceptance="tolerance", max_total_class_drop=None, max_balanced_accuracy_drop=None,
             imbalance_alpha=None)
SURGERY = {
    "paper": None,
    "v0.1": PAPER,
    "+cap": {**PAPER, "max_total_class_drop": 0.1},
    "+cap+ba": {**PAPER, "max_total_class_drop": 0.1, "max_balanced_accuracy_drop": 0.0},
    "+noise-aware": {"imbalance_alpha": None},
    "default": {},
    "cap=0.05": {"max_total_class_drop": 0.05},
    "cap=0.15": {"max_total_class_drop": 0.15},
    "no cap": {"max_total_class_drop": None},
    "(d) held-out": {"selection_fraction": 0.5},
}
ORDER = ("baseline", "LA", "LLR", *SURGERY, "(a) balanced H", "(c) bagged", "LA → default",
         "LLR → default")


def balanced_resample(splits, n: int, seed: int):
    """``n // C`` training samples per class, drawn with replacement."""
    y = splits.labels("train").numpy()
    X, Y = splits.data("train")
    rng = np.random.default_rng(seed + 104729)
    per = max(1, n // splits.n_classes)
    idx = np.concatenate([rng.choice(np.flatnonzero(y == c), per, replace=True)
                          for c in range(splits.n_classes) if np.any(y == c)])
    return X[idx], Y[idx]


def bagged(model, X, y, curv, seed: int, n_bags: int = 5):
    """The default surgery fitted on ``n_bags`` stratified halves, steps averaged."""
    labels = y.numpy()
    rng = np.random.default_rng(seed)
    steps = []
    for _ in range(n_bags):
        half = np.sort(np.concatenate([
            (m := rng.permutation(np.flatnonzero(labels == c)))[:max(1, m.size // 2)]
            for c in np.unique(labels)]))
        s = SpectralSurgeon(random_state=seed).fit(model, X[half], y[half], curvature_data=curv)
        steps.append(s.perturbation_)
    s.perturbation_ = torch.stack(steps).mean(0)
    return s.transform(model)


def run_cell(dataset, ratio, seed, sizes):
    splits = load_long_tailed(dataset, imbalance_ratio=ratio, random_state=seed)
    C = splits.n_classes
    model, curv = reference_checkpoint(dataset, splits, seed)
    balanced_curv = balanced_resample(splits, default_settings(dataset).curvature_samples, seed)
    X_te, y_te = splits.data("test")
    before = evaluate_model(model, X_te, y_te, C)
    prior = np.maximum(np.asarray(splits.class_counts, dtype=np.float64), 1.0)
    out = {"dataset": dataset, "ratio": ratio, "seed": seed, "before": before, "cells": []}
    for n in sizes:
        X, y = validation_subset(splits, n)

        def surgery(on, X=X, y=y, **kw):
            return SpectralSurgeon(random_state=seed, **kw).fit(
                on, X, y, curvature_data=curv).transform(on)

        la = LogitAdjustment(class_prior=prior / prior.sum()).fit_transform(model, X, y)
        llr = LastLayerRetraining(random_state=seed).fit_transform(model, X, y)
        models = {"baseline": model, "LA": la, "LLR": llr}
        for name, kw in SURGERY.items():
            if kw is None:
                models[name] = SpectralSurgeon.paper_faithful(random_state=seed).fit(
                    model, X, y, curvature_data=curv).transform(model)
            else:
                models[name] = surgery(model, **kw)
        models["(a) balanced H"] = SpectralSurgeon(random_state=seed).fit(
            model, X, y, curvature_data=balanced_curv).transform(model)
        models["(c) bagged"] = bagged(model, X, y, curv, seed)
        models["LA → default"] = surgery(la)
        models["LLR → default"] = surgery(llr)
        for name, m in models.items():
            e = evaluate_model(m, X_te, y_te, C)
            drops = np.asarray(before["per_class_accuracy"]) - np.asarray(e["per_class_accuracy"])
            out["cells"].append({
                "n_per_class": n, "variant": name,
                "balanced_accuracy": e["balanced_accuracy"],
                "delta_balanced_accuracy": e["balanced_accuracy"] - before["balanced_accuracy"],
                "delta_class_std": e["class_std"] - before["class_std"],
                "worst_class_accuracy": e["worst_class_accuracy"],
                "largest_class_drop": float(np.max(drops)),
            })
    return out


def table(runs):
    header = ("| Data | val / class | variant | Δ bal. acc. | Δσ | worst class | largest class "
              "loss | paired wins vs default (bal. acc.) |\n"
              "|---|---:|---|---:|---:|---:|---:|---:|")
    return variant_table(runs, ORDER, "default",
                         [("delta_balanced_accuracy", True), ("delta_class_std", True),
                          ("worst_class_accuracy", False), ("largest_class_drop", False)],
                         header)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["digits-lt", "mnist-lt"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[1, 10, 100])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--name", default="ablation")
    args = ap.parse_args(argv)
    setup()
    runs = run_cells(args, "ablation", lambda d, r, seed: run_cell(
        d, r, seed, SIZES.get(d, (20, 50))), key="runs")
    md = ("Ablation on held-out test data: Δ against the untouched model in percentage points, "
          f"mean ± std over {args.seeds} seeds; \"largest class loss\" is the largest drop of "
          "one class's accuracy against the untouched model (mean over seeds); paired wins "
          "count the seeds on which the variant's balanced accuracy beats the default "
          "surgery's.\n\n" + table(runs) + f"\n\nCommand: `{command_line('ablation.py', argv)}`\n")
    write_text(f"{args.name}.md", md)
    print(md)


if __name__ == "__main__":
    main()
