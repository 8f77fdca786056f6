"""float16/bfloat16 models: curvature, sensitivities and the solve run in
float32, the step is applied in the model's dtype, and the user's model and its
dtype are left alone."""

import copy

import numpy as np
import pytest
import torch

from hessrebal import SpectralSurgeon
from hessrebal.curvature import HessianOperator
from hessrebal.metrics import per_class_accuracy
from hessrebal.sensitivity import FiniteDifferenceSensitivity
from tests.conftest import (
    PAPER_RULES,
    assert_unchanged,
    snapshot,
    tiny_cnn,
    trained_blobs_mlp,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Relative eigenvalue agreement with the float32 model: one unit of the
# low-precision format (2^-8 for bfloat16, 2^-11 for float16), since the
# Hessian moves with the rounded weights (measured: 9e-4 and 1.6e-4).
EIG_RTOL = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.fixture(scope="module")
def problem():
    model, X, y = trained_blobs_mlp(7, [30, 30, 12])
    return model.float(), X.float(), y


def fit(model, X, y, **kw):
    # The paper's rule, so that steps are accepted and the rounding is exercised.
    kw = {"max_steps": 4, "random_state": 0, **PAPER_RULES, **kw}
    return SpectralSurgeon(**kw).fit(model, X, y)


def native_accuracy(model, X, y):
    """Per-class accuracy of ``model`` run as is (its own dtype)."""
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        pred = model.eval()(X.to(dtype)).argmax(1)
    return per_class_accuracy(y, pred, 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_fit_matches_float32_and_leaves_the_model_alone(problem, dtype):
    model32, X, y = problem
    low = copy.deepcopy(model32).to(dtype)
    snap = snapshot(low)
    s = fit(low, X, y)
    assert_unchanged(low, snap)
    assert all(p.dtype == dtype for p in low.parameters())

    # The same function computed in float32 (the low-precision weights, widened)
    # gives the very same spectrum: the curvature really runs in float32.
    widened = fit(copy.deepcopy(low).float(), X, y)
    assert np.array_equal(s.eigenvalues_, widened.eigenvalues_)
    assert torch.equal(s.eigenvectors_, widened.eigenvectors_)
    # ... and the float32 original's spectrum to the format's accuracy.
    reference = fit(model32, X, y)
    np.testing.assert_allclose(s.eigenvalues_, reference.eigenvalues_, rtol=EIG_RTOL[dtype])
    assert s.eigenvalues_[0] > 10 * abs(s.eigenvalues_[0] - reference.eigenvalues_[0])

    assert s.perturbation_.dtype == torch.float32 and s.sensitivity_.dtype == np.float64
    accepted = [h for h in s.history_ if h["accepted"]]
    assert accepted, "no step was accepted; the test would not check the applied step"

    # The step is applied in the model's dtype, rounded once from the float32 sum.
    out = s.transform(low)
    assert all(p.dtype == dtype for p in out.parameters())
    theta0 = torch.cat([p.detach().float().reshape(-1) for p in low.parameters()])
    expected = (theta0 + s.perturbation_).to(dtype)
    got = torch.cat([p.detach().reshape(-1) for p in out.parameters()])
    assert torch.equal(got, expected) and not torch.equal(got, theta0.to(dtype))
    # What the surgeon reports is what the changed low-precision model does.
    np.testing.assert_array_equal(native_accuracy(out, X, y), s.per_class_accuracy_after_)
    np.testing.assert_array_equal(native_accuracy(low, X, y), s.per_class_accuracy_before_)
    assert s.score(low, X, y) == pytest.approx(float(np.mean(native_accuracy(out, X, y))))


def test_hessian_operator_on_bfloat16_computes_in_float32(problem):
    model32, X, y = problem
    low = copy.deepcopy(model32).to(torch.bfloat16)
    op = HessianOperator(low, X, y)
    ref = HessianOperator(copy.deepcopy(low).float(), X, y)
    assert op.dtype == torch.float32 and op.theta.dtype == torch.float32
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(0))
    hv = op @ v
    assert hv.dtype == torch.float32 and torch.equal(hv, ref @ v)
    # A vector of the model's dtype is accepted and widened.
    assert torch.equal(op @ v.to(torch.bfloat16), ref @ v.to(torch.bfloat16).float())


def test_finite_difference_sensitivity_is_not_lost_to_bfloat16_rounding(problem):
    """Finite-difference probes smaller than bfloat16's resolution would give a
    zero sensitivity if the model were evaluated in bfloat16."""
    model32, X, y = problem
    low = copy.deepcopy(model32).to(torch.bfloat16)
    kw = {"sensitivity": FiniteDifferenceSensitivity(), "max_steps": 1}
    s = fit(low, X, y, **kw)
    ref = fit(copy.deepcopy(low).float(), X, y, **kw)
    assert np.abs(s.sensitivity_).max() > 0
    np.testing.assert_array_equal(s.sensitivity_, ref.sensitivity_)


def test_bfloat16_cnn_with_batchnorm_buffers(tmp_path):
    """Low-precision buffers (BatchNorm statistics) are widened too, and the
    saved surgeon transforms the model bitwise like the original."""
    torch.manual_seed(0)
    model = tiny_cnn(dtype=torch.bfloat16)
    X = torch.randn(60, 1, 5, 5)
    y = torch.arange(60) % 3
    snap = snapshot(model)
    s = SpectralSurgeon(max_steps=2, random_state=0).fit(model, X, y)
    assert_unchanged(model, snap)
    assert model.bn.running_var.dtype == torch.bfloat16 and model.training
    assert np.all(np.isfinite(s.eigenvalues_)) and s.eigenvalues_[0] > 0
    loaded = SpectralSurgeon.load(s.save(tmp_path / "s.safetensors"))
    a, b = s.transform(model), loaded.transform(model)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert p.dtype == q.dtype and torch.equal(p, q), name
    assert a.conv.weight.dtype == torch.bfloat16
