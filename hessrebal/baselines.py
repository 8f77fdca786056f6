"""Post-hoc long-tail baselines with the surgeon's ``fit``/``transform`` shape.

Each baseline is tuned on validation data only and returns a model (an
``nn.Module``), so baselines compose with each other and with
:class:`~hessrebal.SpectralSurgeon`::

    la = LogitAdjustment(class_prior=splits.class_prior).fit(model, X_val, y_val)
    fixed = ClassBiasTuning().fit_transform(la.transform(model), X_val, y_val)

- :class:`LogitAdjustment`: logits − τ·log π (Menon et al. 2021).
- :class:`TauNormalization`: final-layer rows divided by ‖w_c‖^τ (Kang et al. 2020).
- :class:`ClassBiasTuning`: one additive offset per class maximising validation
  balanced accuracy (the multiclass threshold tuning scikit-learn lacks).

The model's logits on the validation data are computed once per ``fit`` (in
chunks, in eval mode, through :class:`hessrebal._model.FunctionalModel` so the
model's buffers and flags are never touched); every candidate setting is then
scored on those cached logits. Nothing here changes the model given to
``fit`` or ``transform``.
"""

from __future__ import annotations

import copy
import numbers
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted
from torch import nn

from ._data import as_data, check_label_range
from ._model import (
    default_output_to_logits,
    model_logits,
)
from ._persistence import load_state, save_state
from .metrics import balanced_accuracy, per_class_accuracy
from .parameters import unwrap_model
from .spectrum.base import check_positive

__all__ = [
    "LogitAdjustment",
    "TauNormalization",
    "ClassBiasTuning",
    "LastLayerRetraining",
    "LogitAdjustedModel",
]

_PROB_ATOL = 1e-4


class LogitAdjustedModel(nn.Module):
    """``base(x)`` logits minus a fixed per-class offset vector.

    Parameters
    ----------
    base : nn.Module
        The wrapped model (its output may be a tensor, a tuple, a dict with
        ``"logits"`` or an object with ``.logits``; the wrapper returns a
        tensor).
    offsets : Tensor of shape (C,)
        Subtracted from every row of the logits (a buffer, saved in the
        state dict).
    log_input : bool, default=False
        Take the logarithm of the base outputs first (for a model whose
        outputs are probabilities; log-probabilities are logits).

    Examples
    --------
    >>> import torch
    >>> m = LogitAdjustedModel(torch.nn.Identity(), torch.tensor([1.0, 0.0]))
    >>> m(torch.zeros(1, 2))
    tensor([[-1.,  0.]])
    """

    def __init__(self, base: nn.Module, offsets: torch.Tensor, log_input: bool = False) -> None:
        super().__init__()
        if not isinstance(base, nn.Module):
            raise TypeError(f"base must be an nn.Module; got {type(base).__name__}.")
        offsets = torch.as_tensor(offsets)
        if offsets.ndim != 1:
            raise ValueError(f"offsets must be 1-D; got shape {tuple(offsets.shape)}.")
        self.base = base
        self.register_buffer("offsets", offsets.detach().clone())
        self.log_input = bool(log_input)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Passed on as given: a model of named inputs is called as model(**X).
        z = default_output_to_logits(self.base(*args, **kwargs))
        if z.ndim != 2 or z.shape[1] != self.offsets.shape[0]:
            raise ValueError(
                f"The wrapped model returns outputs of shape {tuple(z.shape)}; the offsets "
                f"were fitted for {self.offsets.shape[0]} classes."
            )
        if self.log_input:
            z = torch.log(z.clamp_min(torch.finfo(z.dtype).tiny))
        return z - self.offsets.to(dtype=z.dtype, device=z.device)

    def extra_repr(self) -> str:
        return f"n_classes={self.offsets.shape[0]}, log_input={self.log_input}"


# --------------------------------------------------------------------------- shared machinery


def _looks_like_probabilities(z: torch.Tensor) -> bool:
    """Rows all non-negative and summing to one: softmax outputs, not logits."""
    if z.numel() == 0 or (z < 0).any():
        return False
    return bool(torch.allclose(z.sum(dim=1), torch.ones(z.shape[0], dtype=z.dtype),
                               atol=_PROB_ATOL, rtol=0))


def _to_log(z: torch.Tensor) -> torch.Tensor:
    return torch.log(z.clamp_min(torch.finfo(z.dtype).tiny))


def _bal_acc_of(z: torch.Tensor, y: torch.Tensor, n_classes: int) -> tuple[float, np.ndarray]:
    pc = per_class_accuracy(y, z.argmax(dim=1), n_classes)
    return balanced_accuracy(pc), pc


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
    return int(batch_size)


def _check_on_probabilities(value: Any) -> str:
    if value not in ("log", "raise"):
        raise ValueError(f"on_probabilities must be 'log' or 'raise'; got {value!r}.")
    return value


class _PostHocBaseline(BaseEstimator):
    """fit/transform/score/save/load shared by the baselines."""

    # Fitted ndarray attributes saved as tensors, and fitted scalars saved as JSON.
    _array_attrs: tuple[str, ...] = ()
    _scalar_attrs: tuple[str, ...] = ()

    def _validation_logits(self, model, X_val, y_val, handle_probabilities: bool):
        unwrap_model(model)
        batch_size = _check_batch_size(self.batch_size)
        data = as_data(X_val, y_val, name="X_val", y_name="y_val")
        z = model_logits(model, data, batch_size, "X_val")
        y = data.labels()
        n_classes = z.shape[1]
        check_label_range(y, n_classes, "y_val")
        log_input = False
        if handle_probabilities and _looks_like_probabilities(z):
            if _check_on_probabilities(self.on_probabilities) == "raise":
                raise ValueError(
                    "The model's outputs are probabilities (non-negative rows summing to 1); "
                    f"{type(self).__name__} works on logits. Remove the final softmax or pass "
                    "on_probabilities='log'."
                )
            warnings.warn(
                f"{type(self).__name__}: the model's outputs are probabilities; using their "
                "logarithm as logits (the returned model applies the same log).",
                UserWarning, stacklevel=3,
            )
            z = _to_log(z)
            log_input = True
        self._warn_absent_classes(y, n_classes, stacklevel=4)
        self.n_classes_ = int(n_classes)
        self.classes_ = np.arange(n_classes)
        return z, y, log_input

    def _warn_absent_classes(self, y: torch.Tensor, n_classes: int, stacklevel: int) -> None:
        counts = torch.bincount(y, minlength=n_classes).numpy()
        absent = np.flatnonzero(counts == 0)
        if absent.size:
            warnings.warn(
                f"{type(self).__name__}: class(es) {absent.tolist()} have no validation "
                "sample; they are left out of the balanced accuracy being tuned.",
                UserWarning, stacklevel=stacklevel,
            )

    def _choose_tau(self, fixed: float | None, grid: np.ndarray, score_of) -> None:
        """Score ``score_of(τ)`` over the grid (or only the fixed τ) and keep the best."""
        taus = np.array([fixed]) if fixed is not None else grid
        scores = np.array([score_of(t) for t in taus])
        self.taus_ = taus
        self.tau_scores_ = scores
        self.tau_ = fixed if fixed is not None else _pick_tau(taus, scores, 1.0)

    def _record_accuracies(self, z_before: torch.Tensor, z_after: torch.Tensor,
                           y: torch.Tensor, n_classes: int) -> None:
        self.balanced_accuracy_before_, self.per_class_accuracy_before_ = _bal_acc_of(
            z_before, y, n_classes)
        self.balanced_accuracy_after_, self.per_class_accuracy_after_ = _bal_acc_of(
            z_after, y, n_classes)

    def _offset_model(self, model: Any, copy: bool) -> LogitAdjustedModel:
        """Wrap ``model`` (or a deep copy) so ``offsets_`` is subtracted from its logits."""
        check_is_fitted(self)
        module = unwrap_model(model)
        base = _deepcopy(module) if copy else module
        return LogitAdjustedModel(base, torch.as_tensor(self.offsets_, dtype=_dtype_of(module)),
                                  log_input=self.log_input_)

    def _layer_target(self, model: Any, copy: bool) -> Any:
        """``model`` (or a deep copy) after checking that its layer ``layer_``
        has the fitted shape: the check the layer-rewriting baselines share."""
        check_is_fitted(self)
        _, lin = _find_linear(unwrap_model(model), self.layer_)
        if lin.in_features != self.in_features_ or lin.out_features != self.n_classes_:
            raise ValueError(
                f"model.{self.layer_} is Linear({lin.in_features}, {lin.out_features}); the "
                f"fitted layer is Linear({self.in_features_}, {self.n_classes_})."
            )
        return _deepcopy(model) if copy else model

    def fit_transform(self, model: Any, X_val: Any, y_val: Any = None,
                      copy: bool = True) -> nn.Module:
        """``fit(model, X_val, y_val).transform(model, copy=copy)``."""
        return self.fit(model, X_val, y_val).transform(model, copy=copy)

    def score(self, model: Any, X: Any, y: Any = None, batch_size: int | None = None) -> float:
        """Balanced accuracy of ``transform(model)`` on ``(X, y)``."""
        check_is_fitted(self)
        transformed = self.transform(model, copy=True)
        data = as_data(X, y)
        bs = _check_batch_size(self.batch_size if batch_size is None else batch_size)
        z = model_logits(transformed, data, bs, "X")
        check_label_range(data.labels(), z.shape[1])
        return _bal_acc_of(z, data.labels(), z.shape[1])[0]

    # -- persistence ------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the settings and fitted state to one safetensors file (no pickle).

        Parameters
        ----------
        path : str or path-like

        Returns
        -------
        pathlib.Path
        """
        check_is_fitted(self)
        tensors = {a: torch.from_numpy(np.asarray(getattr(self, a), dtype=np.float64).copy())
                   for a in self._array_attrs}
        meta = {
            "params": self.get_params(deep=False),
            "fitted": {a: getattr(self, a) for a in self._scalar_attrs},
        }
        return save_state(path, tensors, meta, kind=type(self).__name__)

    @classmethod
    def load(cls, path: str | Path):
        """Read an object written by :meth:`save`.

        Raises
        ------
        ValueError
            For a pickle, a corrupt file, or a file holding another kind of object.
        """
        tensors, meta = load_state(path, expected_kind=cls.__name__)
        try:
            obj = cls(**meta["params"])
            for a in cls._array_attrs:
                setattr(obj, a, tensors[a].numpy().copy())
            for a in cls._scalar_attrs:
                setattr(obj, a, meta["fitted"][a])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path} is missing or has invalid fitted state: {exc}") from exc
        obj.n_classes_ = int(obj.n_classes_)
        obj.classes_ = np.arange(obj.n_classes_)
        return obj


def _check_grid(values: Any, name: str, lower: float | None = None) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must hold finite numbers.")
    if lower is not None and np.any(arr < lower):
        raise ValueError(f"{name} must hold numbers ≥ {lower}; got min {arr.min()}.")
    return arr


def _check_tau(tau: Any, lower: float = 0.0) -> float | None:
    """None for "auto", else the fixed τ."""
    if isinstance(tau, str):
        if tau != "auto":
            raise ValueError(f"tau must be 'auto' or a number ≥ {lower}; got {tau!r}.")
        return None
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not np.isfinite(tau) \
            or tau < lower:
        raise ValueError(f"tau must be 'auto' or a finite number ≥ {lower}; got {tau!r}.")
    return float(tau)


def _pick_tau(taus: np.ndarray, scores: np.ndarray, prefer: float) -> float:
    """The best-scoring τ; among ties, the one closest to ``prefer`` (the
    published default), so a flat validation curve does not pick an extreme."""
    best = scores.max()
    ties = np.flatnonzero(scores >= best - 1e-12)
    return float(taus[ties[np.argmin(np.abs(taus[ties] - prefer))]])


# --------------------------------------------------------------------------- logit adjustment


class LogitAdjustment(_PostHocBaseline):
    """Post-hoc logit adjustment: ``logits − τ·log π`` (Menon et al. 2021).

    Parameters
    ----------
    class_prior : array-like of shape (C,), optional
        The *training* class distribution π, as counts or probabilities
        (normalised here; every entry must be positive). When None it is
        estimated from the model on the validation data: the mean predicted
        softmax probability, averaged over each class's validation samples
        and then over classes (so an imbalanced validation set does not leak
        its own prior into the estimate). A model trained on long-tailed
        data puts more mass on its head classes, which this estimate
        measures; τ then sets how much of it to remove.
    tau : "auto" or float ≥ 0, default="auto"
        "auto" sweeps ``taus`` and keeps the τ with the best balanced
        accuracy on the validation data (ties: the τ closest to 1, the
        published default); a number fixes τ.
    taus : array-like, optional
        The grid for "auto"; default ``0, 0.1, …, 3``.
    on_probabilities : {"log", "raise"}, default="log"
        What to do when the model's outputs are probabilities (every row
        non-negative and summing to 1 within 1e-4): "log" warns and uses
        their logarithm (log-probabilities are valid logits, and the
        returned model applies the same log); "raise" refuses with a
        ValueError. Subtracting τ·log π from probabilities would be wrong.
    batch_size : int, default=512
        Chunk size for the forward passes.

    Attributes
    ----------
    class_prior_ : ndarray of shape (C,)
        The prior used (sums to 1).
    prior_estimated_ : bool
    tau_ : float
    taus_ : ndarray
        The grid searched (``[tau]`` when τ was fixed).
    tau_scores_ : ndarray
        Validation balanced accuracy at each grid point.
    offsets_ : ndarray of shape (C,)
        ``tau_ · log(class_prior_)``, subtracted from the logits.
    log_input_ : bool
        Whether the model's outputs were probabilities (log taken).
    per_class_accuracy_before_, per_class_accuracy_after_ : ndarray of shape (C,)
        On the validation data (NaN for a class with no sample).
    balanced_accuracy_before_, balanced_accuracy_after_ : float
    n_classes_ : int
    classes_ : ndarray

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Linear(2, 2)
    >>> X = torch.randn(40, 2); y = torch.arange(40) % 2
    >>> la = LogitAdjustment(class_prior=[0.9, 0.1]).fit(model, X, y)
    >>> adjusted = la.transform(model)
    >>> adjusted(X).shape
    torch.Size([40, 2])
    """

    _array_attrs = ("class_prior_", "taus_", "tau_scores_", "offsets_",
                    "per_class_accuracy_before_", "per_class_accuracy_after_")
    _scalar_attrs = ("tau_", "prior_estimated_", "log_input_", "n_classes_",
                     "balanced_accuracy_before_", "balanced_accuracy_after_")

    def __init__(self, class_prior: Any = None, tau: float | str = "auto", taus: Any = None,
                 on_probabilities: str = "log", batch_size: int = 512) -> None:
        self.class_prior = class_prior
        self.tau = tau
        self.taus = taus
        self.on_probabilities = on_probabilities
        self.batch_size = batch_size

    def fit(self, model: Any, X_val: Any, y_val: Any = None) -> LogitAdjustment:
        """Choose τ on the validation data.

        Parameters
        ----------
        model : nn.Module or skorch net
            Returns logits (or probabilities, see ``on_probabilities``).
        X_val, y_val
            Validation data: tensors/arrays, or a Dataset/DataLoader with
            ``y_val=None``.

        Returns
        -------
        self
        """
        fixed = _check_tau(self.tau)
        grid = (np.round(np.arange(0.0, 3.0 + 1e-9, 0.1), 10) if self.taus is None
                else _check_grid(self.taus, "taus", lower=0.0))
        _check_on_probabilities(self.on_probabilities)
        prior = None
        if self.class_prior is not None:
            prior = np.asarray(self.class_prior, dtype=np.float64)
            if prior.ndim != 1 or not np.all(np.isfinite(prior)) or np.any(prior <= 0):
                raise ValueError("class_prior must be a 1-D array of positive finite numbers "
                                 "(counts or probabilities).")
        z, y, log_input = self._validation_logits(model, X_val, y_val, True)
        C = z.shape[1]
        if prior is None:
            prior = self._estimate_prior(z, y, C)
            self.prior_estimated_ = True
        else:
            if prior.shape[0] != C:
                raise ValueError(f"class_prior has {prior.shape[0]} entries but the model has "
                                 f"{C} outputs.")
            self.prior_estimated_ = False
        prior = prior / prior.sum()
        log_prior = torch.from_numpy(np.log(prior))
        self._choose_tau(fixed, grid, lambda t: _bal_acc_of(z - t * log_prior, y, C)[0])
        self.class_prior_ = prior
        self.offsets_ = self.tau_ * np.log(prior)
        self.log_input_ = bool(log_input)
        self._record_accuracies(z, z - torch.from_numpy(self.offsets_), y, C)
        return self

    @staticmethod
    def _estimate_prior(z: torch.Tensor, y: torch.Tensor, C: int) -> np.ndarray:
        probs = torch.softmax(z, dim=1)
        means = [probs[y == c].mean(dim=0) for c in range(C) if bool((y == c).any())]
        prior = torch.stack(means).mean(dim=0).numpy()
        # A class the model never predicts would give log 0; floor it.
        return np.maximum(prior, 1e-12)

    def transform(self, model: Any, copy: bool = True) -> LogitAdjustedModel:
        """Wrap ``model`` so its logits are adjusted.

        Parameters
        ----------
        model : nn.Module or skorch net
        copy : bool, default=True
            Wrap a deep copy (True) or the module itself (False; it is still
            not modified).

        Returns
        -------
        LogitAdjustedModel
        """
        return self._offset_model(model, copy)


# --------------------------------------------------------------------------- τ-normalisation


def _dtype_of(module: nn.Module) -> torch.dtype:
    p = next(module.parameters(), None)
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


def _deepcopy(obj: Any) -> Any:
    return copy.deepcopy(obj)


def _find_linear(module: nn.Module, layer: str | None) -> tuple[str, nn.Linear]:
    if layer is None:
        found = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        if not found:
            raise ValueError("The model has no nn.Linear layer; pass layer= the name of the "
                             "final linear layer.")
        return found[-1]
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a module name (str) or None; got {type(layer).__name__}.")
    modules = dict(module.named_modules())
    if layer not in modules:
        names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"layer: the model has no module named {layer!r} (its linear layers: "
                         f"{', '.join(names) or 'none'}).")
    if not isinstance(modules[layer], nn.Linear):
        raise TypeError(f"layer {layer!r} is a {type(modules[layer]).__name__}, not nn.Linear.")
    return layer, modules[layer]


def _layer_inputs(module: nn.Module, lin: nn.Linear, data, batch_size: int,
                  name: str = "X_val"):
    """The model's logits on ``data``, the inputs of its layer ``lin`` (float64,
    CPU) and whether that layer's output *is* the logits (nothing after it), so
    the head can be recomputed from the cached inputs alone."""
    captured_in: list[torch.Tensor] = []
    captured_out: list[torch.Tensor] = []

    def hook(_mod, inputs, output):
        captured_in.append(inputs[0].detach().reshape(-1, lin.in_features).cpu())
        captured_out.append(output.detach().reshape(-1, lin.out_features).cpu())

    handle = lin.register_forward_hook(hook)
    try:
        z = model_logits(module, data, batch_size, name)
    finally:
        handle.remove()
    # The probe call in _model_logits also ran the hook: drop it.
    feats = torch.cat(captured_in[1:]).to(torch.float64) if len(captured_in) > 1 else None
    outs = torch.cat(captured_out[1:]).to(torch.float64) if len(captured_out) > 1 else None
    cached = (feats is not None and feats.shape[0] == z.shape[0] and outs.shape == z.shape
              and torch.allclose(outs, z, rtol=1e-5, atol=1e-6 * (1 + z.abs().max())))
    return z, feats, bool(cached)


def _tau_normalized_weight(weight: torch.Tensor, tau: float) -> torch.Tensor:
    norms = weight.norm(dim=1, keepdim=True)
    # A zero row stays zero instead of becoming NaN.
    scale = torch.where(norms > 0, norms.pow(tau), torch.ones_like(norms))
    return weight / scale


class TauNormalization(_PostHocBaseline):
    """τ-normalised classifier: rows of the final linear layer divided by ‖w_c‖^τ
    (Kang et al. 2020).

    Parameters
    ----------
    tau : "auto" or float ≥ 0, default="auto"
        "auto" sweeps ``taus`` for the best validation balanced accuracy
        (ties: the τ closest to 1).
    taus : array-like, optional
        The grid; default ``0, 0.1, …, 2``.
    layer : str, optional
        Name (as in ``named_modules()``) of the linear layer to normalise;
        default: the last ``nn.Linear`` in ``named_modules()`` order.
    keep_bias : bool, default=False
        The original method drops the bias of the normalised layer; the
        returned model keeps the bias parameter (so parameter names and
        shapes do not change) but sets it to zero. Note that τ = 0 then
        still differs from the original model when the bias was non-zero.
    batch_size : int, default=512

    Attributes
    ----------
    tau_ : float
    layer_ : str
        The layer normalised.
    in_features_, n_classes_ : int
    taus_, tau_scores_ : ndarray
        Grid and validation balanced accuracy.
    used_cached_features_ : bool
        True when the layer's output is the model's output, so τ was tuned on
        the layer's cached inputs (one forward pass); False when something
        follows the layer and each τ needed a forward pass.
    per_class_accuracy_before_, per_class_accuracy_after_ : ndarray
    balanced_accuracy_before_, balanced_accuracy_after_ : float

    Notes
    -----
    ``transform`` recomputes the norms from the model it is given (the
    method is a function of the weights), after checking that its layer has
    the fitted name and shape; applied to the model that was fitted it gives
    ``W / ‖w_c‖^tau_``.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
    ...                             torch.nn.Linear(4, 2))
    >>> X = torch.randn(30, 3); y = torch.arange(30) % 2
    >>> tn = TauNormalization(tau=1.0).fit(model, X, y)
    >>> w = tn.transform(model)[2].weight
    >>> torch.allclose(w.norm(dim=1), torch.ones(2))
    True
    """

    _array_attrs = ("taus_", "tau_scores_", "per_class_accuracy_before_",
                    "per_class_accuracy_after_")
    _scalar_attrs = ("tau_", "layer_", "in_features_", "n_classes_", "used_cached_features_",
                     "balanced_accuracy_before_", "balanced_accuracy_after_")

    def __init__(self, tau: float | str = "auto", taus: Any = None, layer: str | None = None,
                 keep_bias: bool = False, batch_size: int = 512) -> None:
        self.tau = tau
        self.taus = taus
        self.layer = layer
        self.keep_bias = keep_bias
        self.batch_size = batch_size

    def fit(self, model: Any, X_val: Any, y_val: Any = None) -> TauNormalization:
        """Choose τ on the validation data.

        Parameters
        ----------
        model : nn.Module or skorch net
        X_val, y_val
            Validation data.

        Returns
        -------
        self
        """
        fixed = _check_tau(self.tau)
        grid = (np.round(np.linspace(0.0, 2.0, 21), 10) if self.taus is None
                else _check_grid(self.taus, "taus", lower=0.0))
        if not isinstance(self.keep_bias, (bool, np.bool_)):
            raise TypeError(f"keep_bias must be a bool; got {type(self.keep_bias).__name__}.")
        module = unwrap_model(model)
        name, lin = _find_linear(module, self.layer)
        batch_size = _check_batch_size(self.batch_size)
        data = as_data(X_val, y_val, name="X_val", y_name="y_val")

        z, feats, cached = _layer_inputs(module, lin, data, batch_size)
        y = data.labels()
        C = z.shape[1]
        check_label_range(y, C, "y_val")
        self._warn_absent_classes(y, C, stacklevel=3)
        if lin.out_features != C:
            raise ValueError(f"layer {name!r} has {lin.out_features} outputs but the model has "
                             f"{C}; pass layer= the final classification layer.")
        W = lin.weight.detach().cpu().to(torch.float64)
        b = lin.bias.detach().cpu().to(torch.float64) if lin.bias is not None else None
        keep = bool(self.keep_bias) and b is not None

        def logits_for(t: float) -> torch.Tensor:
            if cached:
                out = feats @ _tau_normalized_weight(W, t).T
                return out + b if keep else out
            tmp = self._apply(_deepcopy(module), name, t)
            return model_logits(tmp, data, batch_size, "X_val")

        self._choose_tau(fixed, grid, lambda t: _bal_acc_of(logits_for(t), y, C)[0])
        self.layer_ = name
        self.in_features_ = int(lin.in_features)
        self.n_classes_ = int(C)
        self.classes_ = np.arange(C)
        self.used_cached_features_ = bool(cached)
        self._record_accuracies(z, logits_for(self.tau_), y, C)
        return self

    def _apply(self, module: nn.Module, name: str, tau: float) -> nn.Module:
        lin = dict(module.named_modules())[name]
        with torch.no_grad():
            lin.weight.copy_(_tau_normalized_weight(lin.weight, tau))
            if lin.bias is not None and not self.keep_bias:
                lin.bias.zero_()
        return module

    def transform(self, model: Any, copy: bool = True) -> Any:
        """Return ``model`` with its layer ``layer_`` τ-normalised.

        Parameters
        ----------
        model : nn.Module or skorch net
            Must have a linear layer named ``layer_`` of the fitted shape.
        copy : bool, default=True
            Change a deep copy (True) or ``model`` in place (False).

        Returns
        -------
        model
            Same type as given (a skorch net is copied whole).
        """
        target = self._layer_target(model, copy)
        self._apply(unwrap_model(target), self.layer_, self.tau_)
        return target


# --------------------------------------------------------------------------- class bias


class ClassBiasTuning(_PostHocBaseline):
    """One additive offset per class, tuned on validation for balanced accuracy.

    The returned model predicts ``argmax_c (z_c + bias_c)``. The offsets start
    at zero and are improved by coordinate ascent: for each class in turn, the
    balanced accuracy as a function of that class's offset (the others fixed)
    is a step function whose steps are where a validation sample's
    prediction switches; the best step is found exactly by sorting those
    switch points (or over ``grid`` when given), and the offset moves to the
    middle of the best interval nearest its current value. A move is kept
    only when the validation balanced accuracy strictly rises (checked with
    the actual argmax), so the result is never worse than the model on the
    validation data. Sweeps stop when one changes nothing or after
    ``max_iter``.

    This is the multiclass counterpart of threshold tuning. It can overfit a
    small validation set (it maximises validation accuracy exactly); judge
    it on held-out data.

    Parameters
    ----------
    max_iter : int, default=20
        Maximum number of sweeps over the classes.
    grid : array-like, optional
        Candidate offset values (absolute, in logit units) searched for each
        class instead of the exact breakpoints.
    on_probabilities : {"log", "raise"}, default="log"
        As in :class:`LogitAdjustment`.
    batch_size : int, default=512

    Attributes
    ----------
    bias_ : ndarray of shape (C,)
        Added to the logits (0 for a class absent from the validation data).
    offsets_ : ndarray of shape (C,)
        ``−bias_`` (what :class:`LogitAdjustedModel` subtracts).
    n_iter_ : int
        Sweeps run.
    history_ : ndarray
        Validation balanced accuracy after each sweep (first entry: before).
    log_input_ : bool
    per_class_accuracy_before_, per_class_accuracy_after_ : ndarray
    balanced_accuracy_before_, balanced_accuracy_after_ : float

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Linear(2, 3)
    >>> X = torch.randn(60, 2); y = torch.arange(60) % 3
    >>> cb = ClassBiasTuning().fit(model, X, y)
    >>> cb.balanced_accuracy_after_ >= cb.balanced_accuracy_before_
    True
    """

    _array_attrs = ("bias_", "offsets_", "history_", "per_class_accuracy_before_",
                    "per_class_accuracy_after_")
    _scalar_attrs = ("n_iter_", "log_input_", "n_classes_", "balanced_accuracy_before_",
                     "balanced_accuracy_after_")

    def __init__(self, max_iter: int = 20, grid: Any = None, on_probabilities: str = "log",
                 batch_size: int = 512) -> None:
        self.max_iter = max_iter
        self.grid = grid
        self.on_probabilities = on_probabilities
        self.batch_size = batch_size

    def fit(self, model: Any, X_val: Any, y_val: Any = None) -> ClassBiasTuning:
        """Tune the per-class offsets on the validation data.

        Parameters
        ----------
        model : nn.Module or skorch net
        X_val, y_val
            Validation data.

        Returns
        -------
        self
        """
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, numbers.Integral) \
                or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer; got {self.max_iter!r}.")
        grid = None if self.grid is None else np.unique(_check_grid(self.grid, "grid"))
        _check_on_probabilities(self.on_probabilities)
        z, y, log_input = self._validation_logits(model, X_val, y_val, True)
        Z = z.numpy()
        yn = y.numpy()
        C = Z.shape[1]
        counts = np.bincount(yn, minlength=C)
        present = np.flatnonzero(counts > 0)
        # Sample weights that make the weighted accuracy the balanced accuracy.
        w = 1.0 / (counts[yn] * present.size)
        bias = np.zeros(C)

        def score(b: np.ndarray) -> float:
            return float(w[(Z + b).argmax(axis=1) == yn].sum())

        current = score(bias)
        history = [current]
        n_iter = 0
        for _ in range(int(self.max_iter)):
            n_iter += 1
            changed = False
            for c in present:
                cand = (self._best_offset(Z, yn, w, bias, c) if grid is None
                        else self._best_on_grid(Z, yn, w, bias, c, grid))
                if cand is None or cand == bias[c]:
                    continue
                trial = bias.copy()
                trial[c] = cand
                s = score(trial)
                if s > current + 1e-12:
                    bias, current, changed = trial, s, True
            history.append(current)
            if not changed:
                break
        self.bias_ = bias
        self.offsets_ = -bias
        self.n_iter_ = n_iter
        self.history_ = np.asarray(history)
        self.log_input_ = bool(log_input)
        self._record_accuracies(z, z + torch.from_numpy(bias), y, C)
        return self

    @staticmethod
    def _best_offset(Z, y, w, bias, c) -> float | None:
        """Exact maximiser of the weighted accuracy over ``bias[c]``."""
        shifted = Z + bias
        others = np.delete(shifted, c, axis=1)
        other_idx = np.delete(np.arange(Z.shape[1]), c)
        best_other = other_idx[others.argmax(axis=1)]
        # Sample i is predicted c exactly when bias[c] > t_i.
        t = others.max(axis=1) - Z[:, c]
        pos = y == c                                  # right iff bias[c] > t
        neg = (y != c) & (best_other == y)            # right iff bias[c] < t
        u, inv = np.unique(t, return_inverse=True)
        m = u.size
        pos_w = np.bincount(inv, weights=np.where(pos, w, 0.0), minlength=m)
        neg_w = np.bincount(inv, weights=np.where(neg, w, 0.0), minlength=m)
        # Interval j is (u[j-1], u[j]) with u[-1] = -inf, u[m] = +inf:
        # value = Σ_{g<j} pos_w[g] + Σ_{g≥j} neg_w[g].
        f = np.concatenate([[0.0], np.cumsum(pos_w)]) + \
            np.concatenate([np.cumsum(neg_w[::-1])[::-1], [0.0]])
        best = f.max()
        good = np.flatnonzero(f >= best - 1e-12)
        margin = max((u[-1] - u[0]) / max(m - 1, 1), 1e-6)

        def value(j: int) -> float:
            if j == 0:
                return float(u[0] - margin)
            if j == m:
                return float(u[-1] + margin)
            return float(0.5 * (u[j - 1] + u[j]))

        cur = bias[c]
        j_cur = int(np.searchsorted(u, cur, side="left"))
        inside = j_cur in good and (j_cur == m or cur < u[j_cur]) and (j_cur == 0
                                                                         or cur > u[j_cur - 1])
        if inside:
            return None
        j = good[np.argmin([abs(value(g) - cur) for g in good])]
        return value(int(j))

    @staticmethod
    def _best_on_grid(Z, y, w, bias, c, grid) -> float | None:
        trial = np.repeat((Z + bias)[None], grid.size, axis=0)
        trial[:, :, c] = Z[:, c][None] + grid[:, None]
        correct = trial.argmax(axis=2) == y[None]
        scores = (correct * w[None]).sum(axis=1)
        ties = np.flatnonzero(scores >= scores.max() - 1e-12)
        return float(grid[ties[np.argmin(np.abs(grid[ties] - bias[c]))]])

    def transform(self, model: Any, copy: bool = True) -> LogitAdjustedModel:
        """Wrap ``model`` so ``bias_`` is added to its logits.

        Parameters
        ----------
        model : nn.Module or skorch net
        copy : bool, default=True
            Wrap a deep copy (True) or the module itself (False, not modified).

        Returns
        -------
        LogitAdjustedModel
        """
        return self._offset_model(model, copy)


# --------------------------------------------------------------------------- last layer


class LastLayerRetraining(_PostHocBaseline):
    """Refit the final linear layer on the validation data's penultimate features
    (last-layer retraining, the "DFR" recipe of Kirichenko et al. 2022).

    The network is frozen; only its final ``nn.Linear`` is replaced by a
    class-balanced, L2-regularised multinomial logistic regression fitted on
    the layer's inputs for the labelled validation data. The L2 strength is
    chosen by stratified cross-validation on the validation data alone
    (balanced accuracy). With ``train_data`` passed to :meth:`fit`, each fit
    also sees a class-balanced resample of the training features and the
    weights are averaged over ``n_resamples`` resamples (DFR's variant that
    uses training data).

    Parameters
    ----------
    layer : str, optional
        Name (as in ``named_modules()``) of the layer to refit; default the
        last ``nn.Linear``. Its output must be the model's output.
    C : "auto" or float > 0, default="auto"
        Inverse L2 strength (scikit-learn's convention); "auto" picks it from
        ``Cs`` by cross-validation.
    Cs : array-like, optional
        The grid for "auto"; default ``logspace(-3, 1, 9)``.
    cv : int, default=5
        Stratified folds (fewer when a class has fewer validation samples).
    standardize : bool, default=True
        Fit on features standardised with the fitting data's mean and
        standard deviation (as DFR does); the scaling is folded back into the
        layer's weight and bias.
    shrink_to : {"zero", "model"}, default="zero"
        What the L2 penalty pulls the weights toward: zero (DFR, scikit-learn)
        or the trained layer's weights, which keeps the trained head where
        the validation data say little.
    n_resamples : int, default=10
        Class-balanced resamples of the training features (only with
        ``train_data``).
    train_per_class : int, optional
        Training samples per class in each resample, drawn with replacement
        when a class has fewer; default the largest validation class count.
    max_iter : int, default=1000
        L-BFGS iterations per fit.
    batch_size : int, default=512
    random_state : int or None, default=None
        Seeds the folds and the resamples.

    Attributes
    ----------
    C_ : float
    Cs_, cv_scores_ : ndarray
        The grid and its mean cross-validated balanced accuracy.
    layer_ : str
    coef_ : ndarray (K, d)
    intercept_ : ndarray (K,)
        The new layer's weight and bias (in the model's feature space).
    in_features_, n_classes_ : int
    per_class_accuracy_before_, per_class_accuracy_after_ : ndarray
    balanced_accuracy_before_, balanced_accuracy_after_ : float
        On the validation data (the "after" numbers are in-sample).

    Examples
    --------
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(),
    ...                             torch.nn.Linear(8, 2))
    >>> X = torch.randn(60, 3); y = (X[:, 0] > 0).long()
    >>> llr = LastLayerRetraining(random_state=0).fit(model, X, y)
    >>> llr.transform(model)[2].weight.shape
    torch.Size([2, 8])
    >>> llr.balanced_accuracy_after_ > llr.balanced_accuracy_before_
    True
    """

    _array_attrs = ("coef_", "intercept_", "Cs_", "cv_scores_", "per_class_accuracy_before_",
                    "per_class_accuracy_after_")
    _scalar_attrs = ("C_", "layer_", "in_features_", "n_classes_",
                     "balanced_accuracy_before_", "balanced_accuracy_after_")

    def __init__(self, layer: str | None = None, C: float | str = "auto", Cs: Any = None,
                 cv: int = 5, standardize: bool = True, shrink_to: str = "zero",
                 n_resamples: int = 10, train_per_class: int | None = None,
                 max_iter: int = 1000, batch_size: int = 512,
                 random_state: int | None = None) -> None:
        self.layer = layer
        self.C = C
        self.Cs = Cs
        self.cv = cv
        self.standardize = standardize
        self.shrink_to = shrink_to
        self.n_resamples = n_resamples
        self.train_per_class = train_per_class
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.random_state = random_state

    def fit(self, model: Any, X_val: Any, y_val: Any = None,
            train_data: Any = None) -> LastLayerRetraining:
        """Refit the final layer on the validation data.

        Parameters
        ----------
        model : nn.Module or skorch net
            Not changed.
        X_val, y_val
            Labelled validation data (tensor, ndarray, Dataset or DataLoader).
        train_data : (X, y) tuple, Dataset or DataLoader, optional
            Training data whose class-balanced resamples join each fit.

        Returns
        -------
        self
        """
        fixed, grid = self._check_params()
        module = unwrap_model(model)
        name, lin = _find_linear(module, self.layer)
        if lin.bias is None:
            raise ValueError(f"layer {name!r} has no bias; last-layer retraining fits one "
                             "(give the layer a bias).")
        batch_size = _check_batch_size(self.batch_size)
        data = as_data(X_val, y_val, name="X_val", y_name="y_val")
        z, feats, y = self._features(module, name, lin, data, batch_size, "X_val")
        K = z.shape[1]
        self._warn_absent_classes(torch.as_tensor(y), K, stacklevel=3)
        extra = None
        if train_data is not None:
            tdata = as_data(train_data, name="train_data", y_name="train_data")
            extra = self._features(module, name, lin, tdata, batch_size, "train_data")[1:]
        rng = np.random.default_rng(self.random_state)
        W0 = lin.weight.detach().cpu().to(torch.float64).numpy()
        resamples = self._resamples(extra, y, K, rng)
        self.Cs_ = np.array([fixed]) if fixed is not None else grid
        self.cv_scores_ = self._cross_validate(feats, y, K, W0, resamples[:1], rng)
        best = np.flatnonzero(self.cv_scores_ >= self.cv_scores_.max() - 1e-12)
        # Ties go to the strongest penalty: the simplest head the data support.
        self.C_ = float(self.Cs_[best[0]])
        fits = [self._fit_head(feats, y, K, self.C_, W0, r) for r in resamples]
        self.coef_ = np.mean([f[0] for f in fits], axis=0)
        self.intercept_ = np.mean([f[1] for f in fits], axis=0)
        self.layer_ = name
        self.in_features_ = int(lin.in_features)
        self.n_classes_ = int(K)
        self.classes_ = np.arange(K)
        z_after = torch.from_numpy(feats @ self.coef_.T + self.intercept_)
        self._record_accuracies(z, z_after, torch.as_tensor(y), K)
        return self

    def _check_params(self) -> tuple[float | None, np.ndarray]:
        fixed = None
        if not (isinstance(self.C, str) and self.C == "auto"):
            if isinstance(self.C, bool) or not isinstance(self.C, numbers.Real) \
                    or not np.isfinite(self.C) or self.C <= 0:
                raise ValueError(f"C must be 'auto' or a positive float; got {self.C!r}.")
            fixed = float(self.C)
        grid = (np.logspace(-3, 1, 9) if self.Cs is None
                else _check_grid(self.Cs, "Cs", lower=0.0))
        if np.any(grid <= 0):
            raise ValueError("Cs must be positive.")
        if isinstance(self.cv, bool) or not isinstance(self.cv, numbers.Integral) \
                or self.cv < 2:
            raise ValueError(f"cv must be an integer ≥ 2; got {self.cv!r}.")
        check_positive(self.n_resamples, "n_resamples", integer=True)
        check_positive(self.max_iter, "max_iter", integer=True)
        check_positive(self.train_per_class, "train_per_class", integer=True, allow_none=True)
        if self.shrink_to not in ("zero", "model"):
            raise ValueError(f"shrink_to must be 'zero' or 'model'; got {self.shrink_to!r}.")
        if not isinstance(self.standardize, (bool, np.bool_)):
            raise TypeError(f"standardize must be a bool; got {type(self.standardize).__name__}.")
        return fixed, np.sort(grid)

    @staticmethod
    def _features(module, name, lin, data, batch_size, what):
        z, feats, cached = _layer_inputs(module, lin, data, batch_size, what)
        y = data.labels()
        K = z.shape[1]
        check_label_range(y, K, "y_val" if what == "X_val" else what)
        if lin.out_features != K or not cached:
            raise ValueError(f"layer {name!r} is not the model's output layer (its outputs are "
                             "not the model's logits); pass layer= the final linear layer.")
        return z, feats.numpy(), y.numpy()

    def _resamples(self, extra, y_val, K, rng) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Class-balanced draws of the training features (or one empty draw)."""
        if extra is None:
            return [None]
        F, y = extra
        per = (int(self.train_per_class) if self.train_per_class is not None
               else int(np.bincount(y_val, minlength=K).max()))
        draws = []
        for _ in range(int(self.n_resamples)):
            idx = np.concatenate([
                rng.choice(members, size=per, replace=members.size < per)
                for c in range(K) if (members := np.flatnonzero(y == c)).size])
            draws.append((F[idx], y[idx]))
        return draws

    def _fit_head(self, feats, y, K, C, W0, extra):
        """One class-balanced fit; returns the layer's (weight, bias) in the
        model's own feature space."""
        from ._logistic import balanced_sample_weight, fit_multinomial

        if extra is not None:
            feats = np.concatenate([feats, extra[0]])
            y = np.concatenate([y, extra[1]])
        mu = feats.mean(0) if self.standardize else np.zeros(feats.shape[1])
        sd = feats.std(0) if self.standardize else np.ones(feats.shape[1])
        sd = np.where(sd > 1e-12, sd, 1.0)
        center = W0 * sd if self.shrink_to == "model" else None
        W, b = fit_multinomial((feats - mu) / sd, y, K, C,
                               sample_weight=balanced_sample_weight(y, K), center=center,
                               max_iter=int(self.max_iter))
        W = W / sd
        return W, b - W @ mu

    def _cross_validate(self, feats, y, K, W0, extra, rng) -> np.ndarray:
        from sklearn.model_selection import StratifiedKFold

        counts = np.bincount(y, minlength=K)
        folds = int(min(self.cv, counts[counts > 0].min()))
        if len(self.Cs_) == 1 or folds < 2:
            return np.zeros(len(self.Cs_))
        seed = int(rng.integers(2**31 - 1))
        split = StratifiedKFold(folds, shuffle=True, random_state=seed).split(feats, y)
        scores = np.zeros(len(self.Cs_))
        for train, test in split:
            for i, C in enumerate(self.Cs_):
                W, b = self._fit_head(feats[train], y[train], K, C, W0, extra[0])
                pred = np.argmax(feats[test] @ W.T + b, axis=1)
                scores[i] += balanced_accuracy(per_class_accuracy(
                    torch.as_tensor(y[test]), torch.as_tensor(pred), K)) / folds
        return scores

    def transform(self, model: Any, copy: bool = True) -> Any:
        """Return ``model`` with its layer ``layer_`` replaced by the refitted head.

        Parameters
        ----------
        model : nn.Module or skorch net
            Must have a linear layer named ``layer_`` of the fitted shape.
        copy : bool, default=True
            Change a deep copy (True) or ``model`` in place (False).
        """
        target = self._layer_target(model, copy)
        new = dict(unwrap_model(target).named_modules())[self.layer_]
        with torch.no_grad():
            new.weight.copy_(torch.as_tensor(self.coef_, dtype=new.weight.dtype))
            if new.bias is not None:
                new.bias.copy_(torch.as_tensor(self.intercept_, dtype=new.bias.dtype))
        return target
