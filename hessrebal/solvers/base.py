"""The coefficient problem of Spectral Surgery and the solver protocol.

Given the spike–class sensitivity ``S`` (C × k), the current per-class accuracy
``a`` and a budget, a solver chooses the coefficients ``alpha`` (k,) of the step
``delta_theta = sum_i alpha_i q_i`` along the spike eigenvectors.

Two objectives are offered (docs/method.md §5):

``"weighted"``
    maximise ``sum_j w_j (S alpha)_j - (mu/2) sum_i |lambda_i| alpha_i^2`` with
    error weights ``w_j = e_j^p / sum_k e_k^p``, ``e_j = 1 - a_j``.
``"maxmin"``
    maximise ``min_j (a_j + (S alpha)_j) - (mu/2) sum_i |lambda_i| alpha_i^2``,
    the worst linearised class accuracy.

Both are subject to the budget (the L2 ball ``||alpha||_2 <= budget`` or the
per-spike box ``|alpha_i| <= budget * sqrt(lambda_ref / |lambda_i|)``) and to
the preservation of strong classes, ``(S alpha)_j >= -preserve_tolerance`` for
every present class with ``a_j > strong_threshold``.

``alpha = 0`` always satisfies every constraint, so a problem is never truly
infeasible; a solver that fails numerically falls back to that zero step and
emits a :class:`SolverWarning`.

Without a curvature penalty the optimum need not be unique (for instance a
max–min problem whose worst class has a zero sensitivity row: every step that
keeps the others above it is optimal); solvers may then return different
optimal steps. A small ``curvature_penalty`` selects the cheapest one.
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator

__all__ = ["CoefficientProblem", "CoefficientSolver", "SolverWarning"]

from .._validation import OBJECTIVES as _OBJECTIVES

_BUDGET_SHAPES = ("l2", "box")

#: Eigenvalues with ``|lambda| < _FLAT_RTOL * max|lambda|`` count as flat
#: directions in :meth:`CoefficientProblem.box_bounds`.
_FLAT_RTOL = 1e-6


class SolverWarning(UserWarning):
    """A coefficient solver failed and returned the zero step instead."""


def _check_real(value, name: str, *, positive: bool = False, nonnegative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}.")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}.")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0; got {value}.")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0; got {value}.")
    return value


def _as_float_array(value, name: str, ndim: int) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a numeric array: {exc}") from exc
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got shape {arr.shape}.")
    return arr


@dataclass
class CoefficientProblem:
    """One instance of the coefficient problem (docs/method.md §5).

    Parameters
    ----------
    sensitivity : ndarray of shape (C, k)
        ``S[j, i]``: derivative of the class-``j`` score with respect to
        ``alpha_i``. Rows of absent classes are ignored and may be NaN.
    accuracy : ndarray of shape (C,)
        Current per-class accuracy ``a_j`` in [0, 1]. NaN marks a class absent
        from the sensitivity data; it is left out of the objective and the
        constraints.
    eigenvalues : ndarray of shape (k,)
        Spike eigenvalues (descending). The Hessian may be indefinite, so
        negative values are allowed: the box budget and the curvature penalty
        use ``|lambda_i|`` (the penalty then stays convex);
        :meth:`predicted_loss_increase` keeps the sign (it is the Taylor term).
    budget : float
        ``alpha_max > 0``.
    objective : {"weighted", "maxmin"}, default="weighted"
    weight_power : float, default=1.0
        ``p >= 0`` in ``w_j = e_j^p / sum_k e_k^p``; ``p = 0`` gives uniform
        weights over the present classes.
    strong_threshold : float, default=0.85
        Present classes with ``a_j > strong_threshold`` are strong.
    preserve_tolerance : float, default=0.01
        ``tol >= 0`` in ``(S alpha)_j >= -tol`` for strong classes.
    budget_shape : {"l2", "box"}, default="l2"
        ``"l2"``: ``||alpha||_2 <= budget``; ``"box"``: see :meth:`box_bounds`.
    curvature_penalty : float, default=0.0
        ``mu >= 0``; the objective loses ``(mu/2) sum_i |lambda_i| alpha_i^2``.
    class_weights : ndarray of shape (C,), default=None
        Non-negative weights replacing the error weights of the ``"weighted"``
        objective (for instance noise-aware weights); renormalised over the
        present classes.

    Examples
    --------
    >>> import numpy as np
    >>> p = CoefficientProblem(sensitivity=np.eye(2), accuracy=np.array([0.5, 0.9]),
    ...                        eigenvalues=np.array([2.0, 1.0]), budget=0.1)
    >>> p.weights()
    array([0.83333333, 0.16666667])
    >>> p.strong_mask()
    array([False,  True])
    """

    sensitivity: np.ndarray
    accuracy: np.ndarray
    eigenvalues: np.ndarray
    budget: float
    objective: str = "weighted"
    weight_power: float = 1.0
    strong_threshold: float = 0.85
    preserve_tolerance: float = 0.01
    budget_shape: str = "l2"
    curvature_penalty: float = 0.0
    class_weights: np.ndarray | None = None

    # ------------------------------------------------------------------ validation
    def validate(self) -> CoefficientProblem:
        """Check every field; raise ``ValueError``/``TypeError`` naming the culprit.

        Returns
        -------
        self : CoefficientProblem
        """
        S = _as_float_array(self.sensitivity, "sensitivity", 2)
        C, k = S.shape
        if C < 1 or k < 1:
            raise ValueError(f"sensitivity must have at least one row and column; got {S.shape}.")
        a = _as_float_array(self.accuracy, "accuracy", 1)
        if a.shape != (C,):
            raise ValueError(
                f"accuracy must have shape ({C},) to match sensitivity {S.shape}; got {a.shape}."
            )
        if np.isinf(a).any():
            raise ValueError("accuracy contains infinite values (NaN marks an absent class).")
        present = ~np.isnan(a)
        if not present.any():
            raise ValueError("accuracy is NaN for every class: no class is present.")
        if (a[present] < 0).any() or (a[present] > 1).any():
            raise ValueError("accuracy must lie in [0, 1] (or be NaN for an absent class).")
        if not np.isfinite(S[present]).all():
            raise ValueError("sensitivity contains NaN or infinite values for a present class.")
        lam = _as_float_array(self.eigenvalues, "eigenvalues", 1)
        if lam.shape != (k,):
            raise ValueError(
                f"eigenvalues must have shape ({k},) to match sensitivity {S.shape}; "
                f"got {lam.shape}."
            )
        if not np.isfinite(lam).all():
            raise ValueError("eigenvalues contains NaN or infinite values.")
        _check_real(self.budget, "budget", positive=True)
        if self.objective not in _OBJECTIVES:
            raise ValueError(f"objective must be one of {_OBJECTIVES}; got {self.objective!r}.")
        if self.budget_shape not in _BUDGET_SHAPES:
            raise ValueError(
                f"budget_shape must be one of {_BUDGET_SHAPES}; got {self.budget_shape!r}."
            )
        _check_real(self.weight_power, "weight_power", nonnegative=True)
        _check_real(self.strong_threshold, "strong_threshold")
        _check_real(self.preserve_tolerance, "preserve_tolerance", nonnegative=True)
        _check_real(self.curvature_penalty, "curvature_penalty", nonnegative=True)
        if self.class_weights is not None:
            w = _as_float_array(self.class_weights, "class_weights", 1)
            if w.shape != (C,):
                raise ValueError(f"class_weights must have shape ({C},); got {w.shape}.")
            wp = w[present]
            if not np.isfinite(wp).all() or (wp < 0).any():
                raise ValueError("class_weights must be finite and >= 0 for present classes.")
            if wp.sum() <= 0:
                raise ValueError("class_weights must have a positive sum over present classes.")
        return self

    # ------------------------------------------------------------------ helpers
    @property
    def n_classes(self) -> int:
        """Number of classes C (rows of the sensitivity)."""
        return int(np.shape(self.sensitivity)[0])

    @property
    def n_components(self) -> int:
        """Number of coefficients k (columns of the sensitivity)."""
        return int(np.shape(self.sensitivity)[1])

    def present_mask(self) -> np.ndarray:
        """Boolean (C,): classes with a (non-NaN) accuracy."""
        return ~np.isnan(np.asarray(self.accuracy, dtype=np.float64))

    def strong_mask(self) -> np.ndarray:
        """Boolean (C,): present classes with ``a_j > strong_threshold``."""
        a = np.asarray(self.accuracy, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            return self.present_mask() & (a > self.strong_threshold)

    def weights(self) -> np.ndarray:
        """Class weights ``w`` (C,) of the ``"weighted"`` objective, summing to 1.

        ``w_j = e_j^p / sum_k e_k^p`` over present classes (0 for absent ones),
        or the renormalised ``class_weights`` when given. ``p = 0`` gives
        uniform weights (``0^0 = 1``). When every present class has ``e_j = 0``
        (perfect accuracy) the weights are uniform too: nothing is to be gained,
        and the strong-class constraints then keep every class where it is.
        """
        present = self.present_mask()
        if self.class_weights is not None:
            raw = np.where(present, np.asarray(self.class_weights, dtype=np.float64), 0.0)
        else:
            a = np.asarray(self.accuracy, dtype=np.float64)
            e = np.clip(1.0 - np.where(present, a, 1.0), 0.0, 1.0)
            raw = np.where(present, e ** float(self.weight_power), 0.0)
        total = raw.sum()
        if not total > 0:
            raw = present.astype(np.float64)
            total = raw.sum()
        return raw / total

    def box_bounds(self) -> np.ndarray:
        """Per-spike bounds ``budget * sqrt(lambda_ref / |lambda_i|)`` (k,).

        They equalise the second-order cost ``alpha_i^2 |lambda_i|`` at the
        level of the flattest spike. ``lambda_ref`` is the smallest ``|lambda_i|``
        that is not flat; flat directions (``|lambda_i| < 1e-6 max|lambda|``,
        including zero or all-zero eigenvalues) get the full ``budget``, so no
        bound exceeds ``budget``. Absolute values make an indefinite Hessian's
        negative spikes behave like positive ones of the same magnitude.
        """
        lam = np.abs(np.asarray(self.eigenvalues, dtype=np.float64))
        budget = float(self.budget)
        top = lam.max(initial=0.0)
        if top <= 0:
            return np.full(lam.shape, budget)
        curved = lam >= _FLAT_RTOL * top
        ref = lam[curved].min()
        return budget * np.sqrt(ref / np.maximum(lam, ref))

    def penalty_diagonal(self) -> np.ndarray:
        """``mu * |lambda|`` (k,): the objective loses ``0.5 * sum(d * alpha**2)``."""
        return float(self.curvature_penalty) * np.abs(np.asarray(self.eigenvalues, np.float64))

    def predicted_loss_increase(self, alpha) -> float:
        """Second-order predicted loss change ``0.5 * sum_i lambda_i alpha_i^2``."""
        alpha = np.asarray(alpha, dtype=np.float64)
        return float(0.5 * np.sum(np.asarray(self.eigenvalues, np.float64) * alpha**2))

    def linearized_accuracy(self, alpha) -> np.ndarray:
        """``a + S alpha`` (C,); NaN for absent classes."""
        alpha = np.asarray(alpha, dtype=np.float64)
        a = np.asarray(self.accuracy, dtype=np.float64)
        present = self.present_mask()
        S = np.where(present[:, None], np.asarray(self.sensitivity, np.float64), 0.0)
        return np.where(present, a + S @ alpha, np.nan)

    def objective_value(self, alpha) -> float:
        """The value (to maximise) of the configured objective at ``alpha``."""
        alpha = np.asarray(alpha, dtype=np.float64)
        penalty = 0.5 * float(np.sum(self.penalty_diagonal() * alpha**2))
        lin = self.linearized_accuracy(alpha)
        present = self.present_mask()
        if self.objective == "maxmin":
            return float(np.min(lin[present])) - penalty
        a = np.asarray(self.accuracy, dtype=np.float64)
        gain = lin[present] - a[present]
        return float(self.weights()[present] @ gain) - penalty

    def constraint_violation(self, alpha) -> tuple[float, float]:
        """Largest violation of the budget and of strong-class preservation.

        Returns
        -------
        budget_violation : float
            ``||alpha|| - budget`` (L2) or ``max(|alpha| - bounds)`` (box), floored at 0.
        preserve_violation : float
            ``max_j (-tol - (S alpha)_j)`` over strong classes, floored at 0.
        """
        alpha = np.asarray(alpha, dtype=np.float64)
        if self.budget_shape == "box":
            b = float(np.max(np.abs(alpha) - self.box_bounds()))
        else:
            b = float(np.linalg.norm(alpha) - self.budget)
        strong = self.strong_mask()
        p = 0.0
        if strong.any():
            gain = np.asarray(self.sensitivity, np.float64)[strong] @ alpha
            p = float(np.max(-self.preserve_tolerance - gain))
        return max(b, 0.0), max(p, 0.0)

    def project_budget(self, alpha) -> np.ndarray:
        """Exact Euclidean projection of ``alpha`` onto the budget set."""
        alpha = np.asarray(alpha, dtype=np.float64)
        if self.budget_shape == "box":
            b = self.box_bounds()
            return np.clip(alpha, -b, b)
        norm = np.linalg.norm(alpha)
        if norm > self.budget:
            return alpha * (float(self.budget) / norm)
        return alpha


class CoefficientSolver(BaseEstimator):
    """Base class of the coefficient solvers.

    Subclasses implement ``_solve(problem) -> (alpha, status)``; :meth:`solve`
    validates the problem, turns any numerical failure (an exception, a
    non-finite answer, a constraint violated beyond ``feasibility_tol``) into
    the zero step with a :class:`SolverWarning`, and records what happened in
    ``last_status_``. Invalid problems raise ``ValueError``/``TypeError``.

    A user's own solver need not derive from this class: anything with a
    ``solve(problem) -> ndarray (k,)`` method works.

    Attributes
    ----------
    last_status_ : str
        ``"optimal"``, ``"optimal_inaccurate"``, ``"repaired"`` or
        ``"failed: <reason>"`` for the last call of :meth:`solve`.
    """

    #: Largest accepted violation of a constraint (absolute, in the units of
    #: alpha for the budget and of the class score for preservation).
    feasibility_tol: float = 1e-6

    def _solve(self, problem: CoefficientProblem) -> tuple[np.ndarray, str]:
        raise NotImplementedError

    def _check_params(self) -> None:
        """Validate constructor parameters (called by :meth:`solve`)."""

    def solve(self, problem: CoefficientProblem) -> np.ndarray:
        """Solve ``problem``; return ``alpha`` (k,), the zero step on failure.

        Parameters
        ----------
        problem : CoefficientProblem

        Returns
        -------
        alpha : ndarray of shape (k,)
        """
        if not isinstance(problem, CoefficientProblem):
            raise TypeError(
                f"problem must be a CoefficientProblem; got {type(problem).__name__}."
            )
        self._check_params()
        problem.validate()
        k = problem.n_components
        try:
            alpha, status = self._solve(problem)
            alpha = np.asarray(alpha, dtype=np.float64).reshape(k)
        except Exception as exc:  # any numerical failure becomes the zero step
            return self._fail(k, f"{type(exc).__name__}: {exc}")
        if not np.isfinite(alpha).all():
            return self._fail(k, "non-finite coefficients")
        alpha, repaired, reason = _make_feasible(problem, alpha, self.feasibility_tol)
        if reason is not None:
            return self._fail(k, reason)
        self.last_status_ = "repaired" if repaired else status
        return alpha

    def _fail(self, k: int, reason: str) -> np.ndarray:
        self.last_status_ = f"failed: {reason}"
        warnings.warn(
            f"{type(self).__name__} failed ({reason}); using the zero step.",
            SolverWarning,
            stacklevel=3,
        )
        return np.zeros(k)


def _make_feasible(
    problem: CoefficientProblem, alpha: np.ndarray, tol: float
) -> tuple[np.ndarray, bool, str | None]:
    """Project onto the budget set, then fix a preservation violation beyond ``tol``.

    Returns ``(alpha, repaired, reason)``; ``repaired`` says a violation beyond
    ``tol`` was fixed; ``reason`` is not None when the point cannot be made
    feasible within ``tol``. Violations up to ``tol`` are accepted as they are.
    A larger violation ``v`` of ``(S alpha)_j >= -tol_p``, up to
    ``1e-3 * tol_p``, is repaired by shrinking towards the feasible zero step:
    ``alpha * tol_p / (tol_p + v)`` satisfies every strong constraint exactly
    (and stays in the star-shaped budget set) and keeps 99.9 % of the step.
    """
    bviol, _ = problem.constraint_violation(alpha)
    alpha = problem.project_budget(alpha)
    repaired = bviol > tol
    _, viol = problem.constraint_violation(alpha)
    if viol > tol:
        tol_p = float(problem.preserve_tolerance)
        if tol_p > 0 and viol <= 1e-3 * tol_p:
            alpha = alpha * (tol_p / (tol_p + viol))
            repaired = True
        else:
            return alpha, repaired, f"strong-class constraint violated by {viol:.3g}"
    return alpha, repaired, None
