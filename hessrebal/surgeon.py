"""SpectralSurgeon: the estimator that rebalances a trained classifier."""

from __future__ import annotations

import hashlib
import inspect
import math
import os
import platform
import time
import warnings
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.utils.validation import check_is_fitted

from ._data import (
    DEFAULT_BATCH_SIZE,
    LabelledData,
    as_data,
    check_label_range,
    stratified_holdout,
)
from ._distributed import rank_failures
from ._model import FunctionalModel, OutputToLogits, check_finite_parameters, predict_logits
from ._persistence import load_state, save_state
from ._process_state import PROCESS_STATE_LOCK
from .amplitude import AdamSNR, GammaDecay, GrowShrink
from .controls import BulkDirections, RandomDirections
from .curvature import HessianOperator
from .metrics import balanced_accuracy, class_std, imbalance_pvalue, per_class_accuracy
from .parameters import ParameterSpace, ParamSelection, unwrap_model
from .sensitivity import FiniteDifferenceSensitivity, SoftmaxSurrogateSensitivity
from .solvers import CoefficientProblem, CvxpyQPSolver, ProjectedGradientSolver, SolverWarning
from .spectrum import DenseSpectrum, LanczosSpectrum, PowerIterationSpectrum, count_spikes
from .spectrum.base import (
    ConvergenceWarning,
    broadcast_seed,
    collect_convergence_notes,
    convergence_summary,
)

_OBJECTIVES = ("weighted", "maxmin")
_BUDGET_SHAPES = ("l2", "box")
_ACCEPTANCE = ("tolerance", "noise_aware")
_STRATEGY_METHODS = {"spectrum": ("compute",), "sensitivity": ("estimate",),
                     "solver": ("solve",), "amplitude": ("initial", "update")}
#: The only classes :meth:`SpectralSurgeon.load` will construct from a file.
_STRATEGY_CLASSES = {cls.__name__: cls for cls in (
    LanczosSpectrum, PowerIterationSpectrum, DenseSpectrum, SoftmaxSurrogateSensitivity,
    FiniteDifferenceSensitivity, CvxpyQPSolver, ProjectedGradientSolver, GammaDecay, AdamSNR,
    GrowShrink, RandomDirections, BulkDirections)}
_FORMAT_VERSION = 1
#: Below this many validation samples a class gets a warning about its noise.
FEW_SAMPLES = 10

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


def default_strategies() -> dict[str, Any]:
    """Fresh instances of the strategies ``SpectralSurgeon`` uses for ``None``."""
    return {"spectrum": LanczosSpectrum(tol=1e-3),
            "sensitivity": SoftmaxSurrogateSensitivity(kind="margin"),
            "solver": CvxpyQPSolver(), "amplitude": GammaDecay(gamma=0.7)}


def _weight_power_rule(accuracy: np.ndarray) -> float:
    """The paper's rule for p: 2 when e_max/e_min < 5, else ½ (severe imbalance)."""
    e = 1.0 - accuracy[np.isfinite(accuracy)]
    e_min = max(float(e.min()), 1e-3)
    return 2.0 if float(e.max()) / e_min < 5 else 0.5


def shrink_accuracy(accuracy: np.ndarray, counts: np.ndarray, strength: float) -> np.ndarray:
    """Per-class accuracy shrunk toward the mean: ``(n_j a_j + n0 ā) / (n_j + n0)``.

    ``ā`` is the mean accuracy of the present classes and ``n0 = strength``
    a pseudo-count. A class measured on few samples moves most of the way
    to the mean (its accuracy is mostly noise: one sample of two is 50
    points), a class with hundreds of samples keeps its own. Absent classes
    (NaN) stay NaN; ``strength=0`` returns the accuracies unchanged.

    Parameters
    ----------
    accuracy : ndarray (C,)
    counts : ndarray (C,)
        Samples per class behind ``accuracy``.
    strength : float
        ``n0 >= 0``.

    Returns
    -------
    ndarray (C,)

    Examples
    --------
    >>> shrink_accuracy(np.array([0.9, 0.9, 0.0]), np.array([100, 100, 2]), 5.0).round(3)
    array([0.886, 0.886, 0.429])
    """
    acc = np.asarray(accuracy, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    present = np.isfinite(acc) & (n > 0)
    if strength <= 0 or not present.any():
        return acc.copy()
    mean = float(acc[present].mean())
    out = acc.copy()
    out[present] = (n[present] * acc[present] + strength * mean) / (n[present] + strength)
    return out


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
        A candidate in which any class drops by more than this (against the
        current accepted state) is rolled back.
    max_total_class_drop : float or None, default=0.1
        A candidate in which any class has lost more than this since the
        trained model is rolled back. The paper's guard is per step only, so
        several accepted steps can add up to a large loss for one class;
        this caps the total (*ours*; None keeps the paper's rule).
    max_balanced_accuracy_drop : float or None, default=0.0
        A candidate whose balanced accuracy falls by more than this (against
        the current accepted state) is rolled back, so a step cannot buy a
        lower σ with a lower mean (*ours*; None keeps the paper's rule).
    imbalance_alpha : float in (0, 1) or None, default=0.05
        Before the loop, test whether the per-class accuracies on the
        selection data differ by more than their sampling noise
        (:func:`~hessrebal.metrics.imbalance_pvalue`, a χ² test of
        homogeneity); when the p-value exceeds ``imbalance_alpha`` there is
        no evidence of an imbalance to fix, the surgeon warns and takes no
        step (``perturbation_`` is zero). This is what keeps a balanced
        model intact (*ours*; None always runs the loop, as the paper does).
    refresh_spectrum : int, default=1
        Recompute the spectrum every this many steps (the paper: every step);
        0 computes it once. A refresh starts from the previous spikes. The
        refreshes make most of a fit's HVPs; measured on the benchmark
        models, 0 gave the same held-out results (docs/performance.md).
    selection_fraction : float or None, default=None
        Keep this stratified fraction of the validation data for the
        accept/rollback decision only (against fitting validation noise).
    acceptance : {"tolerance", "noise_aware"}, default="noise_aware"
        ``tolerance`` is the paper's rule; ``noise_aware`` (*ours*) also requires the
        σ improvement to exceed its standard error (from the samples whose
        prediction flipped), and lets a class drop beyond ``max_class_drop``
        veto a step only when the drop also exceeds its own standard error
        (so one flipped sample of a two-sample class is not a veto).
    class_shrinkage : float, default=5.0
        Pseudo-count ``n0``: the accuracies given to the coefficient problem
        (error weights, strong classes, the max–min objective) are shrunk
        toward their mean by :func:`shrink_accuracy`, so a class with few
        validation samples does not dominate the objective. 0 disables.
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
        Seeds the spectrum's start vectors and the selection split. Two fits
        with the same int on the same CPU give bitwise-identical results
        (``history_`` up to its ``"seconds"`` field).
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
        per-class accuracy, α, predicted loss increase, solver warnings,
        ``solver_failed`` (the solver failed and the step was zero),
        ``candidate_finite`` (False: the candidate's logits were NaN/inf and it
        was rolled back), HVPs, seconds. ``"seconds"`` is wall-clock time,
        the only field that differs between two identical fits.
    per_class_accuracy_before_, per_class_accuracy_after_ : ndarray (C,)
        On the selection data (the validation data unless
        ``selection_fraction`` is set).
    imbalance_pvalue_ : float
        The p-value of the imbalance test on the selection data (see
        ``imbalance_alpha``).
    n_hvp_ : int
        Hessian-vector products over the whole fit.
    parameter_names_ : list of str
    parameter_shapes_ : list of tuple
    initial_budget_ : float

    Notes
    -----
    Reliability (``docs/reliability.md``): every invalid argument, setting or
    strategy parameter raises ``ValueError``/``TypeError`` naming it before
    any Hessian product; ``fit`` leaves the model bitwise as it was (also when
    it raises or is interrupted) and, when it raises, keeps the surgeon's
    previous fitted state; :meth:`save`/:meth:`load` use safetensors + JSON,
    never pickle.

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
        max_total_class_drop: float | None = 0.1,
        max_balanced_accuracy_drop: float | None = 0.0,
        imbalance_alpha: float | None = 0.05,
        refresh_spectrum: int = 1,
        selection_fraction: float | None = None,
        acceptance: str = "noise_aware",
        class_shrinkage: float = 5.0,
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
        self.max_total_class_drop = max_total_class_drop
        self.max_balanced_accuracy_drop = max_balanced_accuracy_drop
        self.imbalance_alpha = imbalance_alpha
        self.refresh_spectrum = refresh_spectrum
        self.selection_fraction = selection_fraction
        self.acceptance = acceptance
        self.class_shrinkage = class_shrinkage
        self.curvature_penalty = curvature_penalty
        self.params = params
        self.curvature = curvature
        self.batch_size = batch_size
        self.device = device
        self.output_to_logits = output_to_logits
        self.random_state = random_state
        self.progress = progress

    @classmethod
    def paper_faithful(cls, **overrides: Any) -> SpectralSurgeon:
        """The paper's settings: finite-difference accuracy sensitivity, the
        paper's weight-power rule, γ-decay with γ = 0.7 and the per-step guards
        only (no total class-drop cap, no balanced-accuracy guard, the
        tolerance rule, no test for an imbalance before the loop).

        The defaults differ from these where held-out measurements said so
        (docs/method.md, "Defaults and the paper"). ``overrides`` are any
        other constructor arguments.

        Examples
        --------
        >>> s = SpectralSurgeon.paper_faithful(random_state=0)
        >>> s.acceptance, s.weight_power, s.max_total_class_drop
        ('tolerance', 'auto', None)
        """
        settings: dict[str, Any] = {
            "sensitivity": FiniteDifferenceSensitivity(), "amplitude": GammaDecay(gamma=0.7),
            "weight_power": "auto", "acceptance": "tolerance", "max_total_class_drop": None,
            "max_balanced_accuracy_drop": None, "imbalance_alpha": None,
        }
        settings.update(overrides)
        return cls(**settings)

    def set_params(self, **params: Any) -> SpectralSurgeon:
        """Set parameters, as scikit-learn's ``set_params``.

        A nested name on a strategy left at ``None`` (``amplitude__gamma``)
        first puts that strategy's default instance in place
        (``default_strategies()``, e.g. ``GammaDecay(gamma=0.7)``) and then
        sets the parameter on it, as :class:`~hessrebal.tuning.SpectralSurgeonSearch`
        does; ``GridSearchCV`` can therefore tune ``amplitude__gamma`` on a
        default surgeon.

        Raises
        ------
        ValueError
            For an unknown name, or a nested name whose strategy is set to
            ``None`` in the same call.
        """
        defaults: dict[str, Any] | None = None
        for key in params:
            prefix, sep, _ = key.partition("__")
            if not sep or prefix not in _STRATEGY_METHODS:
                continue
            if prefix in params:
                if params[prefix] is None:
                    raise ValueError(f"set_params got {prefix}=None together with {key!r}; "
                                     f"pass {prefix}=<strategy> to set its parameters.")
                continue  # the strategy given in the same call receives the name
            if getattr(self, prefix, None) is None:
                defaults = defaults if defaults is not None else default_strategies()
                setattr(self, prefix, defaults[prefix])
        return super().set_params(**params)

    # ------------------------------------------------------------------ fit
    def fit(self, model: Any, X_val: Any, y_val: Any = None, curvature_data: Any = None,
            process_group: Any = None) -> SpectralSurgeon:
        """Find the perturbation that rebalances ``model``'s per-class accuracy.

        Parameters
        ----------
        model : nn.Module or skorch net
            The trained classifier. It is not changed.
        X_val, y_val : tensor, ndarray, mapping, Dataset or DataLoader
            The validation (sensitivity) data; with a Dataset/DataLoader
            ``y_val`` is None. A mapping of named tensors (a dict, a
            tokenizer's ``BatchEncoding``) is passed as ``model(**X_val)``;
            its ``"labels"`` entry, if any, stands for ``y_val``.
        curvature_data : (X, y) tuple, Dataset or DataLoader, optional
            Where the Hessian is taken (the paper: 128–256 training images).
            Default: the validation data.
        process_group : torch.distributed ProcessGroup, optional
            Passed to :class:`HessianOperator`: each rank gives its own shard
            of ``curvature_data`` and the Hessian is the full-data one. Every
            rank passes the same ``X_val, y_val``; an unseeded fit uses rank
            0's seed everywhere, so all ranks return the same result.

        Returns
        -------
        self

        Raises
        ------
        TypeError, ValueError
            For an invalid argument, setting or strategy parameter, naming
            it, before any Hessian product is computed.

        Notes
        -----
        ``fit`` never writes to ``model``: its parameters, buffers (BatchNorm
        statistics) and every submodule's train/eval flag are bitwise the
        same after it returns, raises or is interrupted. When it raises, the
        surgeon keeps the fitted state it had before the call (none for a
        fresh surgeon).
        """
        previous = _fitted_attributes(self)
        try:
            # Under torch.distributed, a rank that raises makes the others
            # raise RankFailedError instead of waiting in a collective.
            with rank_failures(process_group):
                return self._fit(model, X_val, y_val, curvature_data, process_group)
        except BaseException:
            for key in _fitted_attributes(self):
                delattr(self, key)
            self.__dict__.update(previous)
            raise

    def _fit(self, model: Any, X_val: Any, y_val: Any, curvature_data: Any,
             process_group: Any) -> SpectralSurgeon:
        # Everything checkable is checked before the first Hessian product.
        self._validate_params()
        strategies = self._strategies()
        spectrum_backend, sensitivity, solver, amplitude = (
            strategies[name] for name in _STRATEGY_METHODS)
        module = unwrap_model(model)
        check_finite_parameters(module)
        module = self._working_module(module)
        space = ParameterSpace(module, self.params)
        fmodel = FunctionalModel(module, space, self.output_to_logits)
        val = as_data(X_val, y_val, name="X_val", y_name="y_val")
        n_classes = self._check_data(fmodel, val, val.name, val.y_name, validation=True)
        curv = (val if curvature_data is None
                else as_data(curvature_data, name="curvature_data", y_name="curvature_data"))
        if curvature_data is not None:
            self._check_data(fmodel, curv, "curvature_data", "curvature_data")
        k_wanted = self._n_wanted(n_classes, space.dim)
        sens_data, sel_data = self._split_selection(val, n_classes, process_group,
                                                    space.device)

        theta0 = fmodel.initial_theta()
        theta = theta0.clone()
        sel_state = _evaluate(fmodel, theta, sel_data, n_classes, self.batch_size)
        if not sel_state["finite"]:
            raise ValueError(f"model gives NaN or infinite logits on {val.name} at its trained "
                             "parameters" + _non_finite_buffer_hint(module) + ".")
        sens_acc = (sel_state["acc"] if sens_data is sel_data else
                    _evaluate(fmodel, theta, sens_data, n_classes, self.batch_size)["acc"])
        sens_counts = np.bincount(sens_data.labels().numpy(), minlength=n_classes)[:n_classes]
        self.n_hvp_ = 0

        # Unconverged eigenpairs are reported once per fit, not at every refresh.
        convergence_notes: list[dict[str, Any]] = []
        n_spectra = 0

        def spectrum_at(point: torch.Tensor, init: torch.Tensor | None, k: int):
            nonlocal n_spectra
            op = HessianOperator(module, curv, params=self.params, curvature=self.curvature,
                                 batch_size=self.batch_size,
                                 output_to_logits=self.output_to_logits,
                                 process_group=process_group, theta=point)
            with collect_convergence_notes() as notes:
                if self.progress:
                    with _ProgressOperator(op, "spectrum" if init is None
                                           else "spectrum refresh") as shown:
                        spec = _compute_spectrum(spectrum_backend, shown, k, init)
                else:
                    spec = _compute_spectrum(spectrum_backend, op, k, init)
            convergence_notes.extend(notes)
            n_spectra += 1
            self.n_hvp_ += op.n_matvec
            return spec

        spec = spectrum_at(theta, None, k_wanted)
        eigenvalues = _to_numpy(spec.eigenvalues)
        if not _finite_spectrum(eigenvalues, spec.eigenvectors):
            raise ValueError("The curvature at the trained model has NaN or infinite eigenpairs "
                             "(the loss overflows on curvature_data?).")
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
        budget = _check_budget(amplitude.initial(budget0, max(1, self.max_steps)))

        self.per_class_accuracy_before_ = sel_state["acc"].copy()
        history: list[dict[str, Any]] = []
        self.sensitivity_ = None
        stale = False

        steps = range(self._n_steps(sel_state, n_classes))
        if self.progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="spectral surgery", leave=False)
        for t in steps:
            start = time.perf_counter()
            hvp_before = self.n_hvp_
            if stale and self.refresh_spectrum and t % self.refresh_spectrum == 0:
                spec = spectrum_at(theta, Q, k)
                new_values = _to_numpy(spec.eigenvalues)[:k]
                if _finite_spectrum(new_values, spec.eigenvectors[:, :k]):
                    Q = spec.eigenvectors[:, :k]
                    eigenvalues = new_values
                    stale = False
                else:
                    warnings.warn("The refreshed spectrum has NaN or infinite values; keeping "
                                  "the previous spikes.", RuntimeWarning, stacklevel=3)
            S = np.asarray(sensitivity.estimate(fmodel, theta, Q, sens_data, n_classes,
                                                budget=budget, batch_size=self.batch_size),
                           dtype=np.float64)
            if S.shape != (n_classes, k):
                raise ValueError(f"sensitivity.estimate returned shape {S.shape}; expected "
                                 f"({n_classes}, {k}).")
            if self.sensitivity_ is None:
                self.sensitivity_ = S.copy()
            present = np.isfinite(sens_acc)
            if np.all(np.isfinite(S[present])):
                # Few-sample classes are pulled toward the mean before they
                # set weights, strong classes and the worst class.
                problem_acc = shrink_accuracy(sens_acc, sens_counts, float(self.class_shrinkage))
                problem = CoefficientProblem(
                    sensitivity=S, accuracy=problem_acc, eigenvalues=eigenvalues,
                    budget=budget, objective=self.objective,
                    weight_power=self._weight_power(problem_acc),
                    strong_threshold=self.strong_threshold,
                    preserve_tolerance=self.preserve_tolerance, budget_shape=self.budget_shape,
                    curvature_penalty=self.curvature_penalty,
                )
                alpha, solver_messages, solver_failed = _solve(solver, problem)
                zero_reason = "solver failed" if solver_failed else "zero step"
            else:
                warnings.warn(f"Step {t}: the sensitivity has NaN or infinite values; taking a "
                              "zero step.", RuntimeWarning, stacklevel=3)
                alpha, solver_messages, solver_failed = np.zeros(k), [], False
                zero_reason = "non-finite sensitivity"
            entry: dict[str, Any] = {
                "step": t, "budget": budget, "alpha": alpha.tolist(),
                "predicted_loss_increase": 0.5 * float(np.sum(eigenvalues * alpha**2)),
                "solver_warnings": solver_messages, "solver_failed": solver_failed,
            }
            if not np.any(alpha):
                accepted, reason, signal, cand = False, zero_reason, 0.0, None
            else:
                step = Q @ torch.as_tensor(alpha, dtype=Q.dtype, device=Q.device)
                candidate = theta + step
                cand = _evaluate(fmodel, candidate, sel_data, n_classes, self.batch_size)
                accepted, reason, signal = self._decide(sel_state, cand,
                                                        self.per_class_accuracy_before_)
            if accepted:
                theta = candidate
                sel_state = cand
                sens_acc = (cand["acc"] if sens_data is sel_data else
                            _evaluate(fmodel, theta, sens_data, n_classes, self.batch_size)["acc"])
                stale = True
            shown = cand is not None and cand["finite"]
            entry.update({
                "accepted": accepted, "reason": reason,
                "class_std": class_std(sel_state["acc"]),
                "balanced_accuracy": balanced_accuracy(sel_state["acc"]),
                "per_class_accuracy": sel_state["acc"].tolist(),
                "candidate_finite": None if cand is None else cand["finite"],
                "candidate_class_std": cand["std"] if shown else None,
                "candidate_balanced_accuracy": balanced_accuracy(cand["acc"]) if shown else None,
                "n_hvp": self.n_hvp_ - hvp_before,
                "seconds": time.perf_counter() - start,
            })
            history.append(entry)
            budget = _check_budget(amplitude.update(accepted, signal))
            if self.progress:
                steps.set_postfix(sigma=f"{entry['class_std']:.4f}", budget=f"{budget:.3g}")

        summary = convergence_summary(convergence_notes, n_spectra)
        if summary is not None:
            warnings.warn(summary, ConvergenceWarning, stacklevel=3)
        self.history_ = history
        self.perturbation_ = (theta - theta0).detach()
        self.coef_ = _to_numpy(self.eigenvectors_.T @ self.perturbation_)
        self.predicted_loss_increase_ = 0.5 * float(np.sum(self.eigenvalues_ * self.coef_**2))
        self.per_class_accuracy_after_ = sel_state["acc"].copy()
        self.classes_ = np.arange(n_classes)
        self.n_classes_ = n_classes
        self.parameter_names_ = list(space.names)
        self.parameter_shapes_ = [tuple(s) for s in space.shapes]
        self.weights_fingerprint_ = _weights_fingerprint(module, self.parameter_names_)
        return self

    # ------------------------------------------------------------ transform
    def transform(self, model: Any, copy: bool = True, check_weights: str = "warn") -> Any:
        """Return ``model`` with ``θ₀ + perturbation_`` in the selected parameters.

        Parameters
        ----------
        model : nn.Module or skorch net
            A model with the fitted parameter names and shapes.
        copy : bool, default=True
            ``False`` changes ``model`` in place (on request only).
        check_weights : {"warn", "raise", "ignore"}, default="warn"
            What to do when ``model``'s selected weights are not bitwise the
            ones ``fit`` saw (``weights_fingerprint_``, a SHA-256 of θ₀): the
            perturbation was computed for those weights, and names and shapes
            alone do not tell another trained model of the same architecture
            apart. A surgeon saved before fingerprints existed skips the check.

        Returns
        -------
        nn.Module or skorch net

        Raises
        ------
        NotFittedError
            Before :meth:`fit` (or :meth:`load`).
        ValueError
            When ``model`` lacks a fitted parameter or holds it with another
            shape (the first mismatch is named); with ``check_weights="raise"``,
            when its weights differ from the fitted ones.
        """
        check_is_fitted(self, "perturbation_")
        space = self._fitted_space(model)
        self._check_weights(model, check_weights)
        return space.apply(model, self.perturbation_, copy=copy)

    def fit_transform(self, model: Any, X_val: Any, y_val: Any = None,
                      **fit_params: Any) -> Any:
        """``fit(model, X_val, y_val, **fit_params).transform(model)``."""
        return self.fit(model, X_val, y_val, **fit_params).transform(model)

    def score(self, model: Any, X: Any, y: Any = None) -> float:
        """Balanced accuracy of ``transform(model)`` on ``(X, y)``."""
        check_is_fitted(self, "perturbation_")
        space = self._fitted_space(model)
        self._check_weights(model, "warn")
        fmodel = FunctionalModel(model, space, self.output_to_logits)
        data = as_data(X, y)
        theta = fmodel.initial_theta() + self.perturbation_.to(fmodel.device, fmodel.dtype)
        logits, labels = predict_logits(fmodel, theta, data, self.batch_size)
        C = logits.shape[1]
        check_label_range(labels, C)
        return balanced_accuracy(per_class_accuracy(labels, logits.argmax(1), C))

    # ---------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the settings and the fitted state to one file, without pickle.

        Tensors and numeric arrays (``perturbation_``, ``eigenvectors_``,
        ``eigenvalues_``, ``coef_``, ``sensitivity_``, per-class accuracies)
        are stored in safetensors format; the constructor parameters (a
        strategy as its class name and parameters), the other fitted
        attributes (``history_``, ``parameter_names_``, shapes, ...), a
        SHA-256 of every tensor and the library versions are JSON in the
        file's header.

        Parameters
        ----------
        path : str or path-like
            The file to write (overwritten).

        Returns
        -------
        pathlib.Path

        Raises
        ------
        NotFittedError
            Before :meth:`fit`.
        ValueError
            When a parameter cannot be stored without pickle: a callable
            ``params`` (``set_params(params=surgeon.parameter_names_)``
            selects the same parameters by name) or ``output_to_logits`` (set
            it to None, and again after :meth:`load`), a strategy that is not
            one of hessrebal's classes, or any other non-JSON value.
        """
        check_is_fitted(self, "perturbation_")
        params = {}
        for name, value in self.get_params(deep=False).items():
            if callable(value) and type(value).__name__ not in _STRATEGY_CLASSES:
                hint = {"params": " set_params(params=surgeon.parameter_names_) selects the "
                                  "same parameters by name and can be saved.",
                        "output_to_logits": " Set output_to_logits=None before saving and set "
                                            "it again after load()."}.get(name, "")
                raise ValueError(f"Cannot save {name}={value!r}: a callable cannot be stored "
                                 f"without pickle.{hint}")
            params[name] = _encode(value, name, strategies=True)
        tensors: dict[str, torch.Tensor] = {}
        kinds: dict[str, str] = {}
        fitted: dict[str, Any] = {}
        for key, value in _fitted_attributes(self).items():
            if isinstance(value, torch.Tensor):
                tensors[key], kinds[key] = value, "tensor"
            elif isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
                tensors[key] = torch.from_numpy(np.ascontiguousarray(value))
                kinds[key] = "ndarray"
            else:
                fitted[key] = _encode(value, key)
        from . import __version__

        meta = {
            "params": params, "fitted": fitted, "tensors": kinds,
            "devices": {k: str(t.device) for k, t in tensors.items()},
            "sha256": {k: _digest(t) for k, t in tensors.items()},
            "versions": {"hessrebal": __version__, "torch": torch.__version__,
                         "numpy": np.__version__, "python": platform.python_version()},
        }
        return save_state(path, tensors, meta, kind=type(self).__name__, version=_FORMAT_VERSION)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SpectralSurgeon:
        """Read a surgeon written by :meth:`save`.

        Nothing in the file is executed: strategies are rebuilt only from an
        allow-list of hessrebal classes, and every tensor is checked against
        its SHA-256. Tensors come back on the CPU; :meth:`transform` moves the
        perturbation to the model's device.

        Parameters
        ----------
        path : str or path-like

        Returns
        -------
        SpectralSurgeon
            Fitted; ``get_params()`` equals the saved surgeon's and
            :meth:`transform` gives bitwise the same model.

        Raises
        ------
        FileNotFoundError
        ValueError
            For a pickle, a ``torch.save`` file, a truncated or corrupt file,
            a file of another kind or a newer format, an unknown strategy
            class or a checksum mismatch.
        """
        tensors, meta = load_state(path, expected_kind=cls.__name__, max_version=_FORMAT_VERSION)
        try:
            return cls._from_state(tensors, meta)
        except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:
            raise ValueError(f"{path} does not hold a valid {cls.__name__}: {exc}") from exc

    @classmethod
    def _from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]):
        if not isinstance(meta.get("params"), dict) or not isinstance(meta.get("fitted"), dict):
            raise ValueError("missing settings or fitted state")
        obj = cls(**{str(k): _decode(v, strategies=True) for k, v in meta["params"].items()})
        kinds, digests = meta["tensors"], meta["sha256"]
        if set(kinds) != set(tensors):
            raise ValueError(f"the tensors {sorted(tensors)} do not match the header's "
                             f"{sorted(kinds)}")
        for key, kind in kinds.items():
            _check_attribute_name(cls, key)
            t = tensors[key]
            if _digest(t) != digests.get(key):
                raise ValueError(f"tensor '{key}' is corrupt (SHA-256 mismatch)")
            if kind not in ("tensor", "ndarray"):
                raise ValueError(f"unknown tensor kind {kind!r}")
            setattr(obj, key, t if kind == "tensor" else t.numpy().copy())
        for key, value in meta["fitted"].items():
            _check_attribute_name(cls, key)
            setattr(obj, key, _decode(value))
        obj._check_loaded_state()
        return obj

    def _check_loaded_state(self) -> None:
        names, shapes = self.parameter_names_, self.parameter_shapes_
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)
                and isinstance(shapes, list) and len(shapes) == len(names)):
            raise ValueError("parameter_names_/parameter_shapes_ are inconsistent")
        dim = sum(math.prod(int(d) for d in shape) for shape in shapes)
        p, Q = self.perturbation_, self.eigenvectors_
        if not (isinstance(p, torch.Tensor) and p.shape == (dim,)):
            raise ValueError(f"perturbation_ must have shape ({dim},)")
        if not (isinstance(Q, torch.Tensor) and Q.ndim == 2 and Q.shape[0] == dim):
            raise ValueError(f"eigenvectors_ must have {dim} rows")

    # ------------------------------------------------------------- helpers
    def _check_weights(self, model: Any, check_weights: str) -> None:
        if check_weights not in ("warn", "raise", "ignore"):
            raise ValueError("check_weights must be 'warn', 'raise' or 'ignore'; got "
                             f"{check_weights!r}.")
        expected = getattr(self, "weights_fingerprint_", None)
        if check_weights == "ignore" or expected is None:
            return
        got = _weights_fingerprint(unwrap_model(model), self.parameter_names_)
        if got == expected:
            return
        message = ("the model's weights differ from those the surgeon was fitted on (θ₀ "
                   "fingerprint mismatch): the perturbation was computed for the fitted "
                   "weights and may not help, or may harm, these. Pass "
                   "check_weights='ignore' if this is intended.")
        if check_weights == "raise":
            raise ValueError(message)
        warnings.warn(message, UserWarning, stacklevel=3)

    def _fitted_space(self, model: Any) -> ParameterSpace:
        params = dict(unwrap_model(model).named_parameters())
        for name, fitted in zip(self.parameter_names_, self.parameter_shapes_):
            if name not in params:
                raise ValueError(f"model has no parameter '{name}' (the fitted surgeon moves it).")
            if tuple(params[name].shape) != tuple(fitted):
                raise ValueError(f"model.{name} has shape {tuple(params[name].shape)}; the "
                                 f"surgeon was fitted on shape {tuple(fitted)}.")
        wanted = set(self.parameter_names_)
        space = ParameterSpace(model, lambda n, p: n in wanted)
        if space.names != self.parameter_names_:
            first = next(i for i, (a, b) in enumerate(zip(space.names, self.parameter_names_))
                         if a != b)
            raise ValueError(f"model orders its parameters differently from the fitted one: "
                             f"'{space.names[first]}' comes where the surgeon has "
                             f"'{self.parameter_names_[first]}'.")
        return space

    def _validate_params(self) -> None:
        def positive(name: str, value: Any, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if not isinstance(value, Real) or isinstance(value, bool) or not value > 0 \
                    or not math.isfinite(value):
                raise ValueError(f"{name} must be a positive number; got {value!r}.")

        def non_negative(name: str, value: Any) -> None:
            if not isinstance(value, Real) or isinstance(value, bool) or not value >= 0 \
                    or not math.isfinite(value):
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
        if self.max_total_class_drop is not None:
            non_negative("max_total_class_drop", self.max_total_class_drop)
        if self.max_balanced_accuracy_drop is not None:
            non_negative("max_balanced_accuracy_drop", self.max_balanced_accuracy_drop)
        alpha = self.imbalance_alpha
        if alpha is not None and not (isinstance(alpha, Real) and not isinstance(alpha, bool)
                                      and 0 < alpha < 1):
            raise ValueError("imbalance_alpha must be a float in (0, 1) or None; got "
                             f"{self.imbalance_alpha!r}.")
        for name in ("max_std_increase", "max_class_drop", "preserve_tolerance",
                     "curvature_penalty", "class_shrinkage"):
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
        rs = self.random_state
        if rs is not None and (isinstance(rs, bool) or not isinstance(rs, Integral)
                               or not 0 <= rs < 2**32):
            raise ValueError(f"random_state must be None or an int in [0, 2**32); got {rs!r}.")

    def _strategies(self) -> dict[str, Any]:
        """Private, validated copies of the four strategies (defaults for None).

        Each must have its protocol's methods; hessrebal's own classes check
        their parameters here (``_check_params``/``_validate``), and an
        amplitude controller through ``initial`` (grow > 1, shrink and gamma
        in (0, 1), ...), so a bad setting fails before the first product.
        """
        defaults = default_strategies()
        out = {}
        for name, methods in _STRATEGY_METHODS.items():
            given = getattr(self, name)
            strategy = self._strategy(given, defaults[name])
            for method in methods:
                if not callable(getattr(strategy, method, None)):
                    raise TypeError(f"{name} must have a {method}() method (see 'Swapping "
                                    "strategies' in docs/user-guide.md); got "
                                    f"{type(given).__name__}.")
            check = getattr(strategy, "_check_params", None) or getattr(strategy, "_validate",
                                                                        None)
            try:
                if callable(check):
                    check()
                if name == "amplitude":
                    # The loop calls initial() again with the real budget.
                    strategy.initial(1.0 if self.budget is None else float(self.budget),
                                     max(1, self.max_steps))
            except (TypeError, ValueError) as exc:
                kind = TypeError if isinstance(exc, TypeError) else ValueError
                raise kind(f"{name}={given!r}: {exc}") from exc
            out[name] = strategy
        return out

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
                    y_name: str, validation: bool = False) -> int:
        first = next(iter(data.chunks(self.batch_size, fmodel.device, fmodel.dtype)), None)
        if first is None:
            raise ValueError(f"{x_name} is empty (0 samples).")
        n_classes = fmodel.probe(first[0], x_name)
        labels = data.labels()
        check_label_range(labels, n_classes, y_name)
        if validation:
            self._warn_probabilities(fmodel, first[0])
            counts = np.bincount(labels.numpy(), minlength=n_classes)
            absent = np.flatnonzero(counts == 0)
            if absent.size:
                warnings.warn(
                    f"Classes {absent.tolist()} have no sample in {y_name}; they are left out "
                    "of the objective, the constraints and σ.", UserWarning, stacklevel=4)
            few = np.flatnonzero((counts > 0) & (counts < FEW_SAMPLES))
            if few.size:
                warnings.warn(
                    f"Classes {few.tolist()} have fewer than {FEW_SAMPLES} samples in {y_name} "
                    f"({counts[few].tolist()}): their accuracy is noisy. The objective shrinks "
                    f"them toward the mean (class_shrinkage={self.class_shrinkage}); "
                    "acceptance='noise_aware' also discounts their noise in the rollback rule.",
                    UserWarning, stacklevel=4)
        return n_classes

    def _warn_probabilities(self, fmodel: FunctionalModel, x: torch.Tensor) -> None:
        # The same test LogitAdjustment uses; the surgery's cross-entropy
        # Hessian and its margin surrogate both read the outputs as logits.
        from .baselines import _looks_like_probabilities

        with torch.no_grad():
            z = fmodel.logits(fmodel.initial_theta(), x).detach().float().cpu()
        if _looks_like_probabilities(z):
            warnings.warn(
                "SpectralSurgeon: the model's outputs are probabilities (non-negative rows "
                "summing to 1), but the surgery reads them as logits (its loss is "
                "cross-entropy of their softmax). Remove the final softmax, or pass "
                "output_to_logits=lambda p: torch.log(p.clamp_min(1e-12)).",
                UserWarning, stacklevel=5)

    def _split_selection(self, val: LabelledData, n_classes: int, process_group: Any,
                         device: torch.device):
        if self.selection_fraction is None:
            return val, val
        labels = val.labels().numpy()
        seed = self.random_state
        if seed is None and process_group is not None:
            # Unseeded ranks would split differently and their surgeries diverge.
            seed = broadcast_seed(int(np.random.SeedSequence().generate_state(1)[0]),
                                  process_group, device)
        kept, held = stratified_holdout(labels, self.selection_fraction, seed)
        return val.subset(kept), val.subset(held)

    def _strategy(self, given: Any, default: Any) -> Any:
        # safe=False: a user's strategy need not be a BaseEstimator (deep copy).
        strategy = clone(given, safe=False) if given is not None else default
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

    def _n_steps(self, sel_state: dict[str, Any], n_classes: int) -> int:
        """``max_steps``, or 0 when the selection data show no imbalance."""
        self.imbalance_pvalue_ = imbalance_pvalue(sel_state["y"], sel_state["correct"],
                                                  n_classes)
        if self.imbalance_alpha is None or self.imbalance_pvalue_ <= self.imbalance_alpha:
            return self.max_steps
        warnings.warn(
            "The per-class accuracies differ no more than their sampling noise (χ² test, "
            f"p = {self.imbalance_pvalue_:.3f} > imbalance_alpha={self.imbalance_alpha}): no "
            "step was taken. Pass imbalance_alpha=None to run the surgery anyway.",
            UserWarning, stacklevel=4)
        return 0

    def _weight_power(self, accuracy: np.ndarray) -> float:
        if self.weight_power == "auto":
            return _weight_power_rule(accuracy)
        return float(self.weight_power)

    def _decide(self, old: dict[str, Any], new: dict[str, Any],
                initial_acc: np.ndarray) -> tuple[bool, str, float]:
        """Accept or roll back a candidate; returns (accepted, reason, signal)."""
        if not new["finite"]:
            return False, "non-finite logits", -1.0
        present = np.isfinite(old["acc"])
        drops = np.where(present, old["acc"] - new["acc"], -np.inf)
        drop = float(np.max(drops[present]))
        rise = new["std"] - old["std"]
        if rise > self.max_std_increase:
            return False, f"sigma rose by {rise:.4f}", -max(drop, rise, 0.0)
        if self.max_total_class_drop is not None:
            total = float(np.max((initial_acc - new["acc"])[present]))
            if total > self.max_total_class_drop:
                return False, f"a class lost {total:.4f} in total", -max(drop, total, 0.0)
        if self.max_balanced_accuracy_drop is not None:
            fall = balanced_accuracy(old["acc"]) - balanced_accuracy(new["acc"])
            if fall > self.max_balanced_accuracy_drop:
                return (False, f"balanced accuracy fell by {fall:.4f}",
                        -max(drop, fall, 0.0))
        vetoes = drops > self.max_class_drop
        noisy = self.acceptance == "noise_aware"
        if noisy:
            # A drop vetoes only beyond its own standard error: one flipped
            # sample of a two-sample class is noise, not a lost class.
            vetoes &= drops > _class_change_standard_error(old, new)
        if vetoes.any():
            return False, f"a class dropped by {float(drops[vetoes].max()):.4f}", -max(drop, 0.0)
        if noisy:
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
class _ProgressOperator:
    """The operator, with a tqdm bar counting its Hessian-vector products."""

    def __init__(self, operator: HessianOperator, desc: str) -> None:
        self._op = operator
        self._desc = desc
        self.shape, self.dtype, self.device = operator.shape, operator.dtype, operator.device

    def __enter__(self) -> _ProgressOperator:
        from tqdm.auto import tqdm

        self._bar = tqdm(desc=self._desc, unit="HVP", leave=False)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bar.close()

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        out = self._op.matvec(v)
        self._bar.update(1 if v.ndim == 1 else v.shape[1])
        return out

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._op, name)


def _to_numpy(t: Any) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().to(torch.float64).numpy()
    return np.asarray(t, dtype=np.float64)


def _compute_spectrum(backend: Any, op: HessianOperator, k: int, init: torch.Tensor | None):
    if init is not None and "init" in inspect.signature(backend.compute).parameters:
        return backend.compute(op, k, init=init)
    return backend.compute(op, k)


#: Errors that mean a broken solver (wrong signature, missing package), not a
#: numerical failure: they propagate instead of becoming a zero step.
_PROGRAMMING_ERRORS = (TypeError, AttributeError, NameError, ImportError)


def _solve(solver: Any, problem: CoefficientProblem) -> tuple[np.ndarray, list[str], bool]:
    """Solve, turning a numerical failure into a zero step whose warning is recorded.

    Returns ``(alpha, warning messages, failed)``. ``failed`` is True when
    the solver raised, returned a non-finite or misshapen step, or reported
    its own failure with a :class:`SolverWarning`.
    """
    k = problem.sensitivity.shape[1]
    failure = None
    with PROCESS_STATE_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            alpha = np.asarray(solver.solve(problem), dtype=np.float64).reshape(-1)
        except _PROGRAMMING_ERRORS:
            raise
        except Exception as exc:
            failure = f"{type(solver).__name__} failed ({type(exc).__name__}: {exc})"
            alpha = np.zeros(k)
    if failure is None and (alpha.shape != (k,) or not np.all(np.isfinite(alpha))):
        failure = f"{type(solver).__name__} returned a non-finite or misshapen step"
    messages = []
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        messages.append(str(w.message))
    if failure is not None:
        message = f"{failure}; taking a zero step."
        warnings.warn(message, SolverWarning, stacklevel=3)
        return np.zeros(k), messages + [message], True
    failed = any(issubclass(w.category, SolverWarning) for w in caught) and not np.any(alpha)
    return alpha, messages, failed


def _evaluate(fmodel: FunctionalModel, theta: torch.Tensor, data: LabelledData,
              n_classes: int, batch_size: int) -> dict[str, Any]:
    logits, y = predict_logits(fmodel, theta, data, batch_size)
    finite = bool(torch.isfinite(logits).all())
    pred = logits.argmax(1)
    acc = per_class_accuracy(y, pred, n_classes)
    return {"acc": acc, "std": class_std(acc), "correct": (pred == y).numpy(),
            "y": y.numpy(), "finite": finite}


def _class_change_standard_error(old: dict[str, Any], new: dict[str, Any]) -> np.ndarray:
    """Per-class standard error of ``a_j,new − a_j,old`` on the same samples:
    ``sqrt(flips_j) / n_j`` (McNemar; NaN-free, ``inf`` for an absent class)."""
    y = old["y"]
    C = new["acc"].size
    flips = (old["correct"] != new["correct"]).astype(np.float64)
    n = np.bincount(y, minlength=C).astype(np.float64)
    f = np.bincount(y, weights=flips, minlength=C)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.sqrt(f) / n, np.inf)


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


def _fitted_attributes(obj: Any) -> dict[str, Any]:
    """Public attributes ending in ``_``: the fitted state (scikit-learn's rule)."""
    return {k: v for k, v in vars(obj).items() if k.endswith("_") and not k.startswith("_")}


def _check_budget(value: Any) -> float:
    budget = float(value)
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"amplitude returned the budget {value!r}; a budget must be a "
                         "positive finite number.")
    return budget


def _finite_spectrum(eigenvalues: np.ndarray, eigenvectors: torch.Tensor) -> bool:
    return bool(np.all(np.isfinite(eigenvalues)) and torch.isfinite(eigenvectors).all())


def _non_finite_buffer_hint(module: torch.nn.Module) -> str:
    for name, b in module.named_buffers():
        if b.is_floating_point() and not torch.isfinite(b).all():
            return f" (its buffer '{name}' holds NaN or infinite values)"
    return ""


# ------------------------------------------------------------- persistence
_TAG = "__hessrebal__"


def _digest(t: torch.Tensor) -> str:
    raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()


def _weights_fingerprint(module: torch.nn.Module, names: list[str]) -> str:
    """SHA-256 of the named parameters' values, dtypes and shapes, wherever they live."""
    params = dict(module.named_parameters())
    h = hashlib.sha256()
    for name in names:
        t = params[name].detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_attribute_name(cls: type, key: Any) -> None:
    if not (isinstance(key, str) and key.isidentifier() and key.endswith("_")
            and not key.startswith("_") and not hasattr(cls, key)):
        raise ValueError(f"invalid fitted attribute name {key!r}")


def _encode(value: Any, name: str, strategies: bool = False) -> Any:
    """``value`` as JSON types; tuples, non-finite floats, devices, dtypes,
    numeric arrays and (with ``strategies``) hessrebal strategies are tagged
    so that :func:`_decode` gives back an equal value."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real):
        f = float(value)
        return f if math.isfinite(f) else {_TAG: "float", "value": repr(f)}
    if isinstance(value, torch.device):
        return {_TAG: "device", "value": str(value)}
    if isinstance(value, torch.dtype):
        return {_TAG: "dtype", "value": str(value).removeprefix("torch.")}
    if isinstance(value, tuple):
        return {_TAG: "tuple",
                "items": [_encode(v, f"{name}[{i}]", strategies) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{name}[{i}]", strategies) for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value) and _TAG not in value:
        return {k: _encode(v, f"{name}[{k!r}]", strategies) for k, v in value.items()}
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return {_TAG: "ndarray", "dtype": value.dtype.str, "shape": list(value.shape),
                "items": [_encode(v, name) for v in value.reshape(-1).tolist()]}
    cls = type(value)
    if strategies and _STRATEGY_CLASSES.get(cls.__name__) is cls:
        return {_TAG: "strategy", "class": cls.__name__,
                "params": {k: _encode(v, f"{name}__{k}", strategies)
                           for k, v in value.get_params(deep=False).items()}}
    what = ("a strategy that is not one of hessrebal's classes "
            f"({sorted(_STRATEGY_CLASSES)})" if strategies and hasattr(value, "get_params")
            else f"a {cls.__name__}")
    raise ValueError(f"Cannot save {name}={value!r}: {what} cannot be stored without pickle.")


def _decode(value: Any, strategies: bool = False, depth: int = 0) -> Any:
    """Inverse of :func:`_encode`; builds nothing outside its allow-list."""
    if depth > 64:
        raise ValueError("nested too deeply")
    if isinstance(value, list):
        return [_decode(v, strategies, depth + 1) for v in value]
    if not isinstance(value, dict):
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise ValueError(f"unexpected JSON value {value!r}")
    tag = value.get(_TAG)
    if tag is None:
        return {k: _decode(v, strategies, depth + 1) for k, v in value.items()}
    if tag == "float":
        if value["value"] not in ("nan", "inf", "-inf"):
            raise ValueError(f"invalid float {value['value']!r}")
        return float(value["value"])
    if tag == "tuple":
        return tuple(_decode(v, strategies, depth + 1) for v in value["items"])
    if tag == "device":
        return torch.device(str(value["value"]))
    if tag == "dtype":
        dtype = getattr(torch, str(value["value"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {value['value']!r}")
        return dtype
    if tag == "ndarray":
        dtype = np.dtype(str(value["dtype"]))
        if dtype.kind not in "biuf":
            raise ValueError(f"refusing an array of dtype {dtype}")
        items = [_decode(v, False, depth + 1) for v in value["items"]]
        return np.array(items, dtype=dtype).reshape([int(d) for d in value["shape"]])
    if tag == "strategy":
        cls = _STRATEGY_CLASSES.get(value.get("class")) if strategies else None
        if cls is None:
            raise ValueError(f"{value.get('class')!r} is not a hessrebal strategy class that "
                             "load() may construct")
        return cls(**{str(k): _decode(v, True, depth + 1) for k, v in value["params"].items()})
    raise ValueError(f"unknown tag {tag!r}")
