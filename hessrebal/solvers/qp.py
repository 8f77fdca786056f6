"""Exact coefficient solver with cvxpy, built once and re-solved (DPP)."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field

import numpy as np

from .._process_state import PROCESS_STATE_LOCK
from .base import CoefficientProblem, CoefficientSolver

__all__ = ["CvxpyQPSolver"]

_OK_STATUSES = ("optimal", "optimal_inaccurate")
#: Tried in turn when ``solver=None``: the interior-point Clarabel is accurate
#: on every problem class here; SCS is the fallback. (cvxpy's own default
#: picks OSQP for the box-with-penalty QPs, which stops at its iteration limit
#: on some of them.)
_DEFAULT_SOLVERS = ("CLARABEL", "SCS")


@functools.lru_cache(maxsize=1)
def _installed_solvers() -> tuple[str, ...]:
    # cvxpy probes every solver package on each call (several ms): ask once.
    import cvxpy as cp

    return tuple(cp.installed_solvers())


@dataclass
class _Built:
    """A compiled cvxpy problem and the Parameters to refill before a solve."""

    problem: object
    u: object
    params: dict = field(default_factory=dict)
    n_solves: int = 0


def _scaled_data(problem: CoefficientProblem) -> dict[str, np.ndarray]:
    """Problem data in the variable ``u = alpha / budget`` (so ``||u|| <= 1``).

    Strong-class rows are normalised to unit length, which keeps the solver's
    absolute tolerances meaningful whatever the scale of ``S``.
    """
    S = np.asarray(problem.sensitivity, dtype=np.float64)
    a = np.asarray(problem.accuracy, dtype=np.float64)
    budget = float(problem.budget)
    k = S.shape[1]
    present = problem.present_mask()
    strong = problem.strong_mask()
    data: dict[str, np.ndarray] = {}
    if problem.objective == "weighted":
        w = problem.weights()
        data["c"] = budget * (S[present].T @ w[present])
    else:
        data["A"] = budget * S[present]
        data["a"] = a[present]
    if strong.any():
        G = budget * S[strong]
        norms = np.linalg.norm(G, axis=1)
        safe = np.where(norms > 0, norms, 1.0)
        data["G"] = G / safe[:, None]
        # A bound below -(sqrt(k) + 1) can never bind (|g.u| <= sqrt(k) for unit
        # rows and u in the unit ball or box), so clip it for the solver's sake.
        data["h"] = np.maximum(-float(problem.preserve_tolerance) / safe, -(np.sqrt(k) + 1.0))
    if problem.curvature_penalty > 0:
        data["d"] = budget * np.sqrt(0.5 * problem.penalty_diagonal())
    if problem.budget_shape == "box":
        data["bound"] = problem.box_bounds() / budget
    return data


def _structure_key(problem: CoefficientProblem) -> tuple:
    return (
        problem.objective,
        problem.budget_shape,
        problem.n_components,
        int(problem.present_mask().sum()) if problem.objective == "maxmin" else 0,
        int(problem.strong_mask().sum()),
        bool(problem.curvature_penalty > 0),
    )


def _build(key: tuple) -> _Built:
    import cvxpy as cp

    objective, shape, k, n_present, n_strong, penalised = key
    u = cp.Variable(k, name="u")
    params: dict = {}
    constraints = []
    if objective == "weighted":
        params["c"] = cp.Parameter(k, name="c")
        expr = params["c"] @ u
    else:
        t = cp.Variable(name="t")
        params["A"] = cp.Parameter((n_present, k), name="A")
        params["a"] = cp.Parameter(n_present, name="a")
        constraints.append(t <= params["a"] + params["A"] @ u)
        expr = t
    if penalised:
        params["d"] = cp.Parameter(k, nonneg=True, name="d")
        # sum_squares(multiply(param, var)) is DPP; quad_form(u, P_param) is not.
        expr = expr - cp.sum_squares(cp.multiply(params["d"], u))
    if shape == "box":
        params["bound"] = cp.Parameter(k, nonneg=True, name="bound")
        constraints += [u <= params["bound"], -u <= params["bound"]]
    else:
        constraints.append(cp.norm(u, 2) <= 1.0)
    if n_strong:
        params["G"] = cp.Parameter((n_strong, k), name="G")
        params["h"] = cp.Parameter(n_strong, name="h")
        constraints.append(params["G"] @ u >= params["h"])
    prob = cp.Problem(cp.Maximize(expr), constraints)
    if not prob.is_dcp(dpp=True):  # pragma: no cover - a construction bug
        raise RuntimeError("internal error: the coefficient problem is not DPP")
    return _Built(problem=prob, u=u, params=params)


class CvxpyQPSolver(CoefficientSolver):
    """Solve the coefficient problem exactly with cvxpy.

    The convex program (a linear/quadratic objective over an L2 ball or a box,
    with linear strong-class constraints, or its max–min variant with an
    epigraph variable) is built once per structure — objective, budget shape,
    k, number of present classes (max–min), number of strong classes, penalty
    on/off — with cvxpy ``Parameter`` objects, then re-solved with new values.
    Internally the variable is ``u = alpha / budget``.

    Parameters
    ----------
    solver : str, default=None
        A cvxpy solver name (``"CLARABEL"``, ``"SCS"``, ``"OSQP"``, ``"HIGHS"``,
        ...). None tries Clarabel, then SCS if Clarabel fails. A solver that
        cannot handle the problem class (OSQP or HiGHS with the L2 ball, a
        second-order cone) fails like any other solver failure: zero step and
        a warning.
    warm_start : bool, default=True
        Passed to ``cvxpy.Problem.solve`` (used by solvers that support it).

    Attributes
    ----------
    last_status_ : str
        Status of the last solve (see :class:`CoefficientSolver`).

    Examples
    --------
    >>> import numpy as np
    >>> from hessrebal.solvers import CoefficientProblem, CvxpyQPSolver
    >>> p = CoefficientProblem(sensitivity=np.array([[1.0, 0.0], [0.0, 1.0]]),
    ...                        accuracy=np.array([0.5, 0.7]),
    ...                        eigenvalues=np.array([2.0, 1.0]), budget=1.0)
    >>> np.round(CvxpyQPSolver().solve(p), 3)
    array([0.857, 0.514])
    """

    def __init__(self, solver: str | None = None, warm_start: bool = True):
        self.solver = solver
        self.warm_start = warm_start

    def __getstate__(self):
        # The compiled cvxpy problems are a cache: never pickle or deep-copy them.
        state = super().__getstate__()
        state.pop("_problems", None)
        return state

    def _check_params(self) -> None:
        if self.solver is not None and not isinstance(self.solver, str):
            raise TypeError(f"solver must be None or a string; got {type(self.solver).__name__}.")
        if self.solver is not None and self.solver.upper() not in _installed_solvers():
            raise ValueError(
                f"solver={self.solver!r} is not an installed cvxpy solver; "
                f"choose from {list(_installed_solvers())}."
            )
        if not isinstance(self.warm_start, (bool, np.bool_)):
            raise TypeError(f"warm_start must be a bool; got {type(self.warm_start).__name__}.")

    def _built(self, problem: CoefficientProblem) -> _Built:
        cache = self.__dict__.setdefault("_problems", {})
        key = _structure_key(problem)
        built = cache.get(key)
        if built is None:
            built = cache[key] = _build(key)
        return built

    def _solve(self, problem: CoefficientProblem) -> tuple[np.ndarray, str]:
        import cvxpy as cp

        built = self._built(problem)
        for name, value in _scaled_data(problem).items():
            built.params[name].value = value
        if self.solver is None:
            names = [s for s in _DEFAULT_SOLVERS if s in _installed_solvers()] or [None]
        else:
            names = [self.solver.upper()]
        failures = []
        for name in names:
            try:
                with PROCESS_STATE_LOCK, warnings.catch_warnings():
                    # cvxpy warns about inaccurate solutions; the status says it all.
                    warnings.simplefilter("ignore", UserWarning)
                    built.problem.solve(solver=name, warm_start=bool(self.warm_start))
            except cp.error.SolverError as exc:
                failures.append(f"{name}: {exc}")
                continue
            finally:
                built.n_solves += 1
            status = built.problem.status
            if status in _OK_STATUSES and built.u.value is not None:
                u = np.asarray(built.u.value, dtype=np.float64)
                return float(problem.budget) * u, status
            failures.append(f"{name}: status {status!r}")
        raise RuntimeError("cvxpy failed (" + "; ".join(failures) + ")")
