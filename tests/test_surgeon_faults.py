"""Faults during SpectralSurgeon.fit: the user's model is never damaged, the
surgeon never ends half-fitted, bad steps and solver failures are rolled back
and recorded, and a few-sample class does not dominate."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from torch import nn

import hessrebal.surgeon as surgeon_module
from hessrebal import SpectralSurgeon
from hessrebal.curvature import HessianOperator
from hessrebal.metrics import class_std, per_class_accuracy
from hessrebal.sensitivity import SoftmaxSurrogateSensitivity
from hessrebal.solvers import CvxpyQPSolver, SolverWarning
from hessrebal.surgeon import shrink_accuracy
from tests.conftest import (
    PAPER_RULES,
    TinyCNN,
    assert_unchanged,
    snapshot,
    tanh_mlp,
    train_full_batch,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ----------------------------------------------------------------- helpers
_FORWARD = {"n": 0, "at": None, "exc": None}


class InjectedFault(Exception):
    """Not a RuntimeError: vmap fall-backs and the shape probe must not
    swallow or translate it."""


class BombCNN(TinyCNN):
    """TinyCNN whose forward raises at its n-th call (state kept outside the
    module, so counting does not change the model)."""

    def forward(self, x):
        _FORWARD["n"] += 1
        if _FORWARD["n"] == _FORWARD["at"]:
            raise _FORWARD["exc"]("injected fault in forward")
        return super().forward(x)


def bomb_cnn():
    torch.manual_seed(2)
    m = BombCNN().to(torch.float64)
    m.train()
    m.bn.eval()  # a mixed mode: every submodule's flag must come back as it was
    return m


def cnn_data(n=36):
    g = torch.Generator().manual_seed(4)
    return torch.randn(n, 1, 5, 5, generator=g, dtype=torch.float64), torch.arange(n) % 3


def fit_kwargs():
    # Loose rollback rules: steps are accepted, so the spectrum is refreshed too.
    return dict(max_steps=3, budget=0.05, max_class_drop=1.0, max_std_increase=1.0,
                random_state=0, **PAPER_RULES)


def check_intact(model, snap, surgeon, previous=None):
    assert_unchanged(model, snap)
    if previous is None:
        with pytest.raises(NotFittedError):
            surgeon.transform(model)
        assert not [k for k in vars(surgeon) if k.endswith("_") and not k.startswith("_")]
    else:
        assert surgeon.perturbation_ is previous["perturbation_"]
        assert surgeon.history_ is previous["history_"]
        assert set(previous) == {k for k in vars(surgeon) if k.endswith("_")
                                 and not k.startswith("_")}


# ------------------------------------------------------- faults in the fit
@pytest.mark.parametrize("exc", [InjectedFault, KeyboardInterrupt])
def test_fault_in_any_forward_pass_leaves_model_and_surgeon_intact(exc):
    """Every forward (probe, Hessian products, sensitivity, evaluation) is a
    fault site; each runs inside the eval-mode switch that must be undone."""
    X, y = cnn_data()
    model = bomb_cnn()
    snap = snapshot(model)
    _FORWARD.update(n=0, at=None)
    reference = SpectralSurgeon(**fit_kwargs()).fit(model, X, y)
    total = _FORWARD["n"]
    assert reference.history_[0]["accepted"] and reference.history_[1]["n_hvp"] > 0  # refresh
    assert total >= 8  # probe, evaluations, Hessian graph, sensitivities, candidates
    assert any(h["candidate_finite"] is not None for h in reference.history_)  # evaluations ran
    previous = {k: v for k, v in vars(reference).items()
                if k.endswith("_") and not k.startswith("_")}
    sites = sorted({1, 2, 3, total // 4, total // 2, 3 * total // 4, total - 1, total})
    for at in sites:
        for surgeon, prev in ((SpectralSurgeon(**fit_kwargs()), None), (reference, previous)):
            _FORWARD.update(n=0, at=at, exc=exc)
            with pytest.raises(exc, match="injected"):
                surgeon.fit(model, X, y)
            check_intact(model, snap, surgeon, prev)
    _FORWARD.update(n=0, at=None)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_fault_in_a_hessian_product_first_or_refresh(monkeypatch, exc):
    X, y = cnn_data()
    model = bomb_cnn()
    snap = snapshot(model)
    calls = {"n": 0, "at": None}
    original = HessianOperator.matvec

    def matvec(self, v):
        calls["n"] += 1
        if calls["n"] == calls["at"]:
            raise exc("injected fault in matvec")
        return original(self, v)

    monkeypatch.setattr(HessianOperator, "matvec", matvec)
    ok = SpectralSurgeon(**fit_kwargs()).fit(model, X, y)
    total = calls["n"]
    assert total == ok.n_hvp_
    for at in (1, total // 2, total):  # the last product belongs to the last spectrum
        calls.update(n=0, at=at)
        s = SpectralSurgeon(**fit_kwargs())
        with pytest.raises(exc, match="injected"):
            s.fit(model, X, y)
        check_intact(model, snap, s)


class RaisingSensitivity(SoftmaxSurrogateSensitivity):
    """The default surrogate, raising on its ``at``-th call."""

    calls = 0

    def __init__(self, kind="margin", temperature=1.0, at=1, exc=RuntimeError):
        super().__init__(kind=kind, temperature=temperature)
        self.at = at
        self.exc = exc

    def estimate(self, *args, **kwargs):
        RaisingSensitivity.calls += 1
        if RaisingSensitivity.calls == self.at:
            raise self.exc("injected fault in sensitivity")
        return super().estimate(*args, **kwargs)


class RaisingSolver(BaseEstimator):
    calls = 0

    def __init__(self, at=1, exc=KeyboardInterrupt):
        self.at = at
        self.exc = exc

    def solve(self, problem):
        RaisingSolver.calls += 1
        if RaisingSolver.calls == self.at:
            raise self.exc("injected fault in solver")
        return CvxpyQPSolver().solve(problem)


@pytest.mark.parametrize("exc", [ValueError, KeyboardInterrupt])
@pytest.mark.parametrize("at", [1, 3])
def test_fault_in_sensitivity_at_step_t(exc, at):
    X, y = cnn_data()
    model = bomb_cnn()
    snap = snapshot(model)
    RaisingSensitivity.calls = 0
    s = SpectralSurgeon(sensitivity=RaisingSensitivity(at=at, exc=exc), **fit_kwargs())
    with pytest.raises(exc, match="injected"):
        s.fit(model, X, y)
    assert RaisingSensitivity.calls == at
    check_intact(model, snap, s)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, TypeError])
def test_interrupt_or_broken_solver_propagates_and_leaves_model_intact(exc):
    # A KeyboardInterrupt is never swallowed as a "solver failure", nor is a
    # programming error (TypeError); both leave everything as it was.
    X, y = cnn_data()
    model = bomb_cnn()
    snap = snapshot(model)
    RaisingSolver.calls = 0
    s = SpectralSurgeon(solver=RaisingSolver(at=2, exc=exc), **fit_kwargs())
    with pytest.raises(exc, match="injected"):
        s.fit(model, X, y)
    assert RaisingSolver.calls == 2
    check_intact(model, snap, s)


@pytest.mark.parametrize("at", [1, 2, 3])
def test_fault_in_evaluation(monkeypatch, at):
    X, y = cnn_data()
    model = bomb_cnn()
    snap = snapshot(model)
    calls = {"n": 0}
    original = surgeon_module._evaluate

    def evaluate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt("injected fault in evaluation")
        return original(*args, **kwargs)

    monkeypatch.setattr(surgeon_module, "_evaluate", evaluate)
    s = SpectralSurgeon(**fit_kwargs())
    with pytest.raises(KeyboardInterrupt, match="injected"):
        s.fit(model, X, y)
    assert calls["n"] == at
    check_intact(model, snap, s)


# ------------------------------------------------ bad steps are rolled back
class FragileMLP(nn.Module):
    """Logits become NaN (or inf) once the head's weights leave [-50, 50]."""

    def __init__(self, bad=float("nan")):
        super().__init__()
        self.net = tanh_mlp()
        self.bad = bad

    def forward(self, x):
        w = self.net[2].weight
        blow = torch.where(w.abs().max() > 50, torch.tensor(self.bad, dtype=w.dtype),
                           torch.tensor(0.0, dtype=w.dtype))
        return self.net(x) + blow


class HugeFirstStep(BaseEstimator):
    """The QP's step, except a huge one on the first call."""

    calls = 0

    def solve(self, problem):
        HugeFirstStep.calls += 1
        if HugeFirstStep.calls == 1:
            return np.full(problem.n_components, 1e3)
        return CvxpyQPSolver().solve(problem)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_candidate_is_rolled_back_like_a_worse_step(bad):
    g = torch.Generator().manual_seed(5)
    X, y = torch.randn(45, 5, generator=g, dtype=torch.float64), torch.arange(45) % 3
    model = FragileMLP(bad)
    snap = snapshot(model)
    HugeFirstStep.calls = 0
    s = SpectralSurgeon(solver=HugeFirstStep(), max_steps=3, params=["net.2"], budget=0.5,
                        random_state=0).fit(model, X, y)
    first = s.history_[0]
    assert first["accepted"] is False and first["reason"] == "non-finite logits"
    assert first["candidate_finite"] is False and first["candidate_class_std"] is None
    # rolled back: the state is the one before, and GammaDecay(0.7) shrank the budget
    np.testing.assert_array_equal(first["per_class_accuracy"], s.per_class_accuracy_before_)
    assert s.history_[1]["budget"] == pytest.approx(0.7 * first["budget"])
    assert all(h["candidate_finite"] in (True, None) for h in s.history_[1:])
    assert torch.isfinite(s.perturbation_).all()
    assert float(s.perturbation_.abs().max()) < 50
    assert_unchanged(model, snap)


def test_solver_failure_gives_a_recorded_zero_step_and_a_warning():
    X, y = cnn_data()
    model = bomb_cnn()
    RaisingSolver.calls = 0
    with pytest.warns(SolverWarning, match="RaisingSolver failed .*injected fault"):
        s = SpectralSurgeon(solver=RaisingSolver(at=2, exc=RuntimeError),
                            **fit_kwargs()).fit(model, X, y)
    failed = [h["solver_failed"] for h in s.history_]
    assert failed == [False, True, False]
    h = s.history_[1]
    assert h["reason"] == "solver failed" and h["accepted"] is False
    assert h["alpha"] == [0.0] * s.n_components_ and h["candidate_finite"] is None
    assert any("injected fault" in m for m in h["solver_warnings"])
    # a zero step counts as a rollback for the amplitude controller
    assert s.history_[2]["budget"] == pytest.approx(0.7 * h["budget"])


def test_internal_cvxpy_failure_is_recorded_as_solver_failure(monkeypatch):
    import cvxpy as cp

    def broken(self, *args, **kwargs):
        raise cp.error.SolverError("injected cvxpy failure")

    monkeypatch.setattr(cp.Problem, "solve", broken)
    X, y = cnn_data()
    with pytest.warns(SolverWarning):
        s = SpectralSurgeon(**fit_kwargs()).fit(bomb_cnn(), X, y)
    assert all(h["solver_failed"] and h["reason"] == "solver failed" for h in s.history_)
    assert float(s.perturbation_.abs().max()) == 0.0
    assert np.all(s.coef_ == 0)


class NaNSensitivity(SoftmaxSurrogateSensitivity):
    def estimate(self, *args, **kwargs):
        S = super().estimate(*args, **kwargs)
        S[0, 0] = np.nan
        return S


def test_non_finite_sensitivity_gives_a_recorded_zero_step():
    X, y = cnn_data()
    with pytest.warns(RuntimeWarning, match="sensitivity has NaN"):
        s = SpectralSurgeon(sensitivity=NaNSensitivity(kind="margin"),
                            **fit_kwargs()).fit(bomb_cnn(), X, y)
    assert [h["reason"] for h in s.history_] == ["non-finite sensitivity"] * 3
    assert float(s.perturbation_.abs().max()) == 0.0


class BadAmplitude(BaseEstimator):
    def initial(self, budget, max_steps):
        return budget

    def update(self, accepted, signal):
        return float("nan")


def test_amplitude_controller_returning_a_bad_budget_is_refused():
    X, y = cnn_data()
    model = bomb_cnn()
    snap = snapshot(model)
    s = SpectralSurgeon(amplitude=BadAmplitude(), **fit_kwargs())
    with pytest.raises(ValueError, match="amplitude returned the budget nan"):
        s.fit(model, X, y)
    check_intact(model, snap, s)


# ------------------------------------------------------- few-sample classes
def few_sample_problem():
    """A trained 3-class MLP; validation has 40, 40 and 3 samples, the 3 of
    class 2 chosen where the model is wrong (accuracy 0 on them)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(6)
    means = torch.tensor([[2.0, 0, 0, 0, 0], [0, 2.0, 0, 0, 0], [0, 0, 2.0, 0, 0]],
                         dtype=torch.float64)
    Xtr = torch.cat([means[c] + torch.randn(60, 5, generator=g, dtype=torch.float64)
                     for c in range(3)])
    ytr = torch.arange(3).repeat_interleave(60)
    model = tanh_mlp()
    train_full_batch(model, Xtr, ytr, 0.05, 60)
    Xv = torch.cat([means[c] + torch.randn(40, 5, generator=g, dtype=torch.float64)
                    for c in range(2)])
    yv = torch.arange(2).repeat_interleave(40)
    pool = means[2] + 1.5 * torch.randn(400, 5, generator=g, dtype=torch.float64)
    with torch.no_grad():
        wrong = pool[model(pool).argmax(1) != 2][:3]
    assert len(wrong) == 3
    return model, torch.cat([Xv, wrong]), torch.cat([yv, torch.full((3,), 2)])


class RecordingSolver(BaseEstimator):
    problems = []

    def solve(self, problem):
        RecordingSolver.problems.append(problem)
        return CvxpyQPSolver().solve(problem)


def test_few_sample_class_is_shrunk_toward_the_mean_and_warned_about():
    model, X, y = few_sample_problem()
    with torch.no_grad():
        raw = per_class_accuracy(y, model(X).argmax(1), 3)
    assert raw[2] == 0.0 and raw[0] > 0.5
    counts = np.array([40, 40, 3])
    weights = {}
    for n0 in (0.0, 5.0):
        RecordingSolver.problems = []
        with pytest.warns(UserWarning, match=r"Classes \[2\] have fewer than 10 samples"):
            SpectralSurgeon(solver=RecordingSolver(), class_shrinkage=n0, max_steps=1,
                            random_state=0).fit(model, X, y)
        (p,) = RecordingSolver.problems
        # independent reference: (n_j a_j + n0 mean(a)) / (n_j + n0)
        expected = (counts * raw + n0 * raw.mean()) / (counts + n0)
        np.testing.assert_allclose(p.accuracy, expected, rtol=1e-12)
        e = 1 - expected
        np.testing.assert_allclose(p.weights(), e / e.sum(), rtol=1e-12)
        weights[n0] = p.weights()
    # without shrinkage the 3-sample class takes most of the objective
    assert weights[0.0][2] > 0.5
    assert weights[5.0][2] < weights[0.0][2] - 0.1
    np.testing.assert_allclose(shrink_accuracy(raw, counts, 5.0), (counts * raw + 5 * raw.mean())
                               / (counts + 5))


def test_shrinkage_leaves_large_and_absent_classes_alone():
    acc = np.array([0.9, 0.5, np.nan])
    out = shrink_accuracy(acc, np.array([10**6, 10**6, 0]), 5.0)
    np.testing.assert_allclose(out[:2], acc[:2], atol=1e-5)
    assert np.isnan(out[2])
    np.testing.assert_array_equal(shrink_accuracy(acc, np.array([1, 1, 0]), 0.0), acc)


def _state(y, correct):
    y = np.asarray(y)
    correct = np.asarray(correct, dtype=bool)
    pred = np.where(correct, y, (y + 1) % 3)
    acc = per_class_accuracy(y, pred, 3)
    return {"acc": acc, "std": class_std(acc), "correct": correct, "y": y, "finite": True}


def test_noise_aware_acceptance_does_not_let_one_flip_of_a_tiny_class_veto():
    y = np.array([0] * 100 + [1] * 100 + [2] * 2)
    old = _state(y, [True] * 60 + [False] * 40 + [True] * 80 + [False] * 20 + [True, True])
    # 30 more class-0 samples right, and one of the two class-2 samples lost
    new_c = old["correct"].copy()
    new_c[60:90] = True
    new_c[200] = False
    new = _state(y, new_c)
    assert old["acc"][2] - new["acc"][2] == 0.5
    kw = dict(max_std_increase=1.0, max_class_drop=0.07, max_total_class_drop=None,
              max_balanced_accuracy_drop=None)
    start = old["acc"]
    accepted, reason, _ = SpectralSurgeon(acceptance="tolerance", **kw)._decide(old, new, start)
    assert not accepted and reason.startswith("a class dropped by 0.5")
    accepted, reason, _ = SpectralSurgeon(acceptance="noise_aware", **kw)._decide(old, new, start)
    # decided by the σ rule (whose standard error carries the tiny class's
    # noise), not vetoed by the tiny class's drop
    assert not reason.startswith("a class dropped"), reason
    # a real drop of a large class still vetoes: 10 of 100 lost, SE = sqrt(10)/100
    worse_c = new_c.copy()
    worse_c[100:110] = False
    worse = _state(y, worse_c)
    accepted, reason, _ = SpectralSurgeon(acceptance="noise_aware", **kw)._decide(old, worse, start)
    assert not accepted and reason.startswith("a class dropped by 0.1")


def test_noise_aware_fit_runs_with_a_few_sample_class():
    model, X, y = few_sample_problem()
    snap = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        s = SpectralSurgeon(acceptance="noise_aware", max_steps=3, random_state=0).fit(
            model, X, y)
    assert len(s.history_) == 3 and torch.isfinite(s.perturbation_).all()
    assert_unchanged(model, snap)
