"""Bad input to SpectralSurgeon: a ValueError/TypeError naming the argument,
raised before any Hessian-vector product, and a clear warning for a class
absent from the validation data."""

import numpy as np
import pytest
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hessrebal import SpectralSurgeon
from hessrebal.amplitude import AdamSNR, GammaDecay, GrowShrink
from hessrebal.curvature import HessianOperator
from hessrebal.sensitivity import FiniteDifferenceSensitivity, SoftmaxSurrogateSensitivity
from hessrebal.solvers import CvxpyQPSolver, ProjectedGradientSolver
from hessrebal.spectrum import LanczosSpectrum
from tests.conftest import tanh_mlp, tiny_cnn

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, D_IN, C = 30, 5, 3
D = D_IN * 6 + 6 + 6 * C + C  # parameters of tanh_mlp()


def data(n=N):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, D_IN, generator=g, dtype=torch.float64), torch.arange(n) % C


@pytest.fixture
def hvp_calls(monkeypatch):
    """Counts Hessian-vector products: a bad input must fail before the first."""
    calls = []
    original = HessianOperator.matvec

    def counting(self, v):
        calls.append(1)
        return original(self, v)

    monkeypatch.setattr(HessianOperator, "matvec", counting)
    return calls


def _with(**changes):
    """(surgeon, model, X, y, fit kwargs) with the given changes to the defaults."""
    X, y = data()
    case = {"surgeon": SpectralSurgeon(max_steps=1, random_state=0), "model": tanh_mlp(),
            "X": X, "y": y, "kw": {}}
    case.update(changes)
    return case


def _model_with(value, where="weight"):
    m = tanh_mlp()
    with torch.no_grad():
        getattr(m[0], where).view(-1)[1] = value
    return m


def _cnn_with_nan_statistics():
    m = tiny_cnn()
    m.bn.running_var[0] = float("nan")
    return m


class _UninitialisedNet:
    """Looks like a skorch net before initialize(): a module class, no module_."""

    module = nn.Linear


class _NoCompute(BaseEstimator):
    def solve(self, problem):  # a solver where a spectrum backend is expected
        return np.zeros(problem.n_components)


X0, Y0 = data()
Y_FLOAT = Y0.to(torch.float64)
Y_FLOAT[4] = 0.5

BAD = [
    # data
    ("X/y length mismatch", _with(y=Y0[:-1]), ValueError, r"X_val and y_val have different"),
    ("label >= outputs", _with(y=torch.where(Y0 == 2, 3, Y0)), ValueError,
     r"y_val contains label 3 but the model has 3 outputs"),
    ("negative label", _with(y=torch.where(Y0 == 2, -1, Y0)), ValueError,
     r"y_val contains negative label"),
    ("fractional label", _with(y=Y_FLOAT), ValueError, r"y_val contains fractional"),
    ("2-D labels", _with(y=torch.stack([Y0, Y0], 1)), ValueError, r"y_val must be 1-D"),
    ("NaN in X", _with(X=torch.where(torch.arange(N)[:, None] == 7, float("nan"), X0)),
     ValueError, r"X_val contains NaN or infinite"),
    ("inf in X", _with(X=torch.where(torch.arange(N)[:, None] == 7, float("inf"), X0)),
     ValueError, r"X_val contains NaN or infinite"),
    ("empty X", _with(X=X0[:0], y=Y0[:0]), ValueError, r"X_val is empty"),
    ("empty DataLoader", _with(X=DataLoader(TensorDataset(X0[:0], Y0[:0])), y=None),
     ValueError, r"X_val is empty"),
    ("label >= outputs in a DataLoader",
     _with(X=DataLoader(TensorDataset(X0, Y0 + 1), batch_size=7), y=None), ValueError,
     r"y_val contains label 3"),
    ("y_val beside a DataLoader", _with(X=DataLoader(TensorDataset(X0, Y0))), ValueError,
     r"y_val must be None"),
    ("X of the wrong type", _with(X="images"), TypeError, r"X_val must be a torch.Tensor"),
    ("X the model cannot take", _with(X=X0[:, :4]), ValueError,
     r"model cannot take X_val of shape \(30, 4\)"),
    ("images for an MLP", _with(X=torch.randn(N, 1, 5, 5, dtype=torch.float64)), ValueError,
     r"cannot take X_val"),
    ("curvature_data the model cannot take", _with(kw={"curvature_data": (X0[:, :3], Y0)}),
     ValueError, r"cannot take curvature_data"),
    ("curvature_data label >= outputs", _with(kw={"curvature_data": (X0, Y0 + 1)}),
     ValueError, r"curvature_data contains label 3"),
    # model
    ("model not a Module", _with(model="resnet.pt"), TypeError,
     r"model must be a torch.nn.Module or a fitted skorch net"),
    ("model an sklearn estimator", _with(model=CvxpyQPSolver()), TypeError, r"model must be"),
    ("uninitialised skorch net", _with(model=_UninitialisedNet()), TypeError,
     r"uninitialised skorch net"),
    ("NaN weight", _with(model=_model_with(float("nan"))), ValueError,
     r"model has NaN or infinite values in parameter '0.weight'"),
    ("inf bias", _with(model=_model_with(float("-inf"), "bias")), ValueError,
     r"parameter '0.bias'"),
    ("NaN BatchNorm statistics",
     _with(model=_cnn_with_nan_statistics(), X=torch.randn(12, 1, 5, 5, dtype=torch.float64),
           y=torch.arange(12) % 3), ValueError,
     r"model gives NaN or infinite logits.*buffer 'bn.running_var'"),
    # settings
    ("unknown params name", _with(surgeon=SpectralSurgeon(params=["fc"])), ValueError,
     r"params: unknown parameter name or prefix 'fc'"),
    ("params of the wrong type", _with(surgeon=SpectralSurgeon(params=3)), TypeError,
     r"params must be"),
    ("budget zero", _with(surgeon=SpectralSurgeon(budget=0.0)), ValueError,
     r"budget must be a positive number"),
    ("budget negative", _with(surgeon=SpectralSurgeon(budget=-0.1)), ValueError,
     r"budget must be a positive"),
    ("budget NaN", _with(surgeon=SpectralSurgeon(budget=float("nan"))), ValueError,
     r"budget must be a positive"),
    ("budget inf", _with(surgeon=SpectralSurgeon(budget=float("inf"))), ValueError,
     r"budget must be a positive"),
    ("grow = 1", _with(surgeon=SpectralSurgeon(amplitude=GrowShrink(grow=1.0))), ValueError,
     r"amplitude=GrowShrink.*grow must be > 1"),
    ("grow < 1", _with(surgeon=SpectralSurgeon(amplitude=GrowShrink(grow=0.5))), ValueError,
     r"grow must be > 1"),
    ("shrink = 1", _with(surgeon=SpectralSurgeon(amplitude=GrowShrink(shrink=1.0))),
     ValueError, r"amplitude=.*shrink must lie in \(0, 1\)"),
    ("shrink = 0", _with(surgeon=SpectralSurgeon(amplitude=GrowShrink(shrink=0.0))),
     ValueError, r"shrink must lie in \(0, 1\)"),
    ("gamma = 1", _with(surgeon=SpectralSurgeon(amplitude=GammaDecay(gamma=1.0))), ValueError,
     r"amplitude=GammaDecay.*gamma must lie in \(0, 1\)"),
    ("gamma = 0", _with(surgeon=SpectralSurgeon(amplitude=GammaDecay(gamma=0.0))), ValueError,
     r"gamma must lie in \(0, 1\)"),
    ("gamma a string", _with(surgeon=SpectralSurgeon(amplitude=GammaDecay(gamma="0.5"))),
     TypeError, r"gamma must be a real number"),
    ("min_fraction = 0", _with(surgeon=SpectralSurgeon(amplitude=AdamSNR(min_fraction=0))),
     ValueError, r"min_fraction must lie in"),
    ("unknown objective", _with(surgeon=SpectralSurgeon(objective="balanced")), ValueError,
     r"objective must be one of"),
    ("unknown budget_shape", _with(surgeon=SpectralSurgeon(budget_shape="ball")), ValueError,
     r"budget_shape must be one of"),
    ("unknown acceptance", _with(surgeon=SpectralSurgeon(acceptance="lenient")), ValueError,
     r"acceptance must be one of"),
    ("unknown curvature", _with(surgeon=SpectralSurgeon(curvature="fisher")), ValueError,
     r"curvature must be"),
    ("negative total class drop", _with(surgeon=SpectralSurgeon(max_total_class_drop=-0.1)),
     ValueError, r"max_total_class_drop"),
    ("negative balanced-accuracy drop",
     _with(surgeon=SpectralSurgeon(max_balanced_accuracy_drop=-1)), ValueError,
     r"max_balanced_accuracy_drop"),
    ("imbalance_alpha out of (0, 1)", _with(surgeon=SpectralSurgeon(imbalance_alpha=1.0)),
     ValueError, r"imbalance_alpha must be"),
    ("n_components = 0", _with(surgeon=SpectralSurgeon(n_components=0)), ValueError,
     r"n_components must be an int >= 1"),
    ("n_components a bool", _with(surgeon=SpectralSurgeon(n_components=True)), ValueError,
     r"n_components must be"),
    ("n_components > D", _with(surgeon=SpectralSurgeon(n_components=D + 1)), ValueError,
     rf"n_components={D + 1} exceeds the number of selected parameters \({D}\)"),
    ("n_components > D of a selection",
     _with(surgeon=SpectralSurgeon(n_components=22, params=["2"])), ValueError,
     r"n_components=22 exceeds the number of selected parameters \(21\)"),
    ("negative weight_power", _with(surgeon=SpectralSurgeon(weight_power=-1)), ValueError,
     r"weight_power"),
    ("strong_threshold > 1", _with(surgeon=SpectralSurgeon(strong_threshold=1.5)), ValueError,
     r"strong_threshold"),
    ("negative max_class_drop", _with(surgeon=SpectralSurgeon(max_class_drop=-0.1)),
     ValueError, r"max_class_drop"),
    ("negative class_shrinkage", _with(surgeon=SpectralSurgeon(class_shrinkage=-1.0)),
     ValueError, r"class_shrinkage"),
    ("infinite class_shrinkage", _with(surgeon=SpectralSurgeon(class_shrinkage=np.inf)),
     ValueError, r"class_shrinkage"),
    ("negative max_steps", _with(surgeon=SpectralSurgeon(max_steps=-1)), ValueError,
     r"max_steps"),
    ("batch_size 0", _with(surgeon=SpectralSurgeon(batch_size=0)), ValueError, r"batch_size"),
    ("selection_fraction 1", _with(surgeon=SpectralSurgeon(selection_fraction=1.0)),
     ValueError, r"selection_fraction"),
    ("random_state a string", _with(surgeon=SpectralSurgeon(random_state="seed")), ValueError,
     r"random_state"),
    ("output_to_logits not callable", _with(surgeon=SpectralSurgeon(output_to_logits="logits")),
     TypeError, r"output_to_logits must be callable"),
    # strategies
    ("finite-difference step < 0",
     _with(surgeon=SpectralSurgeon(sensitivity=FiniteDifferenceSensitivity(step=-1.0))),
     ValueError, r"sensitivity=FiniteDifferenceSensitivity.*step must be a positive"),
    ("finite-difference scheme",
     _with(surgeon=SpectralSurgeon(sensitivity=FiniteDifferenceSensitivity(scheme="backward"))),
     ValueError, r"scheme must be one of"),
    ("surrogate kind",
     _with(surgeon=SpectralSurgeon(sensitivity=SoftmaxSurrogateSensitivity(kind="hinge"))),
     ValueError, r"sensitivity=.*kind must be one of"),
    ("solver max_iter", _with(surgeon=SpectralSurgeon(solver=ProjectedGradientSolver(max_iter=0))),
     ValueError, r"solver=ProjectedGradientSolver.*max_iter must be >= 1"),
    ("cvxpy solver name", _with(surgeon=SpectralSurgeon(solver=CvxpyQPSolver(solver="NOPE"))),
     ValueError, r"solver=.*not an installed cvxpy solver"),
    ("spectrum without compute()", _with(surgeon=SpectralSurgeon(spectrum=_NoCompute())),
     TypeError, r"spectrum must have a compute\(\) method"),
    ("amplitude without update()", _with(surgeon=SpectralSurgeon(amplitude=object())), TypeError,
     r"amplitude must have a initial\(\) method"),
    ("Lanczos tol < 0", _with(surgeon=SpectralSurgeon(spectrum=LanczosSpectrum(tol=-1.0))),
     ValueError, r"tol must be a positive"),
]


@pytest.mark.parametrize("case,exc,match", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_refused_by_name_before_any_hessian_product(hvp_calls, case, exc, match):
    with pytest.raises(exc, match=match):
        case["surgeon"].fit(case["model"], case["X"], case["y"], **case["kw"])
    assert hvp_calls == []
    # the failed fit left the surgeon unfitted
    with pytest.raises(NotFittedError):
        case["surgeon"].transform(tanh_mlp())


def test_valid_input_does_reach_the_hessian(hvp_calls):
    # The counter works: the same set-up without the fault computes products.
    X, y = data()
    SpectralSurgeon(max_steps=1, random_state=0).fit(tanh_mlp(), X, y)
    assert len(hvp_calls) > 0


def test_transform_score_save_before_fit_raise_not_fitted(tmp_path):
    s = SpectralSurgeon()
    X, y = data()
    with pytest.raises(NotFittedError):
        s.transform(tanh_mlp())
    with pytest.raises(NotFittedError):
        s.score(tanh_mlp(), X, y)
    with pytest.raises(NotFittedError):
        s.save(tmp_path / "s.safetensors")


@pytest.fixture(scope="module")
def fitted():
    X, y = data()
    return SpectralSurgeon(max_steps=1, random_state=0).fit(tanh_mlp(), X, y)


@pytest.mark.parametrize("model,match", [
    (nn.Sequential(nn.Linear(5, 6)), r"model has no parameter '2.weight'"),
    (tanh_mlp(hidden=7), r"model.0.weight has shape \(7, 5\); the surgeon was fitted on "
                         r"shape \(6, 5\)"),
    (tanh_mlp(n_classes=4), r"model.2.weight has shape \(4, 6\)"),
    (nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3, bias=False)),
     r"model has no parameter '2.bias'"),
], ids=["missing layer", "first layer wider", "more classes", "missing bias"])
def test_transform_and_score_name_the_first_mismatching_parameter(fitted, model, match):
    X, y = data()
    with pytest.raises(ValueError, match=match):
        fitted.transform(model)
    with pytest.raises(ValueError, match=match):
        fitted.score(model, X, y)


def test_transform_of_a_non_model_is_a_type_error(fitted):
    with pytest.raises(TypeError, match="model must be"):
        fitted.transform({"0.weight": torch.zeros(6, 5)})


def test_transform_accepts_a_model_with_extra_parameters(fitted):
    # Only the fitted parameters must match; others are left alone.
    model = tanh_mlp()
    model.register_parameter("extra", nn.Parameter(torch.ones(2, dtype=torch.float64)))
    new = fitted.transform(model)
    assert torch.equal(new.extra, model.extra)


def test_a_class_absent_from_validation_is_warned_about_and_left_out():
    from hessrebal.solvers import CvxpyQPSolver as QP

    problems = []

    class Recording(BaseEstimator):
        def solve(self, problem):
            problems.append(problem)
            return QP().solve(problem)

    X, y = data(40)
    keep = y != 2
    with pytest.warns(UserWarning, match=r"Classes \[2\] have no sample in y_val; they are "
                                         r"left out"):
        s = SpectralSurgeon(max_steps=2, solver=Recording(), random_state=0).fit(
            tanh_mlp(), X[keep], y[keep])
    assert s.n_classes_ == 3 and np.isnan(s.per_class_accuracy_before_[2])
    assert np.all(np.isfinite(s.per_class_accuracy_before_[:2]))
    assert problems, "the solver was never called"
    for p in problems:
        assert not p.present_mask()[2] and p.weights()[2] == 0
        np.testing.assert_allclose(p.weights()[:2].sum(), 1.0)
    for h in s.history_:
        assert np.isfinite(h["class_std"]) and np.isnan(h["per_class_accuracy"][2])
        present = np.asarray(h["per_class_accuracy"])[:2]
        assert h["class_std"] == pytest.approx(np.std(present))
