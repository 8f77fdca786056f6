"""Training-time references for the benchmark: short fine-tunes from a checkpoint.

These are not post-hoc: they take gradient steps on the *training* data. They
exist so the benchmark can compare Spectral Surgery with the usual ways of
fixing imbalance by training — focal loss (Lin et al. 2017) and class-balanced
weights from the effective number of samples (Cui et al. 2019) — starting
from the same checkpoint. Each returns a new model; the given one is untouched.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from ._data import as_data
from .models import train_model
from .parameters import unwrap_model

__all__ = ["class_balanced_weights", "focal_finetune", "class_balanced_finetune"]


def class_balanced_weights(class_counts: Any, beta: float = 0.999) -> np.ndarray:
    """Effective-number class weights ``(1 − β) / (1 − β^n_c)`` (Cui et al. 2019).

    Parameters
    ----------
    class_counts : array-like of shape (C,)
        Training samples per class.
    beta : float in [0, 1), default=0.999
        ``β = 0`` gives equal weights; ``β → 1`` approaches inverse frequency.

    Returns
    -------
    ndarray of shape (C,)
        Normalised to sum to the number of classes present (as in the paper);
        a class with no sample gets weight 0.

    Examples
    --------
    >>> class_balanced_weights([100, 10], beta=0.0).tolist()
    [1.0, 1.0]
    >>> w = class_balanced_weights([1000, 10], beta=0.999); bool(w[1] > 50 * w[0])
    True
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError("class_counts must be a non-empty 1-D array.")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError("class_counts must hold finite non-negative numbers.")
    if not (isinstance(beta, (int, float)) and 0 <= beta < 1):
        raise ValueError(f"beta must be a number in [0, 1); got {beta!r}.")
    present = counts > 0
    if not present.any():
        raise ValueError("class_counts are all zero.")
    w = np.zeros_like(counts)
    if beta == 0:
        w[present] = 1.0
    else:
        # 1 − β^n as −expm1(n·log β): accurate when β^n is close to 1.
        w[present] = (1.0 - beta) / -np.expm1(counts[present] * np.log(beta))
    return w * present.sum() / w.sum()


def _n_outputs(model: nn.Module, data) -> int:
    from ._model import default_output_to_logits, evaluation_mode

    module = unwrap_model(model)
    p = next(module.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None else None
    x, _ = next(data.chunks(2, device, dtype))
    with torch.no_grad(), evaluation_mode(module):
        out = default_output_to_logits(module(x))
    return int(out.shape[1])


def focal_finetune(
    model: Any,
    X: Any,
    y: Any = None,
    *,
    gamma: float = 2.0,
    epochs: int = 5,
    lr: float = 1e-4,
    batch_size: int = 128,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    class_weights: Any = None,
    random_state: int | None = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> Any:
    """Fine-tune a copy of ``model`` with the focal loss (Lin et al. 2017).

    Parameters
    ----------
    model : nn.Module or skorch net
        The checkpoint; never modified.
    X, y
        Training data (as in :func:`hessrebal.models.train_model`).
    gamma : float, default=2.0
        Focal exponent; 0 gives plain cross-entropy fine-tuning.
    epochs, lr, batch_size, weight_decay, optimizer, random_state, device, progress
        See :func:`hessrebal.models.train_model` (lr is annealed by a cosine).
    class_weights : array-like, optional
        Extra per-class weights (the α of the focal loss).

    Returns
    -------
    model
        A fine-tuned deep copy (same type as ``model``), in eval mode.

    Examples
    --------
    >>> import torch
    >>> from hessrebal.models import make_model
    >>> X = torch.randn(64, 4); y = (X[:, 0] > 0).long()
    >>> m = make_model("mlp", in_features=4, hidden=(8,), n_classes=2)
    >>> tuned = focal_finetune(m, X, y, epochs=1)
    >>> tuned is m
    False
    """
    if not (isinstance(gamma, (int, float)) and gamma >= 0):
        raise ValueError(f"gamma must be a non-negative number; got {gamma!r}.")
    unwrap_model(model)
    tuned = copy.deepcopy(model)
    return train_model(tuned, X, y, epochs=epochs, lr=lr, batch_size=batch_size,
                       weight_decay=weight_decay, optimizer=optimizer,
                       random_state=random_state, class_weights=class_weights, loss="focal",
                       gamma=gamma, device=device, progress=progress)


def class_balanced_finetune(
    model: Any,
    X: Any,
    y: Any = None,
    *,
    beta: float = 0.999,
    loss: str = "ce",
    gamma: float = 2.0,
    class_counts: Any = None,
    epochs: int = 5,
    lr: float = 1e-4,
    batch_size: int = 128,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    random_state: int | None = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> Any:
    """Fine-tune a copy of ``model`` with class-balanced loss weights (Cui et al. 2019).

    Parameters
    ----------
    model : nn.Module or skorch net
        The checkpoint; never modified.
    X, y
        Training data.
    beta : float in [0, 1), default=0.999
        Effective-number parameter, see :func:`class_balanced_weights`.
    loss : {"ce", "focal"}, default="ce"
        Class-balanced cross-entropy or class-balanced focal loss.
    gamma : float, default=2.0
        Focal exponent when ``loss="focal"``.
    class_counts : array-like of shape (C,), optional
        Training counts per class; default: counted from ``y`` (C = the
        model's number of outputs).
    epochs, lr, batch_size, weight_decay, optimizer, random_state, device, progress
        See :func:`hessrebal.models.train_model`.

    Returns
    -------
    model
        A fine-tuned deep copy, in eval mode.
    """
    unwrap_model(model)
    data = as_data(X, y)
    # Probe the copy, not the checkpoint: even an eval-mode forward of a
    # custom module could write to its buffers.
    tuned = copy.deepcopy(model)
    if class_counts is None:
        n_out = _n_outputs(tuned, data)
        labels = data.labels()
        if labels.numel() and int(labels.max()) >= n_out:
            raise ValueError(f"y contains label {int(labels.max())} but the model has {n_out} "
                             "outputs.")
        class_counts = torch.bincount(labels, minlength=n_out).numpy()
    weights = class_balanced_weights(class_counts, beta)
    return train_model(tuned, data, None, epochs=epochs, lr=lr, batch_size=batch_size,
                       weight_decay=weight_decay, optimizer=optimizer,
                       random_state=random_state, class_weights=weights, loss=loss,
                       gamma=gamma, device=device, progress=progress)
