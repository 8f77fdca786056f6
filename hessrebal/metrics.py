"""Per-class accuracy and the summaries built on it (the one implementation)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def per_class_accuracy(y_true: Any, y_pred: Any, n_classes: int) -> np.ndarray:
    """Accuracy on each class; ``nan`` for a class with no sample.

    ``y_pred`` may have a leading batch axis ``(m, n)``, giving ``(m, C)``.
    """
    yt = torch.as_tensor(np.asarray(y_true) if not isinstance(y_true, torch.Tensor) else y_true)
    yp = torch.as_tensor(np.asarray(y_pred) if not isinstance(y_pred, torch.Tensor) else y_pred)
    yt = yt.to(torch.int64).cpu()
    yp = yp.to(torch.int64).cpu()
    counts = torch.bincount(yt, minlength=n_classes)[:n_classes].to(torch.float64)
    correct_mask = (yp == yt).to(torch.float64)
    if yp.ndim == 1:
        correct = torch.zeros(n_classes, dtype=torch.float64).index_add_(0, yt, correct_mask)
    else:
        correct = torch.zeros(yp.shape[0], n_classes, dtype=torch.float64)
        correct.index_add_(1, yt, correct_mask)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = (correct / counts).numpy()
    acc[..., counts.numpy() == 0] = np.nan
    return acc


def balanced_accuracy(per_class: np.ndarray) -> float:
    """Mean of the per-class accuracies, ignoring absent (NaN) classes."""
    return float(np.nanmean(per_class))


def imbalance_pvalue(y_true: Any, correct: Any, n_classes: int) -> float:
    """p-value of the χ² test that every class has the same accuracy.

    The test of homogeneity of the ``C × 2`` table (class × right/wrong):
    a large p-value says the per-class accuracies differ no more than the
    sampling noise of this many samples explains. Classes with no sample are
    left out; with fewer than two classes, or no error (or no correct
    prediction) at all, there is nothing to test and the p-value is 1.

    Examples
    --------
    >>> y = np.repeat([0, 1], 50)
    >>> balanced = np.r_[np.arange(50) < 45, np.arange(50) < 44]
    >>> imbalance_pvalue(y, balanced, 2) > 0.5  # 45 vs 44 of 50 right
    True
    >>> imbalance_pvalue(y, np.r_[np.arange(50) < 48, np.arange(50) < 20], 2) < 1e-6
    True
    """
    from scipy.stats import chi2_contingency

    y = np.asarray(y_true, dtype=np.int64).ravel()
    ok = np.asarray(correct, dtype=bool).ravel()
    if ok.size != y.size:
        raise ValueError(f"correct must have one entry per sample ({y.size}); got {ok.size}.")
    right = np.bincount(y, weights=ok, minlength=n_classes)[:n_classes]
    total = np.bincount(y, minlength=n_classes)[:n_classes]
    table = np.stack([right, total - right], axis=1)[total > 0]
    if table.shape[0] < 2 or np.any(table.sum(axis=0) == 0):
        return 1.0
    return float(chi2_contingency(table, correction=False)[1])


def class_std(per_class: np.ndarray) -> float:
    """Population standard deviation of per-class accuracy (σ in the paper)."""
    return float(np.nanstd(per_class))


def summarize(
    y_true: Any, logits: torch.Tensor | np.ndarray, n_classes: int | None = None
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, σ, worst class and NLL from logits."""
    logits_t = torch.as_tensor(logits).detach().cpu().to(torch.float64)
    yt = torch.as_tensor(np.asarray(y_true)).to(torch.int64).cpu()
    C = n_classes or logits_t.shape[1]
    pred = logits_t.argmax(dim=1)
    pc = per_class_accuracy(yt, pred, C)
    nll = float(torch.nn.functional.cross_entropy(logits_t, yt))
    worst = int(np.nanargmin(pc))
    return {
        "accuracy": float((pred == yt).to(torch.float64).mean()),
        "balanced_accuracy": balanced_accuracy(pc),
        "class_std": class_std(pc),
        "worst_class_accuracy": float(pc[worst]),
        "worst_class": worst,
        "nll": nll,
        "per_class_accuracy": pc.tolist(),
    }
