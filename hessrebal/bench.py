"""The benchmark behind ``hessrebal bench``: every method, every seed, held-out numbers.

For each seed the runner loads the dataset's seeded splits, trains a model
from scratch with the seeded :func:`~hessrebal.models.train_model`, applies
every method to that one checkpoint, and measures each result on the
held-out test split. Everything a method tunes (τ, offsets, the surgery's
steps, the fine-tunes' learning rate) is tuned on the validation split only.

Methods (``METHODS``):

- ``baseline``: the trained model;
- ``logit_adjustment``, ``tau_normalization``, ``class_bias``,
  ``last_layer_retraining``: the post-hoc baselines of
  :mod:`hessrebal.baselines`;
- ``spectral_surgery``: :class:`~hessrebal.SpectralSurgeon` with its
  defaults, the Hessian taken on (a sample of) the training data;
- ``spectral_surgery+logit_adjustment``: logit adjustment tuned on the
  surgery's output; ``logit_adjustment+spectral_surgery``: the surgery run
  on the logit-adjusted model; ``last_layer_retraining+spectral_surgery``:
  the surgery run on the model with the refitted last layer;
- ``focal_finetune``, ``class_balanced_finetune``: short fine-tunes of the
  checkpoint on the training data (not post-hoc), learning rate chosen on
  validation; ``class_balanced_finetune+spectral_surgery``: the surgery on
  the class-balanced fine-tune (the paper's best ISIC-2019 result);
- ``random_directions``, ``bulk_directions``: the surgery's loop and budget
  with the spikes replaced by the controls of :mod:`hessrebal.controls`.

``seconds`` is the time of the method itself on top of the trained model
(for ``baseline``: the training; for a composition: both parts).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._data import as_data
from ._persistence import to_jsonable
from .baselines import (
    ClassBiasTuning,
    LastLayerRetraining,
    LogitAdjustment,
    TauNormalization,
)
from .controls import BulkDirections, RandomDirections
from .datasets import load_long_tailed
from .metrics import summarize as summarize_logits
from .models import make_model, train_model
from .surgeon import SpectralSurgeon
from .training import class_balanced_finetune, focal_finetune

__all__ = [
    "METHODS",
    "POST_HOC",
    "BenchSettings",
    "default_settings",
    "run_benchmark",
    "summarize",
    "format_table",
    "add_bench_parser",
    "train_reference_model",
    "curvature_sample",
    "evaluate_model",
    "git_commit",
]

METHODS: tuple[str, ...] = (
    "baseline",
    "logit_adjustment",
    "tau_normalization",
    "class_bias",
    "last_layer_retraining",
    "spectral_surgery",
    "spectral_surgery+logit_adjustment",
    "logit_adjustment+spectral_surgery",
    "last_layer_retraining+spectral_surgery",
    "focal_finetune",
    "class_balanced_finetune",
    "class_balanced_finetune+spectral_surgery",
    "random_directions",
    "bulk_directions",
)

#: Whether a method leaves the training untouched (only validation data and the model).
POST_HOC: dict[str, bool] = {m: "finetune" not in m for m in METHODS}

#: The metrics every row carries (held-out test split).
METRICS = ("accuracy", "balanced_accuracy", "class_std", "worst_class_accuracy", "nll")


@dataclass
class BenchSettings:
    """Everything a benchmark run is configured by (stored in the JSON).

    Attributes
    ----------
    model : str
        A :func:`~hessrebal.models.make_model` name.
    hidden : tuple of int
        Hidden widths for ``model="mlp"``.
    train_steps : int
        Optimiser steps of the training from scratch (epochs are
        ``max(min_epochs, ceil(train_steps / batches per epoch))``), so small
        long-tailed splits are trained as long as large ones.
    epochs : int or None
        Fixed number of epochs instead of ``train_steps``.
    min_epochs : int
    lr, optimizer, weight_decay, batch_size
        Training settings (see :func:`~hessrebal.models.train_model`).
    finetune_steps : int
        Optimiser steps of each fine-tune (``finetune_epochs`` overrides).
    finetune_epochs : int or None
    finetune_lrs : tuple of float
        Learning rates tried for each fine-tune; the one with the best
        validation balanced accuracy is kept.
    curvature_samples : int
        Training samples (uniform, seeded) on which the surgeon's Hessian is
        taken; the class-balanced fine-tune gets a class-stratified sample,
        as in the paper.
    surgeon : dict
        Keyword arguments for every :class:`~hessrebal.SpectralSurgeon`
        (``random_state`` is the seed).
    device : str or None
    batch_size_eval : int
    """

    model: str = "mlp"
    hidden: tuple[int, ...] = (128, 64)
    train_steps: int = 500
    epochs: int | None = None
    min_epochs: int = 5
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 1e-4
    batch_size: int = 128
    finetune_steps: int = 150
    finetune_epochs: int | None = None
    finetune_lrs: tuple[float, ...] = (1e-4, 1e-3)
    curvature_samples: int = 2048
    surgeon: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    batch_size_eval: int = 512


def default_settings(dataset: str, quick: bool = False) -> BenchSettings:
    """The settings used for ``dataset`` (and by ``--quick``).

    Digit sets: an MLP (inputs-128-64-C) trained for 500 Adam steps.
    ``cifar10-lt``: ResNet-32, 200 epochs of SGD (lr 0.1, weight decay 2e-4),
    Hessian on 256 training images. ``isic2019``: torchvision's ResNet-18
    with a 3×3 stem on 64×64 images, 30 epochs of Adam, Hessian on 256
    images. ``quick`` trains the digit MLP for 300 steps.
    """
    key = dataset.lower().replace("_", "-")
    if key.startswith("cifar"):
        return BenchSettings(model="resnet32", hidden=(), train_steps=0, epochs=200, lr=0.1,
                             optimizer="sgd", weight_decay=2e-4, batch_size=128,
                             finetune_epochs=10, finetune_lrs=(1e-3, 1e-2),
                             curvature_samples=256, batch_size_eval=256)
    if key.startswith("isic"):
        return BenchSettings(model="resnet18_cifar", hidden=(), train_steps=0, epochs=30,
                             lr=1e-3, optimizer="adam", weight_decay=1e-4, batch_size=64,
                             finetune_epochs=5, finetune_lrs=(1e-5, 1e-4),
                             curvature_samples=256, batch_size_eval=128)
    settings = BenchSettings()
    if quick:
        settings = replace(settings, train_steps=300, finetune_steps=100)
    return settings


# ----------------------------------------------------------------------------- helpers


def _epochs(n_samples: int, batch_size: int, steps: int, epochs: int | None,
            minimum: int) -> int:
    if epochs is not None:
        return int(epochs)
    batches = max(1, math.ceil(n_samples / batch_size))
    return max(minimum, math.ceil(steps / batches))


def _build_model(settings: BenchSettings, splits: Any, seed: int) -> torch.nn.Module:
    C = splits.n_classes
    name = settings.model.lower()
    if name == "mlp":
        kwargs: dict[str, Any] = {"in_features": int(np.prod(splits.input_shape)),
                                  "hidden": tuple(settings.hidden), "n_classes": C}
    elif name in ("cnn", "small_cnn", "smallcnn"):
        shape = splits.input_shape
        kwargs = {"in_channels": int(shape[0]), "image_size": int(shape[-1]), "n_classes": C}
    else:
        shape = splits.input_shape or (3,)
        kwargs = {"n_classes": C, "in_channels": int(shape[0])}
    model = make_model(settings.model, random_state=seed, **kwargs)
    if settings.device is not None:
        model = model.to(settings.device)
    return model


def _logits(model: torch.nn.Module, X: Any, y: Any, batch_size: int) -> tuple[torch.Tensor,
                                                                              torch.Tensor]:
    data = as_data(X, y)
    p = next(model.parameters())
    outs, ys = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for xb, yb in data.chunks(batch_size, p.device, p.dtype):
                out = model(xb)
                outs.append((out.logits if hasattr(out, "logits") else out).cpu())
                ys.append(yb.cpu())
    finally:
        model.train(was_training)
    return torch.cat(outs), torch.cat(ys)


def evaluate_model(model: torch.nn.Module, X: Any, y: Any = None, n_classes: int | None = None,
                   batch_size: int = 512) -> dict[str, Any]:
    """Accuracy, balanced accuracy, σ, worst class, NLL and per-class accuracy of
    ``model`` on ``(X, y)`` (a tensor pair or a Dataset), in eval mode, chunked.
    See :func:`hessrebal.metrics.summarize`."""
    z, labels = _logits(model, X, y, batch_size)
    return summarize_logits(labels, z, n_classes)


def train_reference_model(splits: Any, seed: int,
                          settings: BenchSettings | None = None) -> tuple[torch.nn.Module,
                                                                          dict[str, Any]]:
    """Train the benchmark's model for ``splits`` from scratch, seeded.

    Parameters
    ----------
    splits : LongTailedSplits
    seed : int
        Seeds the initialisation and the training order.
    settings : BenchSettings, optional
        Default: ``default_settings(splits.name)``.

    Returns
    -------
    model : nn.Module
        Trained, in eval mode.
    details : dict
        ``epochs`` and ``train_size``.
    """
    s = settings if settings is not None else default_settings(splits.name)
    X, y = splits.data("train")
    n = len(splits.labels("train"))
    epochs = _epochs(n, s.batch_size, s.train_steps, s.epochs, s.min_epochs)
    model = _build_model(s, splits, seed)
    train_model(model, X, y, epochs=epochs, lr=s.lr, batch_size=s.batch_size,
                weight_decay=s.weight_decay, optimizer=s.optimizer, random_state=seed,
                device=s.device)
    return model, {"epochs": epochs, "train_size": n}


def curvature_sample(splits: Any, n: int, seed: int, stratified: bool = False) -> Any:
    """A seeded sample of at most ``n`` training samples where the Hessian is taken.

    Uniform (the training distribution, for a cross-entropy model) or, with
    ``stratified``, up to ``n // C`` per class (for a class-balanced model,
    as in the paper). Returns ``(X, y)`` tensors, or a ``Subset`` for
    Dataset splits.
    """
    labels = splits.labels("train").numpy()
    rng = np.random.default_rng(seed + 7919)
    if stratified:
        C = splits.n_classes
        per = max(1, n // C)
        idx = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per]
                              for c in range(C)])
    else:
        idx = rng.permutation(labels.size)[:n]
    idx = np.sort(idx)
    X, y = splits.data("train")
    if y is not None:
        return (X[idx], y[idx])
    return torch.utils.data.Subset(X, idx.tolist())


def validation_subset(splits: Any, n_per_class: int | None) -> tuple[Any, Any]:
    """The first ``n_per_class`` validation samples of each class (all for None).

    The validation split is already shuffled per class, so these are nested
    random subsets: the 10 per class are among the 20, and the training and
    test splits stay the same. Returns ``(X, y)`` tensors, or ``(Subset,
    None)`` for Dataset splits.
    """
    X, y = splits.data("val")
    if n_per_class is None:
        return X, y
    if isinstance(n_per_class, bool) or int(n_per_class) < 1:
        raise ValueError(f"validation sizes must be positive integers; got {n_per_class!r}.")
    labels = splits.labels("val").numpy()
    idx = np.sort(np.concatenate([np.flatnonzero(labels == c)[:int(n_per_class)]
                                  for c in range(splits.n_classes)]))
    if y is not None:
        return X[idx], y[idx]
    return torch.utils.data.Subset(X, idx.tolist()), None


def _surgery_details(s: SpectralSurgeon) -> dict[str, Any]:
    return {
        "n_components": int(s.n_components_),
        "eigenvalues": [float(v) for v in s.eigenvalues_],
        "initial_budget": float(s.initial_budget_),
        "n_hvp": int(s.n_hvp_),
        "steps_accepted": int(sum(bool(h["accepted"]) for h in s.history_)),
        "steps": len(s.history_),
        "predicted_loss_increase": float(s.predicted_loss_increase_),
        "perturbation_norm": float(torch.linalg.vector_norm(s.perturbation_)),
        "val_class_std_before": float(np.nanstd(s.per_class_accuracy_before_)),
        "val_class_std_after": float(np.nanstd(s.per_class_accuracy_after_)),
    }


def json_safe(value: Any) -> Any:
    """Result rows as JSON: NaN/inf become null (see ``to_jsonable``)."""
    return to_jsonable(value, non_finite="null")


def _version() -> str:
    from . import __version__

    return __version__


def git_commit() -> str | None:
    """The commit of the hessrebal checkout, when it is one (for provenance).

    The full hash, with ``+dirty`` appended when ``git status`` reports
    changes under ``hessrebal/``; None outside a git checkout or without git.
    The benchmark scripts record it in every result file.
    """
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."],
                               cwd=Path(__file__).resolve().parent, capture_output=True,
                               text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("+dirty" if dirty else "")


_git_commit = git_commit  # the former private name, kept for existing callers


def _write_json(path: Path, result: dict[str, Any]) -> None:
    from ._persistence import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    # Serialise first, then the shared atomic writer (unique temp name, fsync,
    # os.replace, cleanup on error): a crash keeps the previous results file.
    text = json.dumps(json_safe(result), indent=1, allow_nan=False) + "\n"
    write_text_atomic(path, text)


# ----------------------------------------------------------------------------- one seed


class _SeedRun:
    """All methods on one seed's checkpoint, sharing what they can (the
    surgery's budget for the controls, the LA and fine-tuned models for the
    compositions)."""

    def __init__(self, splits: Any, seed: int, settings: BenchSettings,
                 log: Callable[[str], None], val_per_class: int | None = None,
                 baseline: tuple[Any, float, dict[str, Any]] | None = None) -> None:
        self.splits = splits
        self.seed = seed
        self.settings = settings
        self.log = log
        self.C = splits.n_classes
        self.X_val, self.y_val = validation_subset(splits, val_per_class)
        self.curvature = curvature_sample(splits, settings.curvature_samples, seed, False)
        self.cache: dict[str, tuple[Any, float, dict[str, Any]]] = {}
        if baseline is not None:
            # One checkpoint per seed, shared by every validation size (paired).
            self.cache["baseline"] = baseline

    # each producer returns (model, seconds, details)
    def get(self, method: str) -> tuple[Any, float, dict[str, Any]]:
        if method not in self.cache:
            self.cache[method] = getattr(self, "_" + method.replace("+", "__"))()
        return self.cache[method]

    def _surgeon(self, **extra: Any) -> SpectralSurgeon:
        kwargs = dict(self.settings.surgeon)
        kwargs.update(extra)
        kwargs.setdefault("random_state", self.seed)
        kwargs.setdefault("batch_size", self.settings.batch_size_eval)
        return SpectralSurgeon(**kwargs)

    def _surgery_on(self, model: Any, curvature: Any = None,
                    **extra: Any) -> tuple[Any, float, dict[str, Any]]:
        t0 = time.perf_counter()
        s = self._surgeon(**extra).fit(model, self.X_val, self.y_val,
                                       curvature_data=self.curvature if curvature is None
                                       else curvature)
        out = s.transform(model)
        return out, time.perf_counter() - t0, _surgery_details(s) | {"_surgeon": s}

    def _baseline(self):
        t0 = time.perf_counter()
        model, details = train_reference_model(self.splits, self.seed, self.settings)
        return model, time.perf_counter() - t0, details

    def _posthoc(self, estimator: Any, model: Any, keys: Sequence[str]):
        t0 = time.perf_counter()
        out = estimator.fit_transform(model, self.X_val, self.y_val)
        details = {k: json_safe(getattr(estimator, k)) for k in keys}
        return out, time.perf_counter() - t0, details

    @property
    def prior(self) -> np.ndarray:
        # A class with no training sample (possible in tiny ISIC folders)
        # counts as one, so log π stays finite.
        counts = np.maximum(np.asarray(self.splits.class_counts, dtype=np.float64), 1.0)
        return counts / counts.sum()

    def _logit_adjustment(self):
        model = self.get("baseline")[0]
        return self._posthoc(LogitAdjustment(class_prior=self.prior), model, ("tau_",))

    def _tau_normalization(self):
        return self._posthoc(TauNormalization(), self.get("baseline")[0], ("tau_", "layer_"))

    def _class_bias(self):
        return self._posthoc(ClassBiasTuning(), self.get("baseline")[0], ("bias_", "n_iter_"))

    def _last_layer_retraining(self):
        return self._posthoc(LastLayerRetraining(random_state=self.seed),
                             self.get("baseline")[0], ("C_",))

    def _spectral_surgery(self):
        return self._surgery_on(self.get("baseline")[0])

    def _spectral_surgery__logit_adjustment(self):
        model, sec, det = self.get("spectral_surgery")
        out, sec2, det2 = self._posthoc(LogitAdjustment(class_prior=self.prior), model,
                                        ("tau_",))
        return out, sec + sec2, {"surgery": _public(det), "logit_adjustment": det2}

    def _logit_adjustment__spectral_surgery(self):
        model, sec, det = self.get("logit_adjustment")
        out, sec2, det2 = self._surgery_on(model)
        return out, sec + sec2, {"logit_adjustment": det, **det2}

    def _last_layer_retraining__spectral_surgery(self):
        model, sec, det = self.get("last_layer_retraining")
        out, sec2, det2 = self._surgery_on(model)
        return out, sec + sec2, {"last_layer_retraining": det, **det2}

    def _finetune(self, fn: Callable[..., Any], **kwargs: Any):
        s = self.settings
        X, y = self.splits.data("train")
        n = len(self.splits.labels("train"))
        epochs = _epochs(n, s.batch_size, s.finetune_steps, s.finetune_epochs, 1)
        base = self.get("baseline")[0]
        t0 = time.perf_counter()
        best, best_score, best_lr, scores = None, -np.inf, None, {}
        for lr in s.finetune_lrs:
            tuned = fn(base, X, y, epochs=epochs, lr=lr, batch_size=s.batch_size,
                       optimizer=s.optimizer, random_state=self.seed, device=s.device,
                       **kwargs)
            score = evaluate_model(tuned, self.X_val, self.y_val, self.C,
                             s.batch_size_eval)["balanced_accuracy"]
            scores[str(lr)] = score
            if score > best_score:
                best, best_score, best_lr = tuned, score, lr
        return best, time.perf_counter() - t0, {"lr": best_lr, "epochs": epochs,
                                                "val_balanced_accuracy": scores}

    def _focal_finetune(self):
        return self._finetune(focal_finetune, gamma=2.0)

    def _class_balanced_finetune(self):
        return self._finetune(class_balanced_finetune, beta=0.999,
                              class_counts=self.splits.class_counts)

    def _class_balanced_finetune__spectral_surgery(self):
        model, sec, det = self.get("class_balanced_finetune")
        curvature = curvature_sample(self.splits, self.settings.curvature_samples, self.seed,
                                    True)
        out, sec2, det2 = self._surgery_on(model, curvature=curvature)
        return out, sec + sec2, {"class_balanced_finetune": det, **det2}

    def _control(self, backend: Any):
        spikes = self.get("spectral_surgery")[2]["_surgeon"]
        return self._surgery_on(self.get("baseline")[0], spectrum=backend,
                                budget=spikes.initial_budget_,
                                n_components=spikes.n_components_)

    def _random_directions(self):
        return self._control(RandomDirections())

    def _bulk_directions(self):
        return self._control(BulkDirections())


def _public(details: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in details.items() if not k.startswith("_")}


# ----------------------------------------------------------------------------- runner


def _run_method(run: _SeedRun, method: str, row: dict[str, Any], X_test: Any, y_test: Any,
                cfg: BenchSettings, raise_errors: bool,
                log: Callable[[str], None]) -> dict[str, Any]:
    """One method on one seed's run, measured on the test split (a failure is a row)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, seconds, details = run.get(method)
            metrics = evaluate_model(model, X_test, y_test, run.C, cfg.batch_size_eval)
        row.update({k: metrics[k] for k in METRICS})
        row.update(worst_class=metrics["worst_class"],
                   per_class_accuracy=metrics["per_class_accuracy"],
                   seconds=float(seconds), details=_public(details), error=None)
        log(f"{row['dataset']} r={row['imbalance_ratio']:g} seed {row['seed']} "
            f"val {row['val_per_class']} {method:<42} "
            f"bal.acc {metrics['balanced_accuracy']:.4f} σ {metrics['class_std']:.4f} "
            f"({seconds:.1f} s)")
    except Exception as exc:  # noqa: BLE001 - one failing method must not end a long run
        if raise_errors:
            raise
        row.update({k: None for k in METRICS})
        row.update(worst_class=None, per_class_accuracy=None, seconds=None,
                   details={"traceback": traceback.format_exc(limit=5)},
                   error=f"{type(exc).__name__}: {exc}")
        log(f"{row['dataset']} seed {row['seed']} val {row['val_per_class']} {method}: "
            f"FAILED {row['error']}")
    return row


def run_benchmark(
    dataset: str,
    seeds: int | Sequence[int] = 5,
    *,
    imbalance_ratio: float | None = None,
    methods: Sequence[str] | None = None,
    root: str | os.PathLike | None = None,
    quick: bool = False,
    settings: BenchSettings | dict[str, Any] | None = None,
    output: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
    raise_errors: bool = False,
    dataset_kwargs: dict[str, Any] | None = None,
    validation_sizes: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Run every method on every seed and measure on the held-out test split.

    Parameters
    ----------
    dataset : str
        A :func:`~hessrebal.datasets.load_long_tailed` name.
    seeds : int or sequence of int, default=5
        ``n`` means seeds ``0 … n−1``. Each seed draws its own splits (and
        tail classes), model initialisation, training order and surgery
        start vectors.
    imbalance_ratio : float, optional
        Passed to ``load_long_tailed`` (None: the dataset's default).
    methods : sequence of str, optional
        A subset of ``METHODS`` (default all). Methods another one needs
        (the surgery for the controls' budget) are computed but not
        reported.
    root : path, optional
        Data directory for ``cifar10-lt`` and ``isic2019``.
    quick : bool, default=False
        Shorter training (see :func:`default_settings`).
    settings : BenchSettings or dict, optional
        The settings, or overrides of :func:`default_settings`.
    output : path, optional
        Write the result JSON here after every seed (so a long run leaves
        its finished seeds behind).
    log : callable, optional
        Receives one progress line per method and seed.
    raise_errors : bool, default=False
        Re-raise a failing method; by default its row records the error and
        its metrics are null.
    dataset_kwargs : dict, optional
        Extra keyword arguments for ``load_long_tailed`` (e.g.
        ``val_per_class``, ``image_size``, ``verify_checksums``).
    validation_sizes : sequence of int, optional
        Run every method with each of these numbers of validation samples
        per class (nested subsets of the validation split, see
        :func:`validation_subset`), all on the same trained checkpoint of
        the seed. Default: the whole validation split.

    Returns
    -------
    dict
        ``{"rows": [...], "settings": {...}}``; each row has ``method``,
        ``seed``, ``dataset``, ``model``, ``imbalance_ratio``,
        ``val_per_class`` (the largest validation class count used),
        ``post_hoc``, the
        held-out ``accuracy``, ``balanced_accuracy``, ``class_std``,
        ``worst_class_accuracy``, ``worst_class``, ``nll``,
        ``per_class_accuracy``, ``seconds``, ``details`` and ``error``.

    Examples
    --------
    >>> result = run_benchmark("digits-lt", seeds=1, methods=["baseline"],
    ...                        settings={"train_steps": 20, "hidden": (8,)})
    >>> [r["method"] for r in result["rows"]]
    ['baseline']
    """
    if not isinstance(dataset, str):
        raise TypeError(f"dataset must be a string; got {type(dataset).__name__}.")
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"seeds must be a positive int or a list of ints; got {seeds}.")
        seed_list = list(range(int(seeds)))
    else:
        try:
            seed_list = [int(s) for s in seeds]  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise TypeError(f"seeds must be an int or a sequence of ints; got {seeds!r}.") \
                from None
        if not seed_list:
            raise ValueError("seeds is empty.")
    wanted = list(METHODS) if methods is None else list(methods)
    unknown = [m for m in wanted if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}.")
    if not wanted:
        raise ValueError("methods is empty.")
    base = default_settings(dataset, quick)
    if settings is None:
        cfg = base
    elif isinstance(settings, BenchSettings):
        cfg = settings
    elif isinstance(settings, dict):
        bad = [k for k in settings if k not in BenchSettings.__dataclass_fields__]
        if bad:
            raise ValueError(f"unknown setting(s) {bad}; see BenchSettings.")
        cfg = replace(base, **settings)
    else:
        raise TypeError("settings must be a BenchSettings, a dict or None.")
    log = log if log is not None else (lambda _msg: None)
    out_path = Path(output) if output is not None else None

    started = time.time()
    result: dict[str, Any] = {"rows": [], "settings": {
        "dataset": dataset, "imbalance_ratio": imbalance_ratio, "seeds": seed_list,
        "methods": wanted, "quick": bool(quick), "root": None if root is None else str(root),
        "validation_sizes": None if validation_sizes is None else [int(n) for n in
                                                                   validation_sizes],
        "dataset_kwargs": dict(dataset_kwargs or {}),
        "bench": asdict(cfg), "split": "test (held out; all tuning on validation)",
        "hessrebal": _version(), "git_commit": _git_commit(),
        "torch": torch.__version__, "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
    }}
    for seed in seed_list:
        splits = load_long_tailed(dataset, imbalance_ratio=imbalance_ratio, random_state=seed,
                                  root=root, **(dataset_kwargs or {}))
        if result["settings"]["imbalance_ratio"] is None:
            result["settings"]["imbalance_ratio"] = float(splits.imbalance_ratio)
        X_test, y_test = splits.data("test")
        shared = None
        for size in (validation_sizes or [None]):
            run = _SeedRun(splits, seed, cfg, log, size, shared)
            n_val = int(np.bincount(as_data(run.X_val, run.y_val).labels().numpy()).max())
            for method in wanted:
                row: dict[str, Any] = {
                    "method": method, "seed": seed, "dataset": splits.name,
                    "model": cfg.model, "imbalance_ratio": float(splits.imbalance_ratio),
                    "val_per_class": n_val, "post_hoc": POST_HOC[method],
                }
                result["rows"].append(_run_method(run, method, row, X_test, y_test, cfg,
                                                  raise_errors, log))
            shared = run.cache.get("baseline")
        result["settings"]["class_counts_seed_" + str(seed)] = splits.class_counts.tolist()
        result["settings"]["seconds"] = time.time() - started
        if out_path is not None:
            _write_json(out_path, result)
    result["settings"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    result = json_safe(result)
    if out_path is not None:
        _write_json(out_path, result)
    return result


# ----------------------------------------------------------------------------- summary


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else math.nan


def summarize(results: dict[str, Any] | Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds per (dataset, imbalance ratio, method).

    Parameters
    ----------
    results : dict or sequence
        One ``run_benchmark`` result (``{"rows": …}``), a list of them, or a
        list of rows.

    Returns
    -------
    list of dict
        One entry per group (dataset, model, imbalance ratio, validation
        size), in ``METHODS`` order within a group: ``dataset``, ``model``,
        ``imbalance_ratio``, ``val_per_class``, ``method``, ``post_hoc``,
        ``n_seeds`` (rows without error), ``n_failed``, and for each of
        ``accuracy``, ``balanced_accuracy``, ``class_std``,
        ``worst_class_accuracy``, ``nll``, ``seconds`` and the paired
        differences to the same seed's baseline ``delta_class_std``,
        ``delta_balanced_accuracy`` and ``delta_worst_class_accuracy``:
        ``<name>_mean`` and ``<name>_std`` (sample standard deviation,
        ``ddof=1``; NaN for one seed).

    Examples
    --------
    >>> rows = [{"dataset": "d", "imbalance_ratio": 1.0, "method": "baseline", "seed": s,
    ...          "class_std": v, "balanced_accuracy": 0.5} for s, v in enumerate([0.1, 0.3])]
    >>> out = summarize(rows)[0]
    >>> round(out["class_std_mean"], 3), round(out["class_std_std"], 4)
    (0.2, 0.1414)
    """
    rows = _rows_of(results)
    baseline: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        if r.get("method") == "baseline" and not r.get("error"):
            baseline[_cell(r) + (r["seed"],)] = r
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_cell(r) + (r["method"],), []).append(r)
    order = {m: i for i, m in enumerate(METHODS)}
    out = []
    for key in sorted(groups, key=lambda g: (g[0], str(g[1]), g[2], g[3] or 0,
                                             order.get(g[4], 99), g[4])):
        dataset, model, ratio, n_val, method = key
        rs = groups[key]
        ok = [r for r in rs if not r.get("error")]
        entry: dict[str, Any] = {"dataset": dataset, "model": model, "imbalance_ratio": ratio,
                                 "val_per_class": n_val, "method": method,
                                 "post_hoc": POST_HOC.get(method), "n_seeds": len(ok),
                                 "n_failed": len(rs) - len(ok),
                                 "seeds": sorted(r["seed"] for r in ok)}
        for name in (*METRICS, "seconds"):
            entry[f"{name}_mean"], entry[f"{name}_std"] = _mean_std([r.get(name) for r in ok])
        for name in ("class_std", "balanced_accuracy", "worst_class_accuracy"):
            diffs = []
            for r in ok:
                b = baseline.get(key[:4] + (r["seed"],))
                if b is not None and r.get(name) is not None and b.get(name) is not None:
                    diffs.append(r[name] - b[name])
            entry[f"delta_{name}_mean"], entry[f"delta_{name}_std"] = _mean_std(diffs)
        out.append(entry)
    return out


def _cell(row: dict[str, Any]) -> tuple:
    """(dataset, model, imbalance ratio, validation size): rows older than the
    model and validation-size fields have None there."""
    n_val = row.get("val_per_class")
    return (row["dataset"], row.get("model"), float(row["imbalance_ratio"]),
            None if n_val is None else int(n_val))


def _rows_of(results: Any) -> list[dict[str, Any]]:
    if isinstance(results, dict):
        if "rows" not in results:
            raise ValueError("results must have a 'rows' entry (a run_benchmark result).")
        return list(results["rows"])
    rows: list[dict[str, Any]] = []
    for item in results:
        if isinstance(item, dict) and "rows" in item:
            rows.extend(item["rows"])
        elif isinstance(item, dict):
            rows.append(item)
        else:
            raise TypeError("results must be a result dict, a list of them, or a list of rows.")
    return rows


def _pm(mean: float, std: float, scale: float = 100.0, digits: int = 1,
        signed: bool = False) -> str:
    if mean is None or not math.isfinite(mean):
        return "–"
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    text = fmt.format(mean * scale)
    if std is not None and math.isfinite(std):
        text += f" ± {std * scale:.{digits}f}"
    return text


_LABELS = {
    "baseline": "Baseline (cross-entropy)",
    "logit_adjustment": "Logit adjustment",
    "tau_normalization": "τ-normalisation",
    "class_bias": "Class-bias tuning",
    "last_layer_retraining": "Last-layer retraining",
    "spectral_surgery": "**Spectral Surgery**",
    "spectral_surgery+logit_adjustment": "Surgery → logit adjustment",
    "logit_adjustment+spectral_surgery": "Logit adjustment → surgery",
    "last_layer_retraining+spectral_surgery": "Last-layer retraining → surgery",
    "focal_finetune": "Focal fine-tune (γ = 2)",
    "class_balanced_finetune": "Class-balanced fine-tune",
    "class_balanced_finetune+spectral_surgery": "Class-balanced fine-tune → surgery",
    "random_directions": "Control: random directions",
    "bulk_directions": "Control: bulk directions",
}


def format_table(summary: Sequence[dict[str, Any]], *, seconds: bool = True,
                 title: bool = True) -> str:
    """Markdown tables (one per dataset and imbalance ratio) of a :func:`summarize` output.

    Columns follow the paper's comparison table: post-hoc or not, global
    accuracy, balanced accuracy, σ (std of per-class accuracy), Δσ against
    the same seed's baseline, worst-class accuracy, NLL and seconds; all
    accuracies in percent, mean ± std over seeds.
    """
    blocks: dict[tuple, list[dict[str, Any]]] = {}
    for e in summary:
        blocks.setdefault((e["dataset"], e.get("model"), e["imbalance_ratio"],
                           e.get("val_per_class")), []).append(e)
    parts = []
    for (dataset, model, ratio, n_val), entries in blocks.items():
        n = sorted({e["n_seeds"] for e in entries})
        lines = []
        if title:
            seeds_txt = f"{n[0]} seeds" if len(n) == 1 else f"{n[0]}–{n[-1]} seeds"
            what = f"**{dataset}, imbalance ratio {ratio:g}"
            what += "" if n_val is None else f", {n_val} validation images per class"
            what += "" if model is None else f", {model.upper() if model == 'mlp' else model}"
            lines.append(f"{what}** ({seeds_txt}, held-out test split, mean ± std)\n")
        header = ["Method", "Post-hoc", "Accuracy", "Balanced acc.", "σ", "Δσ", "Worst class",
                  "NLL"]
        if seconds:
            header.append("Seconds")
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        for e in entries:
            label = _LABELS.get(e["method"], e["method"])
            if e.get("n_failed"):
                label += f" ({e['n_failed']} failed)"
            cells = [
                label,
                "–" if e["method"] == "baseline" else ("yes" if e.get("post_hoc") else "no"),
                _pm(e["accuracy_mean"], e["accuracy_std"]),
                _pm(e["balanced_accuracy_mean"], e["balanced_accuracy_std"]),
                _pm(e["class_std_mean"], e["class_std_std"]),
                "–" if e["method"] == "baseline" else
                _pm(e["delta_class_std_mean"], e["delta_class_std_std"], signed=True),
                _pm(e["worst_class_accuracy_mean"], e["worst_class_accuracy_std"]),
                _pm(e["nll_mean"], e["nll_std"], scale=1.0, digits=3),
            ]
            if seconds:
                cells.append(_pm(e["seconds_mean"], None, scale=1.0, digits=1))
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- CLI


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "bench", help="every method on every seed, measured on a held-out split",
        description="Train a model from scratch per seed, apply every method (post-hoc "
                    "baselines, Spectral Surgery and its compositions, training-time "
                    "fine-tunes, random/bulk-direction controls), measure each on the "
                    "held-out test split and write one JSON row per method and seed.")
    p.add_argument("--dataset", default=None,
                   help="mnist-lt, mnist, digits-lt, digits, cifar10-lt or isic2019 "
                        "(default digits-lt with --quick)")
    p.add_argument("--seeds", type=int, default=None,
                   help="number of seeds 0..N-1 (default 5; 2 with --quick)")
    p.add_argument("--seed-list", type=int, nargs="+", default=None,
                   help="explicit seeds instead of --seeds")
    p.add_argument("--output", default=None,
                   help="the JSON file to write (default: only print the table)")
    p.add_argument("--quick", action="store_true",
                   help="digits-lt, 2 seeds, shorter training (1-2 minutes on 2 busy cores, "
                        "most of it last-layer retraining's cross-validation)")
    p.add_argument("--imbalance-ratio", type=float, default=None,
                   help="n_head/n_tail of the training split (default: the dataset's)")
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS, metavar="METHOD",
                   help="subset of: " + ", ".join(METHODS))
    p.add_argument("--root", default=None, help="data directory (cifar10-lt, isic2019)")
    p.add_argument("--val-per-class", type=int, default=None,
                   help="validation images per class (digit sets, cifar10-lt)")
    p.add_argument("--validation-sizes", type=int, nargs="+", default=None, metavar="N",
                   help="run every method with N validation images per class for each N "
                        "(nested subsets of the validation split, same checkpoint)")
    p.add_argument("--image-size", type=int, default=None,
                   help="isic2019: images resized to this square size (default 64)")
    p.add_argument("--model", default=None, help="mlp, cnn, resnet32 or resnet18_cifar")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default: a fixed number of steps)")
    p.add_argument("--device", default=None, help="e.g. cuda (default: CPU)")
    p.add_argument("--max-steps", type=int, default=None, help="surgeon max_steps")
    p.add_argument("--refresh-spectrum", type=int, default=None,
                   help="surgeon refresh_spectrum (default 1: every step)")
    p.add_argument("--curvature-samples", type=int, default=None,
                   help="training images the surgeon's Hessian is taken on (default 2048)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default 1 on the CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_bench_command)
    return p


def _command_line(args: argparse.Namespace, dataset: str, seeds: Any) -> str:
    """The command that reproduces this run (defaults written out)."""
    parts = ["hessrebal", "bench", "--dataset", dataset]
    if isinstance(seeds, list):
        parts += ["--seed-list", *map(str, seeds)]
    else:
        parts += ["--seeds", str(seeds)]
    if args.output is not None:
        parts += ["--output", str(args.output)]
    if args.quick:
        parts.append("--quick")
    for flag in ("imbalance_ratio", "root", "val_per_class", "image_size", "model", "epochs",
                 "device", "max_steps", "threads", "curvature_samples", "refresh_spectrum"):
        value = getattr(args, flag)
        if value is not None:
            parts += ["--" + flag.replace("_", "-"), f"{value:g}" if isinstance(value, float)
                      else str(value)]
    if args.validation_sizes:
        parts += ["--validation-sizes", *map(str, args.validation_sizes)]
    if args.methods:
        parts += ["--methods", *args.methods]
    return " ".join(parts)


def _bench_command(args: argparse.Namespace) -> int:
    dataset = args.dataset or ("digits-lt" if args.quick else None)
    if dataset is None:
        raise ValueError("--dataset is required (or use --quick).")
    if args.seed_list is not None:
        seeds: Any = args.seed_list
    else:
        seeds = args.seeds if args.seeds is not None else (2 if args.quick else 5)
    threads = args.threads
    if threads is None and (args.device is None or str(args.device).startswith("cpu")):
        # Small models run faster on one thread, the more so on a shared CPU
        # (measured: 5x on 2 busy cores).
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
    overrides: dict[str, Any] = {}
    if args.model is not None:
        overrides["model"] = args.model
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.device is not None:
        overrides["device"] = args.device
    surgeon = {key: getattr(args, key) for key in ("max_steps", "refresh_spectrum")
               if getattr(args, key) is not None}
    if surgeon:
        overrides["surgeon"] = surgeon
    if args.curvature_samples is not None:
        overrides["curvature_samples"] = args.curvature_samples
    if args.model is not None and args.model.lower() != "mlp":
        overrides["hidden"] = ()
    dataset_kwargs: dict[str, Any] = {}
    if args.val_per_class is not None:
        dataset_kwargs["val_per_class"] = args.val_per_class
    if args.image_size is not None:
        dataset_kwargs["image_size"] = args.image_size
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    result = run_benchmark(dataset, seeds, imbalance_ratio=args.imbalance_ratio,
                           methods=args.methods, root=args.root, quick=args.quick,
                           settings=overrides or None, output=args.output, log=log,
                           dataset_kwargs=dataset_kwargs or None,
                           validation_sizes=args.validation_sizes)
    result["settings"]["command"] = _command_line(args, dataset, seeds)
    if args.output is not None:
        _write_json(Path(args.output), result)
    print(format_table(summarize(result)))
    if args.output is not None:
        print(f"\nwrote {args.output}")
    return 0
