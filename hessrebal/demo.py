"""The main job: a long-tailed MNIST model, its surgery, and the comparison."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .baselines import LastLayerRetraining, LogitAdjustment
from .curvature import HessianOperator
from .datasets import load_long_tailed
from .metrics import summarize
from .models import MLP, train_model
from .surgeon import SpectralSurgeon

#: Hidden layer widths of the demo's MLP.
DEMO_HIDDEN = (128, 64)


@dataclass
class DemoResult:
    """Everything the demo measured, on the held-out balanced test split.

    Attributes
    ----------
    before, after, logit_adjustment, last_layer_retraining : dict
        :func:`hessrebal.metrics.summarize` of the trained model, the
        surgically fixed model, the logit-adjusted model and the model with
        its last layer refitted on the validation data, on the test split
        (``per_class_accuracy``, ``balanced_accuracy``, ``class_std``,
        ``worst_class_accuracy``, ``worst_class``, ``accuracy``, ``nll``).
    class_counts : ndarray of shape (C,)
        Training samples per class.
    classes : list of str
    surgeon : SpectralSurgeon
        The fitted surgeon.
    settings : dict
        Dataset, model and surgeon settings.
    timings : dict of str to float
        Seconds spent training, in the surgery, on the spectrum picture (when
        computed), in logit adjustment and in last-layer retraining.
    models : dict
        ``baseline``, ``spectral_surgery``, ``logit_adjustment`` and
        ``last_layer_retraining`` models.
    splits : LongTailedSplits
    spectrum : dict or None
        :func:`hessrebal.plotting.spectrum_summary` of the Hessian the
        surgeon used (top ``2C`` eigenvalues and the SLQ density), when
        ``run_demo(spectrum=True)``.
    """

    before: dict[str, Any]
    after: dict[str, Any]
    logit_adjustment: dict[str, Any]
    last_layer_retraining: dict[str, Any]
    class_counts: np.ndarray
    classes: list[str]
    surgeon: SpectralSurgeon
    settings: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    splits: Any = None
    spectrum: dict[str, Any] | None = None


def _test_metrics(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    with torch.no_grad():
        logits = model.eval()(X)
    return summarize(y, logits)


def run_demo(
    dataset: str = "mnist-lt",
    imbalance_ratio: float = 100.0,
    random_state: int = 0,
    epochs: int = 20,
    progress: bool = False,
    surgeon: SpectralSurgeon | None = None,
    spectrum: bool = False,
) -> DemoResult:
    """Train an MLP on a long-tailed split, run the surgery, compare on held-out data.

    The model is an MLP with hidden layers ``DEMO_HIDDEN`` trained with AdamW
    on the long-tailed training split; the surgeon (default
    ``SpectralSurgeon(random_state=random_state)``) is fitted on the balanced
    validation split, which is also where it takes the Hessian; post-hoc
    logit adjustment (training prior, τ tuned on validation) and last-layer
    retraining on the validation data are the references. Everything is
    measured on the balanced test split, which no step saw.

    Parameters
    ----------
    dataset : str, default="mnist-lt"
        A digit set of :func:`hessrebal.datasets.load_long_tailed`
        (``"mnist-lt"`` or ``"digits-lt"``; no download).
    imbalance_ratio : float, default=100.0
        Head-to-tail ratio of the training split.
    random_state : int, default=0
        Seeds the split, the training and the surgeon.
    epochs : int, default=20
    progress : bool, default=False
        Progress bars (tqdm) for training, the surgery and the spectrum.
    surgeon : SpectralSurgeon, optional
        Used as given (its own ``progress`` setting applies).
    spectrum : bool, default=False
        Also compute the top ``2C`` eigenvalues and the SLQ density of the
        Hessian the surgeon used, for :class:`hessrebal.plotting.SpectrumDisplay`
        (about 150 more Hessian-vector products).

    Returns
    -------
    DemoResult

    Examples
    --------
    >>> from hessrebal import SpectralSurgeon
    >>> from hessrebal.demo import run_demo, format_table
    >>> result = run_demo("digits-lt", epochs=3,
    ...                   surgeon=SpectralSurgeon(max_steps=1))  # doctest: +SKIP
    >>> print(format_table(result))  # doctest: +SKIP
    """
    torch.manual_seed(random_state)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    splits = load_long_tailed(dataset, imbalance_ratio=imbalance_ratio, random_state=random_state)
    in_features = int(np.prod(splits.input_shape))
    model = MLP(in_features=in_features, hidden=DEMO_HIDDEN, n_classes=splits.n_classes)
    train_model(model, splits.X_train, splits.y_train, epochs=epochs, weight_decay=1e-4,
                random_state=random_state, progress=progress)
    timings["train"] = time.perf_counter() - t0

    surgeon = surgeon if surgeon is not None else SpectralSurgeon(
        random_state=random_state, progress=progress)
    t0 = time.perf_counter()
    fixed = surgeon.fit_transform(model, splits.X_val, splits.y_val)
    timings["surgery"] = time.perf_counter() - t0

    summary = None
    if spectrum:
        from .plotting import spectrum_summary

        t0 = time.perf_counter()
        op = HessianOperator(model, splits.X_val, splits.y_val, params=surgeon.params,
                             curvature=surgeon.curvature, batch_size=surgeon.batch_size)
        summary = spectrum_summary(op, min(2 * splits.n_classes, op.shape[0]),
                                   init=surgeon.eigenvectors_, n_probes=3, n_steps=40,
                                   random_state=random_state, progress=progress)
        timings["spectrum"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    prior = splits.class_counts / splits.class_counts.sum()
    adjusted = LogitAdjustment(class_prior=prior).fit_transform(model, splits.X_val, splits.y_val)
    timings["logit_adjustment"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    refitted = LastLayerRetraining(random_state=random_state).fit_transform(
        model, splits.X_val, splits.y_val)
    timings["last_layer_retraining"] = time.perf_counter() - t0

    layers = "-".join(str(n) for n in (in_features, *DEMO_HIDDEN, splits.n_classes))
    return DemoResult(
        before=_test_metrics(model, splits.X_test, splits.y_test),
        after=_test_metrics(fixed, splits.X_test, splits.y_test),
        logit_adjustment=_test_metrics(adjusted, splits.X_test, splits.y_test),
        last_layer_retraining=_test_metrics(refitted, splits.X_test, splits.y_test),
        class_counts=np.asarray(splits.class_counts),
        classes=list(splits.classes),
        surgeon=surgeon,
        settings={"dataset": dataset, "imbalance_ratio": imbalance_ratio,
                  "random_state": random_state, "epochs": epochs, "model": f"MLP({layers})",
                  "n_train": int(splits.y_train.numel()), "n_val": int(splits.y_val.numel()),
                  "n_test": int(splits.y_test.numel()),
                  "surgeon": {k: repr(v) for k, v in surgeon.get_params(deep=False).items()}},
        timings=timings,
        models={"baseline": model, "spectral_surgery": fixed, "logit_adjustment": adjusted,
                "last_layer_retraining": refitted},
        splits=splits,
        spectrum=summary,
    )


_SUMMARY_ROWS = (("balanced_accuracy", "balanced accuracy"), ("class_std", "class std (σ)"),
                 ("worst_class_accuracy", "worst class"), ("accuracy", "accuracy"))


def format_table(result: DemoResult) -> str:
    """The before/after per-class table, classes ordered by training count."""
    order = np.argsort(-result.class_counts, kind="stable")
    columns = (result.before, result.after, result.logit_adjustment,
               result.last_layer_retraining)
    lines = [f"{'class':>17} {'n_train':>8} {'before':>8} {'surgery':>8} {'logit adj':>10} "
             f"{'last layer':>11}"]
    for c in order:
        lines.append(f"{result.classes[c]:>17} {int(result.class_counts[c]):>8} "
                     + " ".join(f"{m['per_class_accuracy'][c]:>{w}.3f}"
                                for m, w in zip(columns, (8, 8, 10, 11))))
    lines.append("-" * 67)
    for key, label in _SUMMARY_ROWS:
        lines.append(f"{label:>17} {'':>8} " + " ".join(
            f"{m[key]:>{w}.3f}" for m, w in zip(columns, (8, 8, 10, 11))))
    return "\n".join(lines)
