"""Control directions (random, bulk) against planted operators and a dense Hessian."""

import numpy as np
import pytest
import torch

from hessrebal import SpectralSurgeon
from hessrebal.controls import BulkDirections, RandomDirections
from hessrebal.spectrum import DenseSpectrum, LanczosSpectrum, MatrixOperator
from tests._reference import dense_hessian
from tests.conftest import PAPER_RULES, tanh_mlp

SPIKES = [100.0, 50.0, 30.0, 20.0]


def planted(dim=80, seed=0):
    """A symmetric matrix with 4 spikes over a bulk in [0, 1], in a random basis."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    bulk = torch.rand(dim - len(SPIKES), generator=g, dtype=torch.float64)
    d = torch.cat([torch.tensor(SPIKES, dtype=torch.float64), bulk])
    return U @ torch.diag(d) @ U.T, U[:, : len(SPIKES)], d


def test_random_directions_are_orthonormal_with_rayleigh_quotients():
    A, _, _ = planted()
    op = MatrixOperator(A)
    spec = RandomDirections(random_state=3).compute(op, 5)
    Q = spec.eigenvectors
    assert Q.shape == (80, 5)
    assert torch.allclose(Q.T @ Q, torch.eye(5, dtype=torch.float64), atol=1e-12)
    # Eigenvalues are the Rayleigh quotients, descending, with their vectors.
    expected = torch.diagonal(Q.T @ A @ Q)
    assert torch.allclose(spec.eigenvalues, expected, atol=1e-12)
    assert torch.all(spec.eigenvalues[:-1] >= spec.eigenvalues[1:])
    # Exact residuals of the pairs (relative to max |ρ|).
    r = torch.linalg.vector_norm(A @ Q - Q * spec.eigenvalues, dim=0)
    np.testing.assert_allclose(spec.residuals, (r / spec.eigenvalues.abs().max()).numpy(),
                               rtol=1e-10)
    assert spec.n_matvec == 5 and op.n_matvec == 5


def test_random_directions_are_random_and_far_from_spikes():
    A, U, _ = planted(dim=400)
    a = RandomDirections(random_state=0).compute(MatrixOperator(A), 3).eigenvectors
    b = RandomDirections(random_state=0).compute(MatrixOperator(A), 3).eigenvectors
    c = RandomDirections(random_state=1).compute(MatrixOperator(A), 3).eigenvectors
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # A random unit vector has squared overlap ~ 4/400 with a 4-dim subspace.
    overlap = torch.linalg.matrix_norm(U.T @ a, ord=2)
    assert overlap < 0.5


def test_random_directions_keep_init_subspace():
    A, _, _ = planted()
    first = RandomDirections(random_state=0).compute(MatrixOperator(A), 4)
    B = A + 0.5 * torch.eye(80, dtype=torch.float64)
    again = RandomDirections(random_state=99).compute(MatrixOperator(B), 4,
                                                      init=first.eigenvectors)
    # Same subspace (projector), Rayleigh quotients recomputed on the new operator.
    P1 = first.eigenvectors @ first.eigenvectors.T
    P2 = again.eigenvectors @ again.eigenvectors.T
    assert torch.allclose(P1, P2, atol=1e-10)
    expected = torch.diagonal(again.eigenvectors.T @ B @ again.eigenvectors)
    assert torch.allclose(again.eigenvalues, expected, atol=1e-12)
    # Fewer init columns than wanted: the rest is random and orthogonal to them.
    mixed = RandomDirections(random_state=5).compute(MatrixOperator(A), 4,
                                                     init=first.eigenvectors[:, :2])
    Q = mixed.eigenvectors
    assert torch.allclose(Q.T @ Q, torch.eye(4, dtype=torch.float64), atol=1e-12)
    kept = first.eigenvectors[:, :2]
    assert torch.allclose(Q @ (Q.T @ kept), kept, atol=1e-10)


def test_bulk_directions_orthogonal_to_planted_spikes():
    A, U, d = planted()
    backend = BulkDirections(n_exclude=4, spectrum=LanczosSpectrum(tol=1e-10), random_state=0)
    spec = backend.compute(MatrixOperator(A), 6)
    Q = spec.eigenvectors
    assert torch.allclose(Q.T @ Q, torch.eye(6, dtype=torch.float64), atol=1e-12)
    assert float(torch.linalg.matrix_norm(U.T @ Q, ord=2)) < 1e-8
    # Rayleigh quotients lie inside the bulk [0, 1] and match qᵀAq.
    assert float(spec.eigenvalues.max()) <= float(d[4:].max()) + 1e-8
    assert float(spec.eigenvalues.min()) >= float(d[4:].min()) - 1e-8
    assert torch.allclose(spec.eigenvalues, torch.diagonal(Q.T @ A @ Q), atol=1e-12)
    np.testing.assert_allclose(spec.info["spike_eigenvalues"], SPIKES, rtol=1e-8)
    assert spec.n_matvec == spec.info["spike_n_matvec"] + 6
    assert backend.spikes_.shape == (80, 4)


def test_bulk_directions_default_excludes_k_plus_one():
    A, U, d = planted()
    # k = 3 requested directions -> 4 excluded: exactly the planted spikes.
    spec = BulkDirections(spectrum=DenseSpectrum(), random_state=1).compute(MatrixOperator(A), 3)
    assert spec.info["n_exclude"] == 4
    assert float(torch.linalg.matrix_norm(U.T @ spec.eigenvectors, ord=2)) < 1e-10


def test_bulk_directions_warm_start_keeps_bulk_subspace():
    A, U, _ = planted()
    backend = BulkDirections(n_exclude=4, spectrum=LanczosSpectrum(tol=1e-10), random_state=0)
    first = backend.compute(MatrixOperator(A), 5)
    # A new operator whose spikes are rotated a little: the kept directions
    # are re-projected off the *new* spikes.
    g = torch.Generator().manual_seed(7)
    E = 1e-2 * torch.randn(80, 80, generator=g, dtype=torch.float64)
    B = A + E + E.T
    second = backend.compute(MatrixOperator(B), 5, init=first.eigenvectors)
    evals, evecs = torch.linalg.eigh(B)
    new_spikes = evecs[:, -4:]
    Q = second.eigenvectors
    assert float(torch.linalg.matrix_norm(new_spikes.T @ Q, ord=2)) < 1e-8
    # Nearly the same subspace as before (the spikes moved by ~1e-3).
    P1 = first.eigenvectors @ first.eigenvectors.T
    P2 = Q @ Q.T
    assert float(torch.linalg.matrix_norm(P1 - P2, ord=2)) < 1e-2


@pytest.mark.parametrize("backend", [RandomDirections, BulkDirections])
def test_controls_validate_n_components(backend):
    A, _, _ = planted(dim=10)
    with pytest.raises((ValueError, TypeError), match="n_components"):
        backend(random_state=0).compute(MatrixOperator(A), 0)
    with pytest.raises(TypeError, match="matvec"):
        backend(random_state=0).compute(A, 2)


def test_bulk_directions_validate_n_exclude():
    A, _, _ = planted(dim=10)
    with pytest.raises(ValueError, match="n_exclude"):
        BulkDirections(n_exclude=0).compute(MatrixOperator(A), 2)
    with pytest.raises(ValueError, match="n_exclude"):
        BulkDirections(n_exclude=9).compute(MatrixOperator(A), 2)


def test_surgeon_with_bulk_control_moves_off_the_dense_spikes():
    """With the spectrum computed once, every step of a bulk-control surgery
    lies in a subspace orthogonal to the top Hessian eigenvectors at θ₀,
    which a dense float64 Hessian confirms."""
    torch.manual_seed(0)
    model = tanh_mlp(d_in=4, hidden=5, n_classes=3)
    y = torch.arange(90) % 3
    X = torch.randn(90, 4, dtype=torch.float64) + 0.8 * y[:, None].to(torch.float64)
    surgeon = SpectralSurgeon(
        spectrum=BulkDirections(spectrum=DenseSpectrum()), refresh_spectrum=0, budget=0.5,
        max_steps=4, max_std_increase=1.0, max_class_drop=1.0, strong_threshold=1.0,
        random_state=0, **PAPER_RULES).fit(model, X, y)
    H = dense_hessian(model, X, y)
    evals, evecs = torch.linalg.eigh(H)
    top = evecs[:, -3:]  # n_exclude = k + 1 = 3 for C = 3 classes
    delta = surgeon.perturbation_
    assert float(torch.linalg.vector_norm(delta)) > 0  # it did move
    assert float(torch.linalg.vector_norm(top.T @ delta)) < 1e-8 * float(
        torch.linalg.vector_norm(delta)) + 1e-12
    # The surgeon's "eigenvalues" are the directions' Rayleigh quotients.
    Q = surgeon.eigenvectors_
    np.testing.assert_allclose(surgeon.eigenvalues_, torch.diagonal(Q.T @ H @ Q).numpy(),
                               rtol=1e-6, atol=1e-10)
