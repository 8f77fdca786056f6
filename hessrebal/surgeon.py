"""SpectralSurgeon: the estimator that rebalances a trained classifier."""

from __future__ import annotations

import inspect
import math
import time
import warnings
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.utils.validation import check_is_fitted

from ._data import DEFAULT_BATCH_SIZE, LabelledData, as_data, check_label_range
from ._model import FunctionalModel, OutputToLogits, check_finite_parameters, predict_logits
from .amplitude import GammaDecay
from .curvature import HessianOperator
from .metrics import balanced_accuracy, class_std, per_class_accuracy
from .parameters import ParameterSpace, ParamSelection, unwrap_model
from .sensitivity import SoftmaxSurrogateSensitivity
from .solvers import CoefficientProblem, CvxpyQPSolver, SolverWarning
from .spectrum import LanczosSpectrum, count_spikes

_OBJECTIVES = ("weighted", "maxmin")
_BUDGET_SHAPES = ("l2", "box")
_ACCEPTANCE = ("tolerance", "noise_aware")

#: Target second-order loss increase ½·λ₁·α² of a full-budget step along the
#: top spike, used by the data-driven default budget (see ``default_budget``).
BUDGET_LOSS_INCREASE = 0.05


def default_budget(top_eigenvalue: float, loss_increase: float = BUDGET_LOSS_INCREASE) -> float:
    """The data-driven initial budget ``α_max = sqrt(2·κ / λ₁)``.

    A step of length ``α`` along the top spike raises the loss by about
    ``½ λ₁ α²``; the default budget is the step whose predicted increase is
    ``κ`` nats (``BUDGET_LOSS_INCREASE``). It scales with the curvature of the
    trained model instead of with its size: the paper's 0.02 for a ResNet-50
    (λ₁ ≈ 830) corresponds to κ ≈ 0.17, while a small MLP with λ₁ ≈ 10 gets a
    budget near 0.1.
    """
    lam = abs(float(top_eigenvalue))
    if not math.isfinite(lam) or lam <= 0:
        return 1e-2
    return math.sqrt(2.0 * loss_increase / lam)


def _weight_power_rule(accuracy: np.ndarray) -> float:
    """The paper's rule for p: 2 when e_max/e_min < 5, else ½ (severe imbalance)."""
    e = 1.0 - accuracy[np.isfinite(accuracy)]
    e_min = max(float(e.min()), 1e-3)
    return 2.0 if float(e.max()) / e_min < 5 else 0.5


class SpectralSurgeon(TransformerMixin, BaseEstimator, auto_wrap_output_keys=None):
    """Rebalance per-class accuracy of a trained classifier along Hessian spikes.

    The surgeon finds the top eigenpairs (the "spikes") of the loss Hessian,
    measures how each class's accuracy responds to a step along each spike,
    solves a small convex problem for the step that helps the weak classes
    without hurting the strong ones, and repeats with rollback and an adaptive
    budget. The model is never retrained and never changed by ``fit``.

    Parameters
    ----------
    spectrum : spectrum backend, default=None
        Has ``compute(operator, n_components) -> Spectrum``.
        ``None`` means ``LanczosSpectrum(tol=1e-3)``.
    sensitivity : sensitivity estimator, default=None
        Has ``estimate(...) -> ndarray (C, k)``. ``None`` means
        ``SoftmaxSurrogateSensitivity(kind="margin")``. The paper's
        ``FiniteDifferenceSensitivity()`` is blind to a class none of whose
        samples flips within the probe — a tail class at 0 % accuracy gets a
        zero row and is never helped — so the default is the exact derivative
        of a smooth margin surrogate, which sees every class.
    solver : coefficient solver, default=None
        Has ``solve(CoefficientProblem) -> ndarray (k,)``. ``None`` means
        ``CvxpyQPSolver()``.
    amplitude : amplitude controller, default=None
        Has ``initial(budget, max_steps)`` and ``update(accepted, signal)``.
        ``None`` means ``GammaDecay(gamma=0.7)``.
    n_components : int, "auto" or None, default=None
        Number of spikes ``k``; ``None`` uses ``C − 1``; ``"auto"`` counts the
        spikes standing out from the bulk (``count_spikes``).
    objective : {"weighted", "maxmin"}, default="weighted"
        ``weighted`` maximises ``Σ_j w_j (Sα)_j`` with ``w_j ∝ e_j^p``;
        ``maxmin`` maximises the worst linearised class accuracy.
    weight_power : float or "auto", default=1.0
        ``p`` in the error weights; ``"auto"`` applies the paper's rule
        (2 when ``e_max/e_min < 5``, else ½).
    strong_threshold : float, default=0.85
        Classes with accuracy above it must not lose (linearised) more than
        ``preserve_tolerance``.
    preserve_tolerance : float, default=0.01
    budget : float or None, default=None
        Initial ``α_max``; ``None`` uses :func:`default_budget` on the top
        eigenvalue.
    budget_shape : {"l2", "box"}, default="l2"
        The global L2 ball, or per-spike boxes ``|α_i| ≤ α_max·√(λ_min/λ_i)``.
    max_steps : int, default=10
        Iterations of the loop (accepted or rolled back).
    max_std_increase : float, default=0.005
        A candidate whose σ rises by more than this is rolled back.
    max_class_drop : float, default=0.07
        A candidate in which any class drops by more than this is rolled back.
    refresh_spectrum : int, default=1
        Recompute the spectrum every this many steps (the paper: every step);
        0 computes it once. A refresh starts from the previous spikes.
    selection_fraction : float or None, default=None
        Keep this stratified fraction of the validation data for the
        accept/rollback decision only (against fitting validation noise).
    acceptance : {"tolerance", "noise_aware"}, default="tolerance"
        ``tolerance`` is the paper's rule; ``noise_aware`` also requires the
        σ improvement to exceed its standard error (from the samples whose
        prediction flipped).
    curvature_penalty : float, default=0.0
        ``μ`` in the penalty ``(μ/2)·Σ λ_i α_i²`` subtracted from the objective.
    params : None, str, sequence of str or callable, default=None
        Which parameters move (see :class:`~hessrebal.ParameterSpace`).
    curvature : {"hessian", "ggn"}, default="hessian"
    batch_size : int, default=512
        Chunk size for every pass over the data.
    device : str or torch.device, optional
        Where to compute; default the model's device. A different device
        works on a private copy of the model.
    output_to_logits : callable, optional
        Maps the model's forward output to logits.
    random_state : int or None, default=None
        Seeds the spectrum's start vectors and the selection split.
    progress : bool, default=False
        Show a progress bar over the steps.

    Attributes
    ----------
    classes_ : ndarray (C,)
    n_classes_ : int
    n_components_ : int
        Spikes used.
    eigenvalues_ : ndarray (k,)
        The spike eigenvalues at the trained model (descending).
    eigenvectors_ : torch.Tensor (D, k)
        The spike eigenvectors at the trained model, on the model's device.
    sensitivity_ : ndarray (C, k)
        The first sensitivity matrix.
    perturbation_ : torch.Tensor (D,)
        The sum of accepted steps.
    coef_ : ndarray (k,)
        ``eigenvectors_ᵀ · perturbation_``.
    predicted_loss_increase_ : float
        ``½ Σ λ_i coef_i²``, the second-order predicted loss increase.
    history_ : list of dict
        One entry per step: budget, accepted, reason, σ, balanced accuracy,
        per-class accuracy, α, predicted loss increase, HVPs, seconds.
    per_class_accuracy_before_, per_class_accuracy_after_ : ndarray (C,)
        On the selection data (the validation data unless
        ``selection_fraction`` is set).
    n_hvp_ : int
        Hessian-vector products over the whole fit.
    parameter_names_ : list of str
    parameter_shapes_ : list of tuple
    initial_budget_ : float

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from hessrebal import SpectralSurgeon
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> X, y = torch.randn(90, 4), torch.arange(90) % 3
    >>> surgeon = SpectralSurgeon(max_steps=2, random_state=0).fit(model, X, y)
    >>> surgeon.perturbation_.shape
    torch.Size([67])
    >>> new_model = surgeon.transform(model)
    """

    def __init__(
        self,
        spectrum: Any = None,
        sensitivity: Any = None,
        solver: Any = None,
        amplitude: Any = None,
        n_components: int | str | None = None,
        objective: str = "weighted",
        weight_power: float | str = 1.0,
        strong_threshold: float = 0.85,
        preserve_tolerance: float = 0.01,
        budget: float | None = None,
        budget_shape: str = "l2",
        max_steps: int = 10,
        max_std_increase: float = 0.005,
        max_class_drop: float = 0.07,
        refresh_spectrum: int = 1,
        selection_fraction: float | None = None,
        acceptance: str = "tolerance",
        curvature_penalty: float = 0.0,
        params: ParamSelection = None,
        curvature: str = "hessian",
        batch_size: int = DEFAULT_BATCH_SIZE,
        device: str | torch.device | None = None,
        output_to_logits: OutputToLogits | None = None,
        random_state: int | None = None,
        progress: bool = False,
    ) -> None:
        self.spectrum = spectrum
        self.sensitivity = sensitivity
        self.solver = solver
        self.amplitude = amplitude
        self.n_components = n_components
        self.objective = objective
        self.weight_power = weight_power
        self.strong_threshold = strong_threshold
        self.preserve_tolerance = preserve_tolerance
        self.budget = budget
        self.budget_shape = budget_shape
        self.max_steps = max_steps
        self.max_std_increase = max_std_increase
        self.max_class_drop = max_class_drop
        self.refresh_spectrum = refresh_spectrum
        self.selection_fraction = selection_fraction
        self.acceptance = acceptance
        self.curvature_penalty = curvature_penalty
        self.params = params
        self.curvature = curvature
        self.batch_size = batch_size
        self.device = device
        self.output_to_logits = output_to_logits
        self.random_state = random_state
        self.progress = progress

    # ------------------------------------------------------------------ fit
    def fit(self, model: Any, X_val: Any, y_val: Any = None, curvature_data: Any = None,
            process_group: Any = None) -> SpectralSurgeon:
        """Find the perturbation that rebalances ``model``'s per-class accuracy.

        Parameters
        ----------
        model : nn.Module or skorch net
            The trained classifier. It is not changed.
        X_val, y_val : tensor, ndarray, Dataset or DataLoader
            The validation (sensitivity) data; with a Dataset/DataLoader
            ``y_val`` is None.
        curvature_data : (X, y) tuple, Dataset or DataLoader, optional
            Where the Hessian is taken (the paper: 128–256 training images).
            Default: the validation data.
        process_group : torch.distributed ProcessGroup, optional
            Passed to :class:`HessianOperator`: each rank gives its own shard
            of ``curvature_data`` and the Hessian is the full-data one.

        Returns
        -------
        self
        """
        self._validate_params()
        module = unwrap_model(model)
        check_finite_parameters(module)
        module = self._working_module(module)
        space = ParameterSpace(module, self.params)
        fmodel = FunctionalModel(module, space, self.output_to_logits)
        val = as_data(X_val, y_val, name="X_val", y_name="y_val")
        n_classes = self._check_data(fmodel, val, "X_val", "y_val")
        curv = (val if curvature_data is None
                else as_data(curvature_data, name="curvature_data", y_name="curvature_data"))
        if curvature_data is not None:
            self._check_data(fmodel, curv, "curvature_data", "curvature_data")
        sens_data, sel_data = self._split_selection(val, n_classes)

        spectrum_backend = self._strategy(self.spectrum, LanczosSpectrum(tol=1e-3))
        sensitivity = self._strategy(self.sensitivity, SoftmaxSurrogateSensitivity(kind="margin"))
        solver = self._strategy(self.solver, CvxpyQPSolver())
        amplitude = self._strategy(self.amplitude, GammaDecay(gamma=0.7))

        theta0 = fmodel.initial_theta()
        theta = theta0.clone()
        self.n_hvp_ = 0
        k_wanted = self._n_wanted(n_classes, space.dim)

        def spectrum_at(point: torch.Tensor, init: torch.Tensor | None, k: int):
            op = HessianOperator(module, curv, params=self.params, curvature=self.curvature,
                                 batch_size=self.batch_size,
                                 output_to_logits=self.output_to_logits,
                                 process_group=process_group, theta=point)
            spec = _compute_spectrum(spectrum_backend, op, k, init)
            self.n_hvp_ += op.n_matvec
            return spec

        spec = spectrum_at(theta, None, k_wanted)
        eigenvalues = _to_numpy(spec.eigenvalues)
        if self.n_components == "auto":
            k = int(max(1, min(count_spikes(eigenvalues), len(eigenvalues))))
        else:
            k = k_wanted
        Q = spec.eigenvectors[:, :k]
        eigenvalues = eigenvalues[:k]
        self.n_components_ = k
        self.eigenvalues_ = eigenvalues.copy()
        self.eigenvectors_ = Q.detach().clone()

        budget0 = (float(self.budget) if self.budget is not None
                   else default_budget(eigenvalues[0]))
        self.initial_budget_ = budget0
        budget = float(amplitude.initial(budget0, self.max_steps))

        sel_state = _evaluate(fmodel, theta, sel_data, n_classes, self.batch_size)
        sens_acc = (sel_state["acc"] if sens_data is sel_data else
                    _evaluate(fmodel, theta, sens_data, n_classes, self.batch_size)["acc"])
        self.per_class_accuracy_before_ = sel_state["acc"].copy()
        history: list[dict[str, Any]] = []
        self.sensitivity_ = None
        stale = False

        steps = range(self.max_steps)
        if self.progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="spectral surgery", leave=False)
        for t in steps:
            start = time.perf_counter()
            hvp_before = self.n_hvp_
            if stale and self.refresh_spectrum and t % self.refresh_spectrum == 0:
                spec = spectrum_at(theta, Q, k)
                Q = spec.eigenvectors[:, :k]
                eigenvalues = _to_numpy(spec.eigenvalues)[:k]
                stale = False
            S = np.asarray(sensitivity.estimate(fmodel, theta, Q, sens_data, n_classes,
                                                budget=budget, batch_size=self.batch_size),
                           dtype=np.float64)
            if self.sensitivity_ is None:
                self.sensitivity_ = S.copy()
            problem = CoefficientProblem(
                sensitivity=S, accuracy=sens_acc, eigenvalues=eigenvalues, budget=budget,
                objective=self.objective, weight_power=self._weight_power(sens_acc),
                strong_threshold=self.strong_threshold,
                preserve_tolerance=self.preserve_tolerance, budget_shape=self.budget_shape,
                curvature_penalty=self.curvature_penalty,
            )
            alpha, solver_messages = _solve(solver, problem)
            entry: dict[str, Any] = {
                "step": t, "budget": budget, "alpha": alpha.tolist(),
                "predicted_loss_increase": 0.5 * float(np.sum(eigenvalues * alpha**2)),
                "solver_warnings": solver_messages,
            }
            if not np.any(alpha):
                accepted, reason, signal, cand = False, "zero step", 0.0, None
            else:
                step = Q @ torch.as_tensor(alpha, dtype=Q.dtype, device=Q.device)
                candidate = theta + step
                cand = _evaluate(fmodel, candidate, sel_data, n_classes, self.batch_size)
                accepted, reason, signal = self._decide(sel_state, cand)
            if accepted:
                theta = candidate
                sel_state = cand
                sens_acc = (cand["acc"] if sens_data is sel_data else
                            _evaluate(fmodel, theta, sens_data, n_classes, self.batch_size)["acc"])
                stale = True
            entry.update({
                "accepted": accepted, "reason": reason,
                "class_std": class_std(sel_state["acc"]),
                "balanced_accuracy": balanced_accuracy(sel_state["acc"]),
                "per_class_accuracy": sel_state["acc"].tolist(),
                "candidate_class_std": None if cand is None else cand["std"],
                "candidate_balanced_accuracy": (None if cand is None
                                                else balanced_accuracy(cand["acc"])),
                "n_hvp": self.n_hvp_ - hvp_before,
                "seconds": time.perf_counter() - start,
            })
            history.append(entry)
            budget = float(amplitude.update(accepted, signal))
            if self.progress:
                steps.set_postfix(sigma=f"{entry['class_std']:.4f}", budget=f"{budget:.3g}")

        self.history_ = history
        self.perturbation_ = (theta - theta0).detach()
        self.coef_ = _to_numpy(self.eigenvectors_.T @ self.perturbation_)
        self.predicted_loss_increase_ = 0.5 * float(np.sum(self.eigenvalues_ * self.coef_**2))
        self.per_class_accuracy_after_ = sel_state["acc"].copy()
        self.classes_ = np.arange(n_classes)
        self.n_classes_ = n_classes
        self.parameter_names_ = list(space.names)
        self.parameter_shapes_ = [tuple(s) for s in space.shapes]
        return self

    # ------------------------------------------------------------ transform
    def transform(self, model: Any, copy: bool = True) -> Any:
        """Return ``model`` with ``θ₀ + perturbation_`` in the selected parameters.

        Parameters
        ----------
        model : nn.Module or skorch net
            A model with the fitted parameter names and shapes.
        copy : bool, default=True
            ``False`` changes ``model`` in place (on request only).
        """
        check_is_fitted(self, "perturbation_")
        space = self._fitted_space(model)
        return space.apply(model, self.perturbation_, copy=copy)

    def fit_transform(self, model: Any, X_val: Any, y_val: Any = None,
                      **fit_params: Any) -> Any:
        """``fit(model, X_val, y_val, **fit_params).transform(model)``."""
        return self.fit(model, X_val, y_val, **fit_params).transform(model)

    def score(self, model: Any, X: Any, y: Any = None) -> float:
        """Balanced accuracy of ``transform(model)`` on ``(X, y)``."""
        check_is_fitted(self, "perturbation_")
        space = self._fitted_space(model)
        fmodel = FunctionalModel(model, space, self.output_to_logits)
        data = as_data(X, y)
        theta = fmodel.initial_theta() + self.perturbation_.to(fmodel.device, fmodel.dtype)
        logits, labels = predict_logits(fmodel, theta, data, self.batch_size)
        C = logits.shape[1]
        check_label_range(labels, C)
        return balanced_accuracy(per_class_accuracy(labels, logits.argmax(1), C))

    # ------------------------------------------------------------- helpers
    def _fitted_space(self, model: Any) -> ParameterSpace:
        space = ParameterSpace(model, lambda n, p: n in set(self.parameter_names_))
        if space.names != self.parameter_names_:
            missing = [n for n in self.parameter_names_ if n not in space.names]
            raise ValueError(
                f"model has no parameter '{missing[0]}' (the fitted surgeon moves it)."
                if missing else "model orders its parameters differently from the fitted one."
            )
        for name, shape, fitted in zip(space.names, space.shapes, self.parameter_shapes_):
            if tuple(shape) != tuple(fitted):
                raise ValueError(f"model.{name} has shape {tuple(shape)}; the surgeon was "
                                 f"fitted on shape {tuple(fitted)}.")
        return space

    def _validate_params(self) -> None:
        def positive(name: str, value: Any, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if not isinstance(value, Real) or isinstance(value, bool) or not value > 0 \
                    or not math.isfinite(value):
                raise ValueError(f"{name} must be a positive number; got {value!r}.")

        def non_negative(name: str, value: Any) -> None:
            if not isinstance(value, Real) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative number; got {value!r}.")

        if self.objective not in _OBJECTIVES:
            raise ValueError(f"objective must be one of {_OBJECTIVES}; got {self.objective!r}.")
        if self.budget_shape not in _BUDGET_SHAPES:
            raise ValueError(
                f"budget_shape must be one of {_BUDGET_SHAPES}; got {self.budget_shape!r}.")
        if self.acceptance not in _ACCEPTANCE:
            raise ValueError(f"acceptance must be one of {_ACCEPTANCE}; got {self.acceptance!r}.")
        if self.curvature not in ("hessian", "ggn"):
            raise ValueError(f"curvature must be 'hessian' or 'ggn'; got {self.curvature!r}.")
        positive("budget", self.budget, allow_none=True)
        for name in ("max_std_increase", "max_class_drop", "preserve_tolerance",
                     "curvature_penalty"):
            non_negative(name, getattr(self, name))
        if not (self.weight_power == "auto" or (isinstance(self.weight_power, Real)
                                                and self.weight_power >= 0)):
            raise ValueError(f"weight_power must be >= 0 or 'auto'; got {self.weight_power!r}.")
        if not isinstance(self.strong_threshold, Real) or not 0 <= self.strong_threshold <= 1:
            raise ValueError(
                f"strong_threshold must be in [0, 1]; got {self.strong_threshold!r}.")
        if not isinstance(self.max_steps, Integral) or self.max_steps < 0:
            raise ValueError(f"max_steps must be a non-negative int; got {self.max_steps!r}.")
        if not isinstance(self.refresh_spectrum, Integral) or self.refresh_spectrum < 0:
            raise ValueError(
                f"refresh_spectrum must be a non-negative int; got {self.refresh_spectrum!r}.")
        if not isinstance(self.batch_size, Integral) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {self.batch_size!r}.")
        if self.selection_fraction is not None and not (
                isinstance(self.selection_fraction, Real) and 0 < self.selection_fraction < 1):
            raise ValueError(
                f"selection_fraction must be in (0, 1) or None; got {self.selection_fraction!r}.")
        n = self.n_components
        if not (n is None or n == "auto" or (isinstance(n, Integral) and not isinstance(n, bool)
                                             and n >= 1)):
            raise ValueError(f"n_components must be an int >= 1, 'auto' or None; got {n!r}.")
        if self.output_to_logits is not None and not callable(self.output_to_logits):
            raise TypeError("output_to_logits must be callable.")

    def _working_module(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.device is None:
            return module
        device = torch.device(self.device)
        current = next(module.parameters()).device
        if current == device:
            return module
        import copy

        return copy.deepcopy(module).to(device)

    def _check_data(self, fmodel: FunctionalModel, data: LabelledData, x_name: str,
                    y_name: str) -> int:
        first = next(iter(data.chunks(self.batch_size, fmodel.device, fmodel.dtype)), None)
        if first is None:
            raise ValueError(f"{x_name} is empty (0 samples).")
        n_classes = fmodel.probe(first[0], x_name)
        labels = data.labels()
        check_label_range(labels, n_classes, y_name)
        if x_name == "X_val":
            absent = np.flatnonzero(np.bincount(labels.numpy(), minlength=n_classes) == 0)
            if absent.size:
                warnings.warn(
                    f"Classes {absent.tolist()} have no sample in {y_name}; they are left out "
                    "of the objective, the constraints and σ.", UserWarning, stacklevel=3)
        return n_classes

    def _split_selection(self, val: LabelledData, n_classes: int):
        if self.selection_fraction is None:
            return val, val
        labels = val.labels().numpy()
        rng = np.random.default_rng(self.random_state)
        sel = []
        for c in range(n_classes):
            idx = np.flatnonzero(labels == c)
            if idx.size < 2:
                continue
            n_sel = min(idx.size - 1, max(1, round(self.selection_fraction * idx.size)))
            sel.extend(rng.permutation(idx)[:n_sel].tolist())
        sel_mask = np.zeros(labels.size, dtype=bool)
        sel_mask[sel] = True
        return val.subset(np.flatnonzero(~sel_mask)), val.subset(np.flatnonzero(sel_mask))

    def _strategy(self, given: Any, default: Any) -> Any:
        strategy = clone(given) if given is not None else default
        if self.random_state is not None and "random_state" in getattr(
                strategy, "get_params", dict)():
            if strategy.get_params().get("random_state") is None:
                strategy.set_params(random_state=self.random_state)
        return strategy

    def _n_wanted(self, n_classes: int, dim: int) -> int:
        if self.n_components is None:
            k = n_classes - 1
        elif self.n_components == "auto":
            k = min(2 * n_classes, dim)
        else:
            k = int(self.n_components)
            if k > dim:
                raise ValueError(
                    f"n_components={k} exceeds the number of selected parameters ({dim}).")
        return max(1, min(k, dim))

    def _weight_power(self, accuracy: np.ndarray) -> float:
        if self.weight_power == "auto":
            return _weight_power_rule(accuracy)
        return float(self.weight_power)

    def _decide(self, old: dict[str, Any], new: dict[str, Any]) -> tuple[bool, str, float]:
        """Accept or roll back a candidate; returns (accepted, reason, signal)."""
        if not new["finite"]:
            return False, "non-finite logits", -1.0
        present = np.isfinite(old["acc"])
        drop = float(np.max(old["acc"][present] - new["acc"][present]))
        rise = new["std"] - old["std"]
        if rise > self.max_std_increase:
            return False, f"sigma rose by {rise:.4f}", -max(drop, rise, 0.0)
        if drop > self.max_class_drop:
            return False, f"a class dropped by {drop:.4f}", -max(drop, 0.0)
        if self.acceptance == "noise_aware":
            se = _std_change_standard_error(old, new)
            if -rise <= se:
                return False, f"sigma change {-rise:.4f} within noise ({se:.4f})", -max(drop, 0.0)
        return True, "accepted", old["std"] - new["std"]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        tags.requires_fit = True
        return tags


# ---------------------------------------------------------------- internals
def _to_numpy(t: Any) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().to(torch.float64).numpy()
    return np.asarray(t, dtype=np.float64)


def _compute_spectrum(backend: Any, op: HessianOperator, k: int, init: torch.Tensor | None):
    if init is not None and "init" in inspect.signature(backend.compute).parameters:
        return backend.compute(op, k, init=init)
    return backend.compute(op, k)


def _solve(solver: Any, problem: CoefficientProblem) -> tuple[np.ndarray, list[str]]:
    """Solve, turning any failure into a zero step whose warning is recorded."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            alpha = np.asarray(solver.solve(problem), dtype=np.float64).reshape(-1)
        except (ArithmeticError, RuntimeError, np.linalg.LinAlgError) as exc:
            warnings.warn(f"{type(solver).__name__} failed ({exc}); taking a zero step.",
                          SolverWarning, stacklevel=2)
            alpha = np.zeros(problem.sensitivity.shape[1])
    if alpha.shape != (problem.sensitivity.shape[1],) or not np.all(np.isfinite(alpha)):
        caught_msg = "solver returned a non-finite or misshapen step; taking a zero step."
        warnings.warn(caught_msg, SolverWarning, stacklevel=2)
        return np.zeros(problem.sensitivity.shape[1]), [caught_msg]
    messages = []
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        messages.append(str(w.message))
    return alpha, messages


def _evaluate(fmodel: FunctionalModel, theta: torch.Tensor, data: LabelledData,
              n_classes: int, batch_size: int) -> dict[str, Any]:
    logits, y = predict_logits(fmodel, theta, data, batch_size)
    finite = bool(torch.isfinite(logits).all())
    pred = logits.argmax(1)
    acc = per_class_accuracy(y, pred, n_classes)
    return {"acc": acc, "std": class_std(acc), "correct": (pred == y).numpy(),
            "y": y.numpy(), "finite": finite}


def _std_change_standard_error(old: dict[str, Any], new: dict[str, Any]) -> float:
    """Standard error of σ_new − σ_old on the same samples.

    Only samples whose correctness flipped carry noise in a paired
    comparison: Var(Δa_j) ≈ (flips_j)/n_j² (McNemar), propagated through
    ∂σ/∂a_j = (a_j − ā)/(C·σ) (delta method).
    """
    y = old["y"]
    acc = new["acc"]
    present = np.isfinite(acc)
    C = int(present.sum())
    sigma = new["std"]
    if C < 2 or sigma <= 0:
        return 0.0
    flips = (old["correct"] != new["correct"]).astype(np.float64)
    n = np.bincount(y, minlength=acc.size).astype(np.float64)
    f = np.bincount(y, weights=flips, minlength=acc.size)
    with np.errstate(invalid="ignore", divide="ignore"):
        var_delta = np.where(n > 0, f / n**2, 0.0)
    grad = np.where(present, (acc - np.nanmean(acc)) / (C * sigma), 0.0)
    return float(np.sqrt(np.sum(grad**2 * var_delta)))
