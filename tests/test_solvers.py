"""Coefficient problem and solvers, checked against closed forms, SciPy's SLSQP
and each other."""

import copy
import pickle
import time
import warnings

import cvxpy as cp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning

from hessrebal.solvers import (
    CoefficientProblem,
    CoefficientSolver,
    CvxpyQPSolver,
    ProjectedGradientSolver,
    SolverWarning,
)

SOLVERS = [CvxpyQPSolver, ProjectedGradientSolver]


def random_problem(seed, C=10, k=6, **kw):
    rng = np.random.default_rng(seed)
    defaults = dict(
        sensitivity=rng.normal(size=(C, k)),
        accuracy=rng.uniform(0.4, 1.0, size=C),
        eigenvalues=np.sort(10 ** rng.uniform(-1, 2.5, size=k))[::-1],
        budget=0.05,
    )
    defaults.update(kw)
    return CoefficientProblem(**defaults)


def slsqp_reference(p: CoefficientProblem) -> np.ndarray:
    """Independent optimum with SciPy's SLSQP (smooth formulation, several starts)."""
    present = p.present_mask()
    S = np.asarray(p.sensitivity, float)
    a = np.asarray(p.accuracy, float)
    k = p.n_components
    G = S[p.strong_mask()]
    d = p.curvature_penalty * np.abs(p.eigenvalues)
    maxmin = p.objective == "maxmin"
    n = k + 1 if maxmin else k
    cons = [{"type": "ineq", "fun": lambda z: G @ z[:k] + p.preserve_tolerance,
             "jac": lambda z: np.c_[G, np.zeros((len(G), n - k))]}]
    bounds = None
    if p.budget_shape == "l2":
        cons.append({"type": "ineq", "fun": lambda z: p.budget**2 - z[:k] @ z[:k],
                     "jac": lambda z: np.r_[-2 * z[:k], np.zeros(n - k)][None]})
    else:
        b = p.box_bounds()
        bounds = [(-bi, bi) for bi in b] + [(None, None)] * (n - k)
    if maxmin:
        Sp, ap = S[present], a[present]
        cons.append({"type": "ineq", "fun": lambda z: ap + Sp @ z[:k] - z[k],
                     "jac": lambda z: np.c_[Sp, -np.ones(len(ap))]})

        def f(z):
            return -z[k] + 0.5 * d @ z[:k] ** 2

        def jac(z):
            return np.r_[d * z[:k], -1.0]
    else:
        c = S[present].T @ p.weights()[present]

        def f(z):
            return -c @ z + 0.5 * d @ z**2

        def jac(z):
            return -c + d * z

    best = None
    rng = np.random.default_rng(0)
    for start in range(4):
        z0 = np.zeros(n) if start == 0 else np.r_[rng.normal(size=k) * p.budget * 0.1,
                                                 np.zeros(n - k)]
        if maxmin:
            z0[k] = np.min(ap + Sp @ z0[:k]) - 1e-3
        r = minimize(f, z0, jac=jac, constraints=cons, bounds=bounds, method="SLSQP",
                     options={"ftol": 1e-14, "maxiter": 2000})
        alpha = r.x[:k]
        if max(p.constraint_violation(alpha)) > 1e-8:
            continue
        if best is None or p.objective_value(alpha) > p.objective_value(best):
            best = alpha
    assert best is not None
    return best


# ---------------------------------------------------------------- the problem itself
@pytest.mark.parametrize("power", [0.0, 0.5, 1.0, 2.0])
def test_weight_rule(power):
    acc = np.array([0.5, 0.9, np.nan, 0.7, 1.0])
    p = random_problem(0, C=5, k=3, accuracy=acc, weight_power=power)
    e = np.array([0.5, 0.1, 0.3, 0.0])  # present classes only
    raw = e**power
    expected = np.zeros(5)
    expected[[0, 1, 3, 4]] = raw / raw.sum()
    np.testing.assert_allclose(p.weights(), expected, rtol=1e-12)
    if power == 0:
        np.testing.assert_allclose(p.weights()[[0, 1, 3, 4]], 0.25)


def test_weights_edge_cases():
    perfect = random_problem(0, C=4, k=2, accuracy=np.ones(4))
    np.testing.assert_allclose(perfect.weights(), 0.25)  # documented: uniform
    override = random_problem(0, C=3, k=2, accuracy=np.array([0.5, np.nan, 0.9]),
                              class_weights=np.array([1.0, 5.0, 3.0]))
    np.testing.assert_allclose(override.weights(), [0.25, 0.0, 0.75])


def test_strong_mask_and_linearized_accuracy():
    acc = np.array([0.9, 0.85, np.nan, 0.3])
    p = random_problem(1, C=4, k=3, accuracy=acc)
    np.testing.assert_array_equal(p.strong_mask(), [True, False, False, False])
    alpha = np.array([0.1, -0.2, 0.3])
    lin = p.linearized_accuracy(alpha)
    np.testing.assert_allclose(lin[[0, 1, 3]], acc[[0, 1, 3]] + p.sensitivity[[0, 1, 3]] @ alpha)
    assert np.isnan(lin[2])


def test_box_bounds_and_curvature_quantities():
    p = random_problem(0, C=3, k=4, eigenvalues=np.array([100.0, 25.0, -4.0, 1.0]), budget=0.2,
                       curvature_penalty=2.0)
    np.testing.assert_allclose(p.box_bounds(), 0.2 * np.sqrt([0.01, 0.04, 0.25, 1.0]))
    alpha = np.array([0.1, 0.2, 0.3, 0.4])
    # Taylor term keeps the sign of lambda; the penalty uses |lambda|.
    assert p.predicted_loss_increase(alpha) == pytest.approx(0.5 * (1 + 1 - 0.36 + 0.16))
    np.testing.assert_allclose(p.penalty_diagonal(), [200.0, 50.0, 8.0, 2.0])
    flat = random_problem(0, C=3, k=3, eigenvalues=np.array([50.0, 2.0, 0.0]), budget=0.3)
    np.testing.assert_allclose(flat.box_bounds(), 0.3 * np.sqrt([2 / 50, 1.0, 1.0]))
    zero = random_problem(0, C=3, k=2, eigenvalues=np.zeros(2), budget=0.3)
    np.testing.assert_allclose(zero.box_bounds(), [0.3, 0.3])


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(budget=0.0), "budget"),
        (dict(budget=-1.0), "budget"),
        (dict(budget=float("nan")), "budget"),
        (dict(objective="median"), "objective"),
        (dict(budget_shape="ellipse"), "budget_shape"),
        (dict(weight_power=-1.0), "weight_power"),
        (dict(preserve_tolerance=-0.1), "preserve_tolerance"),
        (dict(curvature_penalty=-1.0), "curvature_penalty"),
        (dict(accuracy=np.full(10, 0.5)[:9]), "accuracy"),
        (dict(accuracy=np.full(10, 1.5)), "accuracy"),
        (dict(accuracy=np.full(10, np.nan)), "accuracy"),
        (dict(eigenvalues=np.ones(5)), "eigenvalues"),
        (dict(eigenvalues=np.array([1, 1, 1, 1, 1, np.nan])), "eigenvalues"),
        (dict(sensitivity=np.full((10, 6), np.nan)), "sensitivity"),
        (dict(sensitivity=np.ones(6)), "sensitivity"),
        (dict(class_weights=-np.ones(10)), "class_weights"),
        (dict(class_weights=np.ones(3)), "class_weights"),
    ],
)
@pytest.mark.parametrize("solver_cls", SOLVERS)
def test_invalid_problem_raises_naming_the_field(change, name, solver_cls):
    p = random_problem(0, **change)
    with pytest.raises((ValueError, TypeError), match=name):
        p.validate()
    with pytest.raises((ValueError, TypeError), match=name):
        solver_cls().solve(p)


def test_invalid_solver_parameters():
    p = random_problem(0)
    with pytest.raises(ValueError, match="max_iter"):
        ProjectedGradientSolver(max_iter=0).solve(p)
    with pytest.raises(ValueError, match="tol"):
        ProjectedGradientSolver(tol=-1e-3).solve(p)
    with pytest.raises(ValueError, match="solver"):
        CvxpyQPSolver(solver="NO_SUCH_SOLVER").solve(p)
    with pytest.raises(TypeError, match="problem"):
        CvxpyQPSolver().solve({"sensitivity": np.eye(2)})


# ---------------------------------------------------------------- closed forms
@pytest.mark.parametrize("solver_cls", SOLVERS)
def test_closed_forms_without_active_constraints(solver_cls):
    acc = np.linspace(0.3, 0.8, 10)  # no strong class
    p = random_problem(3, accuracy=acc)
    c = p.sensitivity.T @ p.weights()
    np.testing.assert_allclose(solver_cls().solve(p), 0.05 * c / np.linalg.norm(c), atol=1e-7)
    p.budget_shape = "box"
    np.testing.assert_allclose(solver_cls().solve(p), np.sign(c) * p.box_bounds(), atol=1e-7)
    # Box with curvature penalty: separable, clip(c / (mu |lambda|), -b, b).
    p.curvature_penalty = 5.0
    expected = np.clip(c / p.penalty_diagonal(), -p.box_bounds(), p.box_bounds())
    assert not np.allclose(np.abs(expected), p.box_bounds())  # some coordinates interior
    np.testing.assert_allclose(solver_cls().solve(p), expected, atol=1e-7)
    # Ball with a penalty strong enough to keep the optimum inside: c / (mu |lambda|).
    p.budget_shape, p.budget = "l2", 10.0
    np.testing.assert_allclose(solver_cls().solve(p), c / p.penalty_diagonal(), atol=1e-7)


# ---------------------------------------------------------------- QP vs SLSQP
@pytest.mark.parametrize("objective", ["weighted", "maxmin"])
@pytest.mark.parametrize("shape", ["l2", "box"])
@pytest.mark.parametrize("penalty", [0.0, 3.0])
def test_qp_matches_slsqp_with_active_strong_constraints(objective, shape, penalty):
    p = random_problem(31, C=8, k=5, accuracy=np.array([0.95, 0.9, 0.92, 0.5, 0.6, 0.97, 0.4, 0.7]),
                       objective=objective, budget_shape=shape, curvature_penalty=penalty,
                       preserve_tolerance=0.002)
    alpha = CvxpyQPSolver().solve(p)
    ref = slsqp_reference(p)
    assert p.objective_value(alpha) == pytest.approx(p.objective_value(ref), abs=1e-7)
    assert max(p.constraint_violation(alpha)) <= 1e-6
    np.testing.assert_allclose(alpha, ref, atol=1e-4 * p.budget)
    # The strong-class constraints are really active here: without them the
    # optimum would be different (and would hurt a strong class).
    free = CoefficientProblem(**{**p.__dict__, "strong_threshold": 2.0})
    alpha_free = CvxpyQPSolver().solve(free)
    assert p.constraint_violation(alpha_free)[1] > 1e-3


def test_strong_class_is_preserved():
    # Class 0 is strong and the weak classes pull straight against it.
    S = np.array([[1.0, 0.0], [-1.0, 0.2], [-1.0, -0.1]])
    p = CoefficientProblem(S, np.array([0.95, 0.5, 0.6]), np.array([2.0, 1.0]), budget=1.0,
                           preserve_tolerance=0.0)
    for solver in (CvxpyQPSolver(), ProjectedGradientSolver()):
        alpha = solver.solve(p)
        assert (S @ alpha)[0] >= -1e-6
        # Exact optimum: alpha_0 = 0 (the constraint), alpha_1 = sign(0.2*0.5 - 0.1*0.4) * 1.
        np.testing.assert_allclose(alpha, [0.0, 1.0], atol=1e-6)


def test_maxmin_raises_the_worst_linearised_class():
    p = random_problem(11, C=6, k=4, accuracy=np.array([0.3, 0.5, 0.9, 0.8, 0.6, 0.95]),
                       objective="maxmin", budget=0.1)
    weighted = CoefficientProblem(**{**p.__dict__, "objective": "weighted"})
    for solver in (CvxpyQPSolver(), ProjectedGradientSolver()):
        alpha = solver.solve(p)
        lin = p.linearized_accuracy(alpha)
        assert lin.min() > p.accuracy.min() + 1e-3
        assert lin.min() >= weighted.linearized_accuracy(solver.solve(weighted)).min() - 1e-9
        assert p.objective_value(alpha) == pytest.approx(
            p.objective_value(slsqp_reference(p)), abs=1e-7)


@pytest.mark.parametrize("objective", ["weighted", "maxmin"])
def test_absent_class_is_left_out(objective):
    p = random_problem(5, C=6, k=4, objective=objective,
                       accuracy=np.array([0.5, 0.9, 0.7, 0.95, 0.2, 0.6]))
    S, a = p.sensitivity.copy(), p.accuracy.copy()
    a[4], S[4] = np.nan, np.nan  # class 4 (the worst one) absent
    with_gap = CoefficientProblem(**{**p.__dict__, "sensitivity": S, "accuracy": a})
    without = CoefficientProblem(**{**p.__dict__, "sensitivity": np.delete(S, 4, 0),
                                    "accuracy": np.delete(a, 4)})
    for solver_cls in SOLVERS:
        np.testing.assert_allclose(solver_cls().solve(with_gap), solver_cls().solve(without),
                                   atol=1e-6 * p.budget)


def test_negative_eigenvalues_use_magnitudes():
    lam = np.array([40.0, 10.0, -10.0])
    p = random_problem(2, C=4, k=3, accuracy=np.full(4, 0.5), eigenvalues=lam,
                       budget_shape="box", budget=0.1)
    mirrored = CoefficientProblem(**{**p.__dict__, "eigenvalues": np.abs(lam)})
    for solver_cls in SOLVERS:
        np.testing.assert_allclose(solver_cls().solve(p), solver_cls().solve(mirrored),
                                   atol=1e-8)


# ---------------------------------------------------------------- PG vs QP (hypothesis)
@st.composite
def problems(draw):
    C = draw(st.integers(2, 12))
    k = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    S = rng.normal(size=(C, k)) * 10 ** draw(st.floats(-1, 1))
    acc = rng.uniform(0.2, 1.0, size=C)
    if draw(st.booleans()) and C > 2:
        acc[rng.integers(C)] = np.nan
    if not np.isfinite(acc).any():
        acc[0] = 0.5
    lam = np.sort(10 ** rng.uniform(-1, 3, size=k))[::-1]
    if draw(st.booleans()):
        lam[-1] = -lam[-1]  # an indefinite Hessian
    return CoefficientProblem(
        sensitivity=S, accuracy=acc, eigenvalues=lam,
        budget=10 ** draw(st.floats(-2.5, 0)),
        objective=draw(st.sampled_from(["weighted", "maxmin"])),
        weight_power=draw(st.sampled_from([0.0, 0.5, 1.0, 2.0])),
        strong_threshold=draw(st.sampled_from([0.6, 0.85])),
        preserve_tolerance=draw(st.sampled_from([0.0, 0.001, 0.01])),
        budget_shape=draw(st.sampled_from(["l2", "box"])),
        curvature_penalty=draw(st.sampled_from([0.0, 0.0, 1.0, 100.0])),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_projected_gradient_matches_qp(p):
    tol = 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverWarning)
        alpha_qp = CvxpyQPSolver().solve(p)
        alpha_pg = ProjectedGradientSolver(tol=tol).solve(p)
    scale = p.budget * np.abs(p.sensitivity[p.present_mask()]).max()
    # Objective: within 1e-5 of the attainable linear gain (and never better
    # than the exact optimum by more than the QP's own accuracy).
    gap = p.objective_value(alpha_qp) - p.objective_value(alpha_pg)
    assert -1e-5 * scale <= gap <= 1e-5 * scale
    budget_viol, preserve_viol = p.constraint_violation(alpha_pg)
    assert budget_viol <= 1e-12 * p.budget
    assert preserve_viol <= tol
    assert max(p.constraint_violation(alpha_qp)) <= 1e-6


# ---------------------------------------------------------------- failures
def test_cvxpy_solver_error_gives_zero_step(monkeypatch):
    p = random_problem(0)

    def boom(self, *args, **kwargs):
        raise cp.error.SolverError("simulated failure")

    monkeypatch.setattr(cp.Problem, "solve", boom)
    solver = CvxpyQPSolver()
    with pytest.warns(SolverWarning, match="simulated failure"):
        alpha = solver.solve(p)
    np.testing.assert_array_equal(alpha, np.zeros(6))
    assert solver.last_status_.startswith("failed")


def test_cvxpy_infeasible_status_gives_zero_step(monkeypatch):
    p = random_problem(0)

    def infeasible(self, *args, **kwargs):
        self._status = "infeasible"

    monkeypatch.setattr(cp.Problem, "solve", infeasible)
    with pytest.warns(SolverWarning, match="infeasible"):
        alpha = CvxpyQPSolver().solve(p)
    np.testing.assert_array_equal(alpha, np.zeros(6))


def test_incapable_solver_gives_zero_step():
    # OSQP cannot take the second-order cone of the L2 ball.
    with pytest.warns(SolverWarning):
        alpha = CvxpyQPSolver(solver="OSQP").solve(random_problem(0))
    np.testing.assert_array_equal(alpha, np.zeros(6))


def test_non_finite_and_raising_solvers_give_zero_step(monkeypatch):
    p = random_problem(0)
    solver = ProjectedGradientSolver()
    monkeypatch.setattr(solver, "_augmented_lagrangian", lambda sp: (np.full(7, np.nan), True))
    with pytest.warns(SolverWarning, match="non-finite"):
        np.testing.assert_array_equal(solver.solve(p), np.zeros(6))

    class Broken(CoefficientSolver):
        def _solve(self, problem):
            raise FloatingPointError("overflow")

    with pytest.warns(SolverWarning, match="overflow"):
        np.testing.assert_array_equal(Broken().solve(p), np.zeros(6))

    class Infeasible(CoefficientSolver):
        def _solve(self, problem):
            return -10 * problem.sensitivity[problem.strong_mask()][0], "optimal"

    with pytest.warns(SolverWarning, match="strong-class"):
        np.testing.assert_array_equal(Infeasible().solve(p), np.zeros(6))


def test_projected_gradient_max_iter_warns_but_stays_feasible():
    p = random_problem(4, objective="maxmin", accuracy=np.linspace(0.5, 0.99, 10))
    solver = ProjectedGradientSolver(max_iter=1)
    with pytest.warns(ConvergenceWarning):
        alpha = solver.solve(p)
    assert solver.last_status_ in ("max_iter", "repaired")
    assert max(p.constraint_violation(alpha)) <= 1e-6


# ---------------------------------------------------------------- caching
def test_qp_cache_reuses_the_built_problem_and_is_faster():
    solver = CvxpyQPSolver()
    probs = [random_problem(s, accuracy=np.r_[np.full(3, 0.95), np.linspace(0.4, 0.8, 7)])
             for s in range(12)]
    solver.solve(probs[0])
    (built,) = solver._problems.values()
    first_problem = built.problem
    cached, fresh = [], []
    for p in probs[1:]:
        t0 = time.perf_counter()
        alpha = solver.solve(p)
        cached.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        alpha_fresh = CvxpyQPSolver().solve(p)  # builds and compiles from scratch
        fresh.append(time.perf_counter() - t0)
        # Linear objective on a sphere: alpha is only sqrt(solver accuracy)-exact.
        assert p.objective_value(alpha) == pytest.approx(p.objective_value(alpha_fresh), abs=1e-8)
    assert len(solver._problems) == 1 and built.problem is first_problem
    assert built.n_solves == len(probs)
    t_cached, t_fresh = np.median(cached), np.median(fresh)
    print(f"cvxpy re-solve {1e3 * t_cached:.1f} ms vs build+solve {1e3 * t_fresh:.1f} ms")
    assert t_cached < 0.7 * t_fresh
    # A different structure (another number of strong classes) builds a second problem.
    solver.solve(random_problem(0, accuracy=np.linspace(0.4, 0.8, 10)))
    assert len(solver._problems) == 2


def test_solvers_clone_and_copy_without_the_cache():
    solver = CvxpyQPSolver(solver="CLARABEL", warm_start=False)
    solver.solve(random_problem(0))
    assert solver.get_params() == {"solver": "CLARABEL", "warm_start": False}
    twin = clone(solver)
    assert not hasattr(twin, "_problems") and twin.get_params() == solver.get_params()
    assert not hasattr(pickle.loads(pickle.dumps(solver)), "_problems")
    assert not hasattr(copy.deepcopy(solver), "_problems")
    pg = clone(ProjectedGradientSolver(max_iter=50, tol=1e-5))
    assert pg.get_params() == {"max_iter": 50, "tol": 1e-5}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.booleans(), st.integers(0, 2**31 - 1))
def test_solutions_are_feasible_never_worse_than_zero_and_monotone_in_budget(p, weighted,
                                                                            seed):
    """Properties that need no reference solver: the zero step is feasible, so
    an optimum is never worse than it; a larger budget contains the smaller
    feasible set, so the optimum cannot get worse; with or without
    ``class_weights`` both solvers stay feasible."""
    if weighted:
        p.class_weights = np.random.default_rng(seed).uniform(0.0, 2.0, size=p.n_classes)
        p.class_weights[np.flatnonzero(p.present_mask())[0]] = 1.0  # positive sum
    bigger = copy.copy(p)
    bigger.budget = 2 * p.budget
    scale = p.budget * np.abs(p.sensitivity[p.present_mask()]).max()
    zero = p.objective_value(np.zeros(p.n_components))
    for solver_cls in SOLVERS:
        with warnings.catch_warnings():
            warnings.simplefilter("error", SolverWarning)
            alpha = solver_cls().solve(p)
            alpha_big = solver_cls().solve(bigger)
        for prob, a in ((p, alpha), (bigger, alpha_big)):
            budget_viol, preserve_viol = prob.constraint_violation(a)
            assert budget_viol <= 1e-9 * prob.budget
            assert preserve_viol <= 1e-6
        assert p.objective_value(alpha) >= zero - 1e-6 * scale
        assert bigger.objective_value(alpha_big) >= p.objective_value(alpha) - 1e-6 * scale
