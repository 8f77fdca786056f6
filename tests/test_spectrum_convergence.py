"""Issue 14, item 4: power iteration stops on the test its flags use, its advice
works when followed, the surgeon warns once per fit; DenseSpectrum's default
size limit."""

import warnings

import numpy as np
import pytest
import torch

from hessrebal import SpectralSurgeon
from hessrebal.spectrum import (
    ConvergenceWarning,
    DenseSpectrum,
    LanczosSpectrum,
    MatrixOperator,
    PowerIterationSpectrum,
)
from tests.conftest import PAPER_RULES, trained_blobs_mlp

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _planted(dim=60, spikes=(10.0, 9.0, 8.2, 7.5, 7.0), seed=0):
    """Close spikes over a bulk in [-0.5, 0.5]: slow for power iteration."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    bulk = torch.rand(dim - len(spikes), generator=g, dtype=torch.float64) - 0.5
    lam = torch.cat([torch.tensor(spikes, dtype=torch.float64), bulk])
    return MatrixOperator(Q @ torch.diag(lam) @ Q.T), np.array(spikes)


def _compute(backend, op, k):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = backend.compute(op, k)
    return spec, [w for w in caught if issubclass(w.category, ConvergenceWarning)]


def test_flags_agree_with_the_stop():
    op, _ = _planted()
    for max_iter in (5, 20, 80, 400):
        spec, _ = _compute(PowerIterationSpectrum(tol=1e-4, max_iter=max_iter,
                                                  random_state=0), op, 5)
        n_iter = np.array(spec.info["n_iter"])
        # a pair that stopped early converged; an unconverged one used every product
        assert np.all(spec.converged[n_iter < max_iter])
        assert np.all(n_iter[~spec.converged] == max_iter)


def test_the_warnings_advice_works():
    op, spikes = _planted()
    spec, caught = _compute(PowerIterationSpectrum(tol=1e-5, max_iter=20, random_state=0),
                            op, 5)
    assert caught and "raise max_iter" in str(caught[0].message)
    assert not spec.all_converged
    spec, caught = _compute(PowerIterationSpectrum(tol=1e-5, max_iter=2000, random_state=0),
                            op, 5)
    assert spec.all_converged and not caught
    np.testing.assert_allclose(spec.eigenvalues.numpy(), spikes, rtol=1e-5)
    # a smaller tol converges too, given the products (PyHessian's rule: 0 of 5)
    spec, caught = _compute(PowerIterationSpectrum(tol=1e-7, max_iter=5000, random_state=0),
                            op, 5)
    assert spec.all_converged and not caught
    assert np.max(spec.residuals) <= 1e-7


def test_eigenvectors_are_accurate_when_flagged_converged():
    op, _ = _planted()
    power, _ = _compute(PowerIterationSpectrum(tol=1e-4, max_iter=2000, random_state=0), op, 5)
    exact = DenseSpectrum().compute(op, 5)
    cos = torch.abs(torch.sum(power.eigenvectors * exact.eigenvectors, dim=0))
    assert torch.all(cos > 0.999), cos


def test_surgeon_warns_once_per_fit():
    model, X, y = trained_blobs_mlp(0, [30, 30, 30])
    surgeon = SpectralSurgeon(spectrum=PowerIterationSpectrum(max_iter=2, tol=1e-8),
                              max_steps=6, budget=0.3, random_state=0, **PAPER_RULES)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        surgeon.fit(model, X, y)
    refreshes = sum(h["accepted"] for h in surgeon.history_[:-1])
    assert refreshes >= 1, "the test needs refreshed spectra"
    conv = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert len(conv) == 1, [str(w.message) for w in conv]
    text = str(conv[0].message)
    assert f"of {1 + refreshes} spectrum computations of this fit" in text
    assert "raise max_iter" in text
    # outside a fit, each computation still warns on its own
    op, _ = _planted()
    _, direct = _compute(PowerIterationSpectrum(max_iter=2, tol=1e-8), op, 3)
    assert len(direct) == 1


def test_lanczos_in_the_surgeon_is_silent_when_converged():
    model, X, y = trained_blobs_mlp(0, [30, 30, 30])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SpectralSurgeon(spectrum=LanczosSpectrum(tol=1e-3), max_steps=3, random_state=0,
                        **PAPER_RULES).fit(model, X, y)
    assert not [w for w in caught if issubclass(w.category, ConvergenceWarning)]


def test_dense_default_max_dim_refuses_what_takes_too_long():
    assert DenseSpectrum().max_dim == 1500
    op = MatrixOperator(torch.eye(1501, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_dim=1500.*LanczosSpectrum"):
        DenseSpectrum().compute(op, 1)
    # a raised limit is honoured
    small = MatrixOperator(torch.diag(torch.arange(1.0, 1601.0, dtype=torch.float64)))
    assert float(DenseSpectrum(max_dim=1600).compute(small, 1).eigenvalues[0]) == 1600.0


def test_power_iteration_does_not_stop_on_a_bulk_vector():
    """Late pairs once stopped on their first product: against λ₁, a random
    start in a large bulk has a tiny residual, so bulk values came back
    flagged converged (seen on the demo model: λ₈ = λ₉ = 0)."""
    spikes = torch.tensor([100, 60, 40, 25, 15, 10, 7, 5, 4.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    diag = torch.cat([spikes, 0.05 * torch.rand(5000, generator=g, dtype=torch.float64)])
    A = torch.diag(diag)
    spec = PowerIterationSpectrum(tol=1e-4, max_iter=500, random_state=0).compute(
        MatrixOperator(A), 9)
    np.testing.assert_allclose(spec.eigenvalues.numpy(), spikes.numpy(), rtol=1e-3)
    assert spec.converged.all()
