"""A scikit-learn classifier over a trained torch model, rebalanced by surgery.

:class:`SurgicalClassifier` lets a :class:`~hessrebal.SpectralSurgeon` sit at
the end of a scikit-learn ``Pipeline`` and be tuned by ``GridSearchCV``:
``fit(X, y)`` runs the surgery with ``(X, y)`` as validation data, and the
prediction methods use the changed model.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from ._data import DEFAULT_BATCH_SIZE, as_data, check_label_range
from ._model import FunctionalModel, predict_logits
from .parameters import ParameterSpace, unwrap_model
from .surgeon import SpectralSurgeon

__all__ = ["SurgicalClassifier"]


class SurgicalClassifier(ClassifierMixin, BaseEstimator):
    """A trained torch classifier whose per-class balance is fixed by ``fit``.

    ``fit(X, y)`` fits a clone of ``surgeon`` on a private copy of ``model``
    with ``(X, y)`` as the validation (sensitivity) data; the prediction
    methods then use the surgically changed copy. The given model is never
    changed. The model itself is not trained: the surgery only moves its
    weights a small distance along the Hessian spikes.

    Parameters
    ----------
    model : nn.Module or skorch net
        The trained classifier with ``C`` outputs. ``clone`` deep-copies it,
        a trained skorch net included (scikit-learn's default would return an
        untrained net); a skorch net contributes its ``module_``.
    surgeon : SpectralSurgeon, optional
        The surgery to run; ``None`` means ``SpectralSurgeon()``. Pass one to
        tune its parameters through nested names (``surgeon__budget``,
        ``surgeon__amplitude__gamma`` with ``amplitude=GammaDecay()``).
    batch_size : int, default=512
        Chunk size of the prediction passes (the surgery uses the surgeon's
        own ``batch_size``).
    device : str or torch.device, optional
        Where the private copy of the model lives and computes; default:
        where ``model`` is.

    Attributes
    ----------
    classes_ : ndarray of shape (C,)
        ``np.arange(C)``: the model's outputs are the classes, so ``y`` must
        hold class indices ``0..C-1`` (encode other labels with a
        ``LabelEncoder`` fitted on the training labels). A class absent from
        ``y`` still has its column in ``predict_proba``.
    surgeon_ : SpectralSurgeon
        The fitted clone of ``surgeon``.
    model_ : nn.Module
        The surgically changed copy of the model.
    n_features_in_ : int
        Number of features, for 2-D inputs.
    feature_names_in_ : ndarray of str
        Column names, when ``X`` was a DataFrame with string column names.

    Notes
    -----
    Inputs: torch tensors of any shape the model takes (kept as they are,
    so integer token ids stay integers), or array-likes of numbers, which are
    validated by scikit-learn and cast to the model's floating dtype (so the
    ``float64`` output of a ``StandardScaler`` feeds a ``float32`` model).

    ``score`` is scikit-learn's accuracy, the convention of classifiers; the
    surgery's own criterion is balanced accuracy: use
    ``scoring="balanced_accuracy"`` in ``GridSearchCV`` or
    ``cross_val_score`` to select by it.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from torch import nn
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.preprocessing import StandardScaler
    >>> from hessrebal import SpectralSurgeon
    >>> from hessrebal.sklearn import SurgicalClassifier
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> X, y = np.random.default_rng(0).normal(size=(90, 4)), np.arange(90) % 3
    >>> pipe = make_pipeline(StandardScaler(), SurgicalClassifier(
    ...     model, SpectralSurgeon(max_steps=2, random_state=0)))
    >>> pipe.fit(X, y).predict_proba(X).shape
    (90, 3)
    """

    def __init__(
        self,
        model: Any,
        surgeon: SpectralSurgeon | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        device: str | torch.device | None = None,
    ) -> None:
        self.model = model
        self.surgeon = surgeon
        self.batch_size = batch_size
        self.device = device

    def fit(self, X: Any, y: Any, **fit_params: Any) -> SurgicalClassifier:
        """Run the surgery with ``(X, y)`` as validation data.

        Parameters
        ----------
        X : array-like or tensor of shape (n_samples, ...)
        y : array-like of shape (n_samples,)
            Class indices ``0..C-1``.
        **fit_params
            Passed to ``SpectralSurgeon.fit`` (e.g. ``curvature_data``).

        Returns
        -------
        self
        """
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) \
                or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {self.batch_size!r}.")
        surgeon = SpectralSurgeon() if self.surgeon is None else self.surgeon
        if not isinstance(surgeon, SpectralSurgeon):
            raise TypeError(f"surgeon must be a SpectralSurgeon; got {type(surgeon).__name__}.")
        surgeon = clone(surgeon)
        module = unwrap_model(self.model)
        working = copy.deepcopy(module)
        if self.device is not None:
            working = working.to(torch.device(self.device))
        X_t, y_t = self._check_X_y(X, y, working)
        space = ParameterSpace(working, surgeon.params)
        fmodel = FunctionalModel(working, space, surgeon.output_to_logits)
        data = as_data(X_t, y_t)  # names "X"/"y" carry into the surgeon's messages
        x0, _ = next(data.chunks(self.batch_size, fmodel.device, fmodel.dtype))
        n_outputs = fmodel.probe(x0, "X")
        check_label_range(data.labels(), n_outputs, "y")
        surgeon.fit(working, data, None, **fit_params)
        self.surgeon_ = surgeon
        self.model_ = surgeon.transform(working, copy=False)
        self.classes_ = np.arange(n_outputs)
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """Logits of the changed model, ``float64`` of shape (n, C).

        With two outputs, the scikit-learn convention: ``logit₁ − logit₀``
        of shape (n,).
        """
        logits = self._logits(X)
        if logits.shape[1] == 2:
            return (logits[:, 1] - logits[:, 0]).numpy()
        return logits.numpy()

    def predict_proba(self, X: Any) -> np.ndarray:
        """Softmax of the changed model's logits, ``float64`` of shape (n, C)."""
        return torch.softmax(self._logits(X), dim=1).numpy()

    def predict(self, X: Any) -> np.ndarray:
        """The class with the largest logit of the changed model."""
        best = self._logits(X).argmax(1).numpy()
        return self.classes_[best]

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """Accuracy of :meth:`predict` (scikit-learn's classifier convention).

        See the Notes of the class for balanced accuracy.
        """
        return super().score(X, y, sample_weight=sample_weight)

    # ----------------------------------------------------------- helpers
    def _logits(self, X: Any) -> torch.Tensor:
        check_is_fitted(self, "model_")
        X_t = self._check_X(X, self.model_, reset=False)
        data = as_data(X_t, torch.zeros(X_t.shape[0], dtype=torch.int64))
        names = set(self.surgeon_.parameter_names_)
        fmodel = FunctionalModel(self.model_, ParameterSpace(self.model_, lambda n, p: n in names),
                                 self.surgeon_.output_to_logits)
        try:
            logits, _ = predict_logits(fmodel, fmodel.initial_theta(), data, self.batch_size)
        except (RuntimeError, IndexError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(f"The model cannot take X of shape {tuple(X_t.shape)}: "
                             f"{first}") from exc
        return logits.to(torch.float64)

    def _check_X(self, X: Any, module: torch.nn.Module, reset: bool) -> torch.Tensor:
        if isinstance(X, torch.Tensor):
            if X.ndim < 2:
                raise ValueError(
                    f"X must have a sample axis and a feature axis; got shape {tuple(X.shape)}.")
            if X.shape[0] == 0:
                raise ValueError("X is empty (0 samples).")
            self._check_n_features(X, reset)
            return X
        X = validate_data(self, X, reset=reset, allow_nd=True,
                          dtype=[np.float64, np.float32], ensure_all_finite=True)
        X_t = torch.from_numpy(np.ascontiguousarray(X))
        dtype = _floating_dtype(module)
        return X_t if dtype is None else X_t.to(dtype)

    def _check_X_y(self, X: Any, y: Any, module: torch.nn.Module):
        if y is None:
            raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y "
                             "is None.")
        y_np = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else y
        y_np = column_or_1d(y_np, warn=True)
        check_classification_targets(y_np)
        if y_np.dtype.kind not in "iu" and not (
                y_np.dtype.kind == "f" and np.all(y_np == np.round(y_np))):
            raise ValueError(
                "y must hold the model's class indices 0..C-1 (its outputs are the classes); "
                f"got labels of dtype {y_np.dtype}. Encode labels with a LabelEncoder fitted "
                "on the training labels.")
        if y_np.size and y_np.min() < 0:
            raise ValueError(f"y contains negative label {y_np.min()}; class indices are 0..C-1.")
        X_t = self._check_X(X, module, reset=True)
        if X_t.shape[0] != y_np.shape[0]:
            raise ValueError(f"X and y have different numbers of samples: {X_t.shape[0]} and "
                             f"{y_np.shape[0]}.")
        return X_t, torch.from_numpy(y_np.astype(np.int64))

    def _check_n_features(self, X: torch.Tensor, reset: bool) -> None:
        n = X.shape[1] if X.ndim == 2 else None
        if reset:
            if n is None:
                self.__dict__.pop("n_features_in_", None)
            else:
                self.n_features_in_ = n
            self.__dict__.pop("feature_names_in_", None)
        elif n is not None and hasattr(self, "n_features_in_") and n != self.n_features_in_:
            raise ValueError(f"X has {n} features, but {type(self).__name__} is expecting "
                             f"{self.n_features_in_} features as input.")

    def __sklearn_clone__(self) -> SurgicalClassifier:
        # A skorch net is itself a scikit-learn estimator, so the default
        # clone() would hand back an *untrained* net (no ``module_``) and every
        # Pipeline or GridSearchCV fit would fail. The trained model is data
        # here: deep-copy it, whatever its type, as is done for an nn.Module.
        params = self.get_params(deep=False)
        model = copy.deepcopy(params.pop("model"))
        return type(self)(model=model, **{k: clone(v, safe=False) for k, v in params.items()})

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # A trained model is not refitted to the data: it scores what it
        # scores, whatever the scikit-learn checks expect of a learner.
        tags.classifier_tags.poor_score = True
        tags.non_deterministic = getattr(self.surgeon, "random_state", None) is None
        return tags


def _floating_dtype(module: torch.nn.Module) -> torch.dtype | None:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None
