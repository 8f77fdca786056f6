"""First-order coefficient solver in NumPy: no cvxpy needed."""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
from scipy.optimize import brentq
from sklearn.exceptions import ConvergenceWarning

from .base import CoefficientProblem, CoefficientSolver

__all__ = ["ProjectedGradientSolver"]


class _Scaled:
    """The problem in ``u = alpha / budget`` as ``min -c.x + 0.5 sum(q x^2)``
    subject to ``A x >= l`` and ``x[:k]`` in the unit ball or the box ``|u| <= bound``.

    For the max–min objective ``x = (u, tau)`` with ``t = t0 + s tau`` (``t0`` the
    current worst accuracy, ``s`` the largest row norm of ``budget * S``), which
    keeps every quantity of order one. Every constraint row has unit norm;
    ``row_scale`` converts a row violation back to the units of ``(S alpha)_j``
    (1 for the epigraph rows of the max–min objective, which only define ``t``).
    """

    def __init__(self, problem: CoefficientProblem):
        S = np.asarray(problem.sensitivity, dtype=np.float64)
        a = np.asarray(problem.accuracy, dtype=np.float64)
        budget = float(problem.budget)
        k = S.shape[1]
        self.k = k
        self.box = problem.budget_shape == "box"
        self.bound = problem.box_bounds() / budget if self.box else None
        q = budget**2 * problem.penalty_diagonal()
        present = problem.present_mask()
        rows, rhs, scales = [], [], []
        self.trivial = False
        if problem.objective == "weighted":
            c = budget * (S[present].T @ problem.weights()[present])
            sc = np.linalg.norm(c)
            if sc == 0:
                self.trivial = True  # the best step gains nothing: stay put
                sc = 1.0
            self.c = c / sc
            self.q = q / sc
        else:
            A = budget * S[present]
            s = np.linalg.norm(A, axis=1).max()
            if s == 0:
                self.trivial = True
                s = 1.0
            t0 = a[present].min()
            self.c = np.r_[np.zeros(k), 1.0]
            self.q = np.r_[q / s, 0.0]
            R = np.c_[A / s, -np.ones(A.shape[0])]
            norms = np.linalg.norm(R, axis=1)
            rows.append(R / norms[:, None])
            rhs.append((t0 - a[present]) / s / norms)
            scales.append(np.ones(A.shape[0]))
        strong = problem.strong_mask()
        if strong.any():
            G = budget * S[strong]
            g = np.linalg.norm(G, axis=1)
            h = -float(problem.preserve_tolerance) / np.where(g > 0, g, 1.0)
            # A unit row with a bound below -sqrt(k) can never bind (|g.u| <= sqrt(k)
            # in the unit ball or box), nor can an all-zero row: drop them.
            keep = (g > 0) & (h >= -np.sqrt(k) - 1e-12)
            G = G[keep] / g[keep, None]
            if len(self.c) > k:
                G = np.c_[G, np.zeros(len(G))]
            rows.append(G)
            rhs.append(h[keep])
            scales.append(g[keep])
        n = len(self.c)
        self.A = np.concatenate(rows) if rows else np.zeros((0, n))
        self.l = np.concatenate(rhs) if rhs else np.zeros(0)
        self.row_scale = np.concatenate(scales) if scales else np.zeros(0)
        if n > k and self.A.shape[0]:
            # Column-scale the free epigraph variable like the u block: with many
            # classes its column (all about -1/sqrt(2)) would otherwise dominate
            # ||A||^2 and shrink every projected-gradient step.
            col = np.linalg.norm(self.A[:, k])
            blk = np.linalg.norm(self.A[:, :k], 2)
            if col > 0 and blk > 0:
                f = blk / col
                self.A[:, k] *= f
                self.c[k] *= f

    def project(self, x: np.ndarray) -> np.ndarray:
        """Exact Euclidean projection onto the budget set (in place; returns ``x``)."""
        k = self.k
        if self.box:
            np.minimum(np.maximum(x[:k], -self.bound, out=x[:k]), self.bound, out=x[:k])
        else:
            norm = math.sqrt(x[:k] @ x[:k])
            if norm > 1.0:
                x[:k] *= 1.0 / norm
        return x

    def closed_form(self) -> np.ndarray:
        """Maximiser without constraint rows (weighted objective, no binding strong class)."""
        c, q = self.c, self.q
        if self.box:
            with np.errstate(divide="ignore", invalid="ignore"):
                free = np.where(q > 0, c / q, np.sign(c) * np.inf)
            return np.clip(np.nan_to_num(free, nan=0.0), -self.bound, self.bound)
        if not (q > 0).all() or np.linalg.norm(c / np.where(q > 0, q, 1.0)) > 1.0:
            if not q.any():
                return c / np.linalg.norm(c)
            # Stationarity on the sphere: u = c / (q + eta), ||u|| = 1, eta > 0.
            cn = np.linalg.norm(c)

            def excess(eta: float) -> float:
                return float(np.linalg.norm(c / (q + eta))) - 1.0

            lo = 0.0 if (q > 0).all() else 1e-12 * cn
            if excess(lo) <= 0:
                eta = lo
            else:
                eta = brentq(excess, lo, cn + 1e-300, xtol=1e-15 * cn, rtol=1e-15, maxiter=200)
            u = c / (q + eta)
            return u / max(np.linalg.norm(u), 1.0)
        return c / q


class ProjectedGradientSolver(CoefficientSolver):
    """Solve the coefficient problem with first-order steps and exact projections.

    The budget set (L2 ball or box) is handled by exact Euclidean projection;
    the strong-class constraints — and, for ``objective="maxmin"``, the
    epigraph constraints ``t <= a_j + (S alpha)_j`` — by an augmented
    Lagrangian (method of multipliers). Each subproblem is a smooth convex
    function over the budget set, minimised by accelerated projected gradient
    (FISTA with adaptive restart). Without any constraint row (weighted
    objective, no strong class that could bind) the optimum is computed in
    closed form: ``budget * S^T w / ||S^T w||`` on the ball, ``sign(S^T w) *
    bounds`` on the box, or a one-dimensional secular equation with the
    curvature penalty.

    Internally the variable is ``u = alpha / budget`` and every constraint row
    is normalised, so the tolerances below do not depend on the scale of ``S``.

    Parameters
    ----------
    max_iter : int, default=500
        Maximum number of augmented-Lagrangian (multiplier) iterations; each
        subproblem runs at most ``20 * max_iter`` projected-gradient steps.
        Typical problems converge in 5–15 outer iterations.
    tol : float, default=1e-6
        Stopping tolerance and the largest accepted violation of a
        constraint: the budget is met exactly (projection), a strong class
        ``(S alpha)_j >= -preserve_tolerance - tol``. Optimality: the
        gradient mapping and the complementarity, in the scaled problem,
        below ``tol / 10``.

    Attributes
    ----------
    last_status_ : str
        ``"optimal"``, ``"closed_form"``, ``"max_iter"`` (feasible but not
        converged; a ``ConvergenceWarning`` is emitted), ``"repaired"`` or
        ``"failed: ..."``.
    n_iter_ : int
        Outer iterations of the last solve (0 for a closed form).
    n_steps_ : int
        Projected-gradient steps of the last solve.

    Examples
    --------
    >>> import numpy as np
    >>> from hessrebal.solvers import CoefficientProblem, ProjectedGradientSolver
    >>> p = CoefficientProblem(sensitivity=np.array([[1.0, 0.0], [0.0, 1.0]]),
    ...                        accuracy=np.array([0.5, 0.7]),
    ...                        eigenvalues=np.array([2.0, 1.0]), budget=1.0)
    >>> np.round(ProjectedGradientSolver().solve(p), 3)
    array([0.857, 0.514])
    """

    def __init__(self, max_iter: int = 500, tol: float = 1e-6):
        self.max_iter = max_iter
        self.tol = tol

    @property
    def feasibility_tol(self) -> float:  # type: ignore[override]
        return float(self.tol)

    def _check_params(self) -> None:
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, numbers.Integral):
            raise TypeError(f"max_iter must be an int; got {type(self.max_iter).__name__}.")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1; got {self.max_iter}.")
        if isinstance(self.tol, bool) or not isinstance(self.tol, numbers.Real):
            raise TypeError(f"tol must be a real number; got {type(self.tol).__name__}.")
        if not (np.isfinite(self.tol) and self.tol > 0):
            raise ValueError(f"tol must be a finite number > 0; got {self.tol}.")

    def _solve(self, problem: CoefficientProblem) -> tuple[np.ndarray, str]:
        sp = _Scaled(problem)
        budget = float(problem.budget)
        self.n_iter_ = 0
        self.n_steps_ = 0
        if sp.trivial:
            return np.zeros(sp.k), "optimal"
        if sp.A.shape[0] == 0:
            return budget * sp.closed_form(), "closed_form"
        x, converged = self._augmented_lagrangian(sp)
        if not converged:
            warnings.warn(
                f"ProjectedGradientSolver did not converge in max_iter={self.max_iter} "
                "iterations; returning its last (feasible) iterate.",
                ConvergenceWarning,
                stacklevel=3,
            )
        return budget * x[: sp.k], "optimal" if converged else "max_iter"

    def _augmented_lagrangian(self, sp: _Scaled) -> tuple[np.ndarray, bool]:
        tol = float(self.tol)
        A, l, c, q = sp.A, sp.l, sp.c, sp.q
        At = A.T
        # Row-wise feasibility targets in the scaled units (see _Scaled.row_scale).
        viol_target = 0.1 * tol * np.minimum(1.0 / sp.row_scale, 1.0)
        x = np.zeros(len(c))  # alpha = 0 (and t = worst accuracy) is feasible
        y = np.zeros(A.shape[0])
        rho = 10.0
        norm_a2 = np.linalg.norm(A, 2) ** 2
        q_max = q.max(initial=0.0)
        eps_in = 1e-2
        prev_viol = np.inf
        max_inner = 20 * int(self.max_iter)
        project = sp.project
        converged = False
        for outer in range(int(self.max_iter)):
            step = 1.0 / max(q_max + rho * norm_a2, 1e-12)
            rho_l = rho * l
            x_prev = x.copy()
            z = x.copy()
            momentum = 1.0
            for _ in range(max_inner):
                r = y + rho_l - rho * (A @ z)
                np.maximum(r, 0.0, out=r)
                x_new = project(z - step * (q * z - c - At @ r))
                self.n_steps_ += 1
                diff = x_new - z
                small = math.sqrt(diff @ diff) <= eps_in * step
                jump = x_new - x_prev
                if diff @ jump < 0:  # adaptive restart: momentum points uphill
                    momentum = 1.0
                    z = x_new
                else:
                    nxt = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * momentum * momentum))
                    z = x_new + ((momentum - 1.0) / nxt) * jump
                    momentum = nxt
                x_prev = x_new
                if small:
                    break
            x = x_prev
            # Gradient mapping at x itself, for the stopping test.
            r = np.maximum(y - rho * (A @ x - l), 0.0)
            g_map = np.linalg.norm(x - sp.project(x - step * (q * x - c - At @ r))) / step
            slack = A @ x - l
            y = np.maximum(y - rho * slack, 0.0)
            viol = np.maximum(-slack, 0.0)
            comp = np.abs(y * slack).max(initial=0.0)
            self.n_iter_ = outer + 1
            if (viol <= viol_target).all() and comp <= 0.1 * tol and g_map <= 0.1 * tol:
                converged = True
                break
            eps_in = max(0.05 * tol, 0.1 * eps_in)
            # Raise the penalty only while the constraints lag behind.
            worst = viol.max(initial=0.0)
            if worst > 0.25 * prev_viol and (viol > viol_target).any():
                rho = min(5.0 * rho, 1e8)
            prev_viol = worst
        return x, converged
