"""Candidate (b) of the ablation: move in the spike span and in the final layer jointly.

The trained parameters θ₀ move to θ₀ + Qα + EΔ, where Q holds the top C − 1
Hessian eigenvectors (on the benchmark's curvature sample, as the surgeon
takes them) and EΔ changes only the final linear layer. α and Δ minimise

    class-balanced cross-entropy on the validation data
    + ½ Σ_i λ_i α_i²          (the second-order rise of the training loss)
    + (ν/2) ‖Δ‖²

by L-BFGS, so the curvature sets the price of each spike direction. ν is
chosen from {1e-3, 1e-2, 1e-1, 1} by stratified 3-fold cross-validation on the
validation data (balanced accuracy), as last-layer retraining chooses its L2
strength. This is a model strictly richer than last-layer retraining (α = 0
is allowed) with the surgery's directions. Same cells, checkpoints and
validation subsets as benchmarks/ablation.py; compared, paired, with the
untouched model, last-layer retraining and the default surgery.

Writes ``benchmarks/results/joint_head.json`` and ``joint_head.md``. Usage::

    python benchmarks/joint_head.py [--datasets digits-lt mnist-lt] [--ratios 1 10 100]
                                    [--seeds 5]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _common import command_line, reference_checkpoint, run_cells, setup, variant_table, write_text
from ablation import SIZES
from sklearn.model_selection import StratifiedKFold

from hessrebal import SpectralSurgeon
from hessrebal._logistic import balanced_sample_weight
from hessrebal._model import FunctionalModel
from hessrebal.baselines import LastLayerRetraining
from hessrebal.bench import evaluate_model, validation_subset
from hessrebal.datasets import load_long_tailed
from hessrebal.metrics import balanced_accuracy, per_class_accuracy
from hessrebal.parameters import ParameterSpace

NUS = (1e-3, 1e-2, 1e-1, 1.0)


def fit_joint(fmodel, theta0, Q, lam, head, X, y, C, nu, iters=60):
    """(α, Δ) minimising the objective above; returns the new θ."""
    w = torch.as_tensor(balanced_sample_weight(y.numpy(), C), dtype=theta0.dtype)
    alpha = torch.zeros(Q.shape[1], dtype=theta0.dtype, requires_grad=True)
    delta = torch.zeros(int(head.sum()), dtype=theta0.dtype, requires_grad=True)
    lam_t = torch.as_tensor(lam, dtype=theta0.dtype)
    opt = torch.optim.LBFGS([alpha, delta], max_iter=iters, line_search_fn="strong_wolfe")

    def theta():
        t = theta0 + Q @ alpha
        return t.index_add(0, torch.nonzero(head).squeeze(1), delta)

    def closure():
        opt.zero_grad()
        z = fmodel.logits(theta(), X)
        ce = torch.nn.functional.cross_entropy(z, y, reduction="none")
        loss = (w * ce).sum() / w.sum() + 0.5 * (lam_t * alpha**2).sum() \
            + 0.5 * nu * (delta**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return theta().detach()


def joint(model, X, y, curv, C, seed):
    spikes = SpectralSurgeon(random_state=seed, max_steps=0, imbalance_alpha=None).fit(
        model, X, y, curvature_data=curv)
    space = ParameterSpace(model)
    fmodel = FunctionalModel(model, space)
    theta0 = fmodel.initial_theta()
    head_name = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    head = torch.cat([torch.full((int(np.prod(s)),), n.startswith(head_name + "."))
                      for n, s in zip(space.names, space.shapes)])
    Q, lam = spikes.eigenvectors_.to(theta0.dtype), spikes.eigenvalues_
    labels = y.numpy()
    folds = int(min(3, np.bincount(labels).min()))
    scores = np.zeros(len(NUS))
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(
            labels, labels):
        for i, nu in enumerate(NUS):
            t = fit_joint(fmodel, theta0, Q, lam, head, X[train], y[train], C, nu)
            with torch.no_grad():
                pred = fmodel.logits(t, X[test]).argmax(1)
            scores[i] += balanced_accuracy(per_class_accuracy(y[test], pred, C))
    nu = NUS[int(np.argmax(scores))]
    theta = fit_joint(fmodel, theta0, Q, lam, head, X, y, C, nu)
    return space.apply(model, theta - theta0), nu


def run_cell(dataset, ratio, seed, sizes):
    splits = load_long_tailed(dataset, imbalance_ratio=ratio, random_state=seed)
    C = splits.n_classes
    model, curv = reference_checkpoint(dataset, splits, seed)
    model.eval()
    X_te, y_te = splits.data("test")
    before = evaluate_model(model, X_te, y_te, C)
    out = {"dataset": dataset, "ratio": ratio, "seed": seed, "before": before, "cells": []}
    for n in sizes:
        X, y = validation_subset(splits, n)
        new, nu = joint(model, X, y, curv, C, seed)
        models = {"(b) joint": new,
                  "LLR": LastLayerRetraining(random_state=seed).fit_transform(model, X, y),
                  "default": SpectralSurgeon(random_state=seed).fit(
                      model, X, y, curvature_data=curv).transform(model)}
        for name, m in models.items():
            e = evaluate_model(m, X_te, y_te, C)
            out["cells"].append({
                "n_per_class": n, "variant": name, "nu": nu if name == "(b) joint" else None,
                "balanced_accuracy": e["balanced_accuracy"],
                "delta_balanced_accuracy": e["balanced_accuracy"] - before["balanced_accuracy"],
                "worst_class_accuracy": e["worst_class_accuracy"],
                "delta_class_std": e["class_std"] - before["class_std"]})
    return out


def table(runs):
    header = ("| Data | val / class | variant | Δ bal. acc. | Δσ | worst class | "
              "paired wins vs LLR (bal. acc.) |\n|---|---:|---|---:|---:|---:|---:|")
    return variant_table(runs, ("(b) joint", "LLR", "default"), "LLR",
                         [("delta_balanced_accuracy", True), ("delta_class_std", True),
                          ("worst_class_accuracy", False)], header)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["digits-lt", "mnist-lt"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[1, 10, 100])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--name", default="joint_head")
    args = ap.parse_args(argv)
    setup()
    runs = run_cells(args, "joint head", lambda d, r, seed: run_cell(
        d, r, seed, SIZES.get(d, (20, 50))), key="runs")
    md = ("Candidate (b), spike span and final layer moved jointly: Δ against the untouched "
          f"model in percentage points, mean ± std over {args.seeds} seeds, held-out test "
          "split; paired wins count the seeds on which a variant's balanced accuracy beats "
          "last-layer retraining's.\n\n" + table(runs)
          + f"\n\nCommand: `{command_line('joint_head.py', argv)}`\n")
    write_text(f"{args.name}.md", md)
    print(md)


if __name__ == "__main__":
    main()
