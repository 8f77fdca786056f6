"""Spectrum backends against independent references: dense float64 Hessians
built with ``torch.autograd.functional.hessian`` (the loss written out with
``functional_call``) and planted-spectrum matrices with known eigenpairs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from torch import nn
from torch.func import functional_call

from hessrebal.curvature import HessianOperator
from hessrebal.spectrum import (
    DeflatedOperator,
    DenseSpectrum,
    LanczosSpectrum,
    MatrixOperator,
    PowerIterationSpectrum,
    Spectrum,
)
from tests.conftest import train_full_batch

torch.set_num_threads(1)


# -- problems ------------------------------------------------------------------


def _mlp_problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(80, 4, generator=g, dtype=torch.float64)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).long() + (X[:, 2] > 0.8).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    train_full_batch(model, X, y, 0.05, 150)
    return model, X, y


def _cnn_problem():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(),
                          nn.Linear(32, 3)).double()
    with torch.no_grad():
        bn = model[1]
        bn.running_mean.copy_(torch.tensor([0.1, -0.2]))
        bn.running_var.copy_(torch.tensor([0.5, 2.0]))
        bn.weight.copy_(torch.tensor([1.3, 0.7]))
    model.eval()
    train_full_batch(model, X, y, 0.03, 100)
    return model, X, y


def _dense_hessian(model, X, y):
    """The reference: autograd's Hessian of the mean cross-entropy in eval mode."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta):
        params = {n: t.view(s) for n, t, s in zip(names, torch.split(theta, sizes), shapes)}
        return nn.functional.cross_entropy(functional_call(model, {**params, **buffers}, (X,)), y)

    was_training = model.training
    model.eval()
    try:
        return torch.autograd.functional.hessian(loss, theta0)
    finally:
        model.train(was_training)


@pytest.fixture(scope="module", params=["mlp_tanh", "cnn_batchnorm"])
def problem(request):
    model, X, y = _mlp_problem() if request.param == "mlp_tanh" else _cnn_problem()
    H = _dense_hessian(model, X, y)
    evals, evecs = torch.linalg.eigh(H)
    return {"model": model, "X": X, "y": y, "H": H,
            "evals": evals.flip(0), "evecs": evecs.flip(1), "name": request.param}


def _planted(dim, spikes, seed=0, bulk=1.0, dtype=torch.float64):
    """``Q diag(λ) Qᵀ`` with the given spikes over a uniform bulk in [0, bulk]."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    lam = torch.rand(dim, generator=g, dtype=torch.float64) * bulk
    lam[: len(spikes)] = torch.as_tensor(np.asarray(spikes, dtype=np.float64))
    A = (Q * lam) @ Q.T
    A = 0.5 * (A + A.T)
    return A.to(dtype), lam, Q


def _true_residuals(H, spec):
    """‖Hv − λv‖ / |λ₁| with the exact |λ₁|."""
    V = spec.eigenvectors.to(H.dtype)
    lam = spec.eigenvalues.to(H.dtype)
    return (torch.linalg.vector_norm(H @ V - V * lam, dim=0)
            / torch.linalg.eigvalsh(H).abs().max()).numpy()


def _assert_reported_residuals_are_true(H, spec, rtol=1e-6):
    """The backend's residuals, times the |λ₁| it divided by, are ‖Hv − λv‖."""
    V = spec.eigenvectors.to(H.dtype)
    lam = spec.eigenvalues.to(H.dtype)
    absolute = torch.linalg.vector_norm(H @ V - V * lam, dim=0).numpy()
    scale = torch.linalg.eigvalsh(H).abs().max().item()
    np.testing.assert_allclose(spec.residuals * spec.info["scale"], absolute,
                               rtol=rtol, atol=1e-12 * scale)


# -- all three backends against the dense Hessian -------------------------------

K = 4


@pytest.mark.parametrize("backend", [
    LanczosSpectrum(tol=1e-6, random_state=0),
    PowerIterationSpectrum(tol=1e-9, max_iter=3000, random_state=0),
    DenseSpectrum(),
], ids=["lanczos", "power", "dense"])
def test_backends_match_dense_hessian(problem, backend):
    op = HessianOperator(problem["model"], problem["X"], problem["y"])
    state = {k: v.clone() for k, v in problem["model"].state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # power: judged below
        spec = backend.compute(op, K)
    ref, ref_vecs = problem["evals"], problem["evecs"]

    assert isinstance(spec, Spectrum)
    assert spec.eigenvalues.dtype == torch.float64 and spec.eigenvalues.shape == (K,)
    assert spec.eigenvectors.shape == (op.shape[0], K)
    assert spec.n_matvec == op.n_matvec  # the backend counts every product it makes
    assert isinstance(spec.residuals, np.ndarray) and spec.converged.dtype == bool
    assert torch.all(spec.eigenvalues[:-1] >= spec.eigenvalues[1:])

    rel = ((spec.eigenvalues - ref[:K]).abs() / ref[:K].abs()).max().item()
    assert rel < 1e-3
    true_res = _true_residuals(problem["H"], spec)
    assert true_res.max() <= 1e-2
    # Reported residuals are the true ones (Lanczos: from its relation).
    _assert_reported_residuals_are_true(problem["H"], spec, rtol=1e-3)
    # Eigenvectors, for eigenvalues separated from their neighbours.
    gaps = (ref[: K + 1, None] - ref[None, : K + 1]).abs() + torch.eye(K + 1) * 1e9
    for i in range(K):
        if gaps[i].min() / ref[0] > 0.01:
            cos = abs(float(spec.eigenvectors[:, i] @ ref_vecs[:, i]))
            assert cos > 0.99, (i, cos)
    for k, v in problem["model"].state_dict().items():
        assert torch.equal(v, state[k])


def test_lanczos_uses_fewer_matvecs_than_power(problem):
    op = HessianOperator(problem["model"], problem["X"], problem["y"])
    lanczos = LanczosSpectrum(tol=1e-3, random_state=0).compute(op, K)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        power = PowerIterationSpectrum(tol=1e-3, random_state=0).compute(op, K)
    assert lanczos.n_matvec < power.n_matvec
    assert lanczos.converged.all()
    ref = problem["evals"][:K]
    assert ((lanczos.eigenvalues - ref).abs() / ref).max() < 1e-3


# -- planted spikes ---------------------------------------------------------------


def test_planted_spikes_to_residual_1e_6():
    spikes = [50.0, 40.0, 30.0, 20.0, 10.0]
    A, lam, Q = _planted(200, spikes)
    spec = LanczosSpectrum(tol=1e-6, random_state=0).compute(MatrixOperator(A), 5)
    assert spec.converged.all()
    assert _true_residuals(A, spec).max() <= 1e-6
    np.testing.assert_allclose(spec.eigenvalues.numpy(), spikes, rtol=1e-10)
    # The spike subspace: all principal cosines with the planted one are 1.
    cosines = torch.linalg.svdvals(Q[:, :5].T @ spec.eigenvectors)
    assert cosines.min() > 1 - 1e-10


def test_power_iteration_stops_on_the_residual_its_flags_use():
    # PyHessian's eigenvalue-change rule stopped here with eigenvalues right to
    # tol and eigenvectors far behind (every pair flagged unconverged, whatever
    # max_iter). The residual rule stops when the flag's test holds.
    A, lam, Q = _planted(200, np.geomspace(100, 5, 9), bulk=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        spec = PowerIterationSpectrum(tol=1e-3, max_iter=500,
                                      random_state=0).compute(MatrixOperator(A), 9)
    assert spec.converged.all() and spec.residuals.max() <= 1e-3
    assert max(spec.info["n_iter"]) < 500
    rel = (spec.eigenvalues - lam[:9]).abs() / lam[:9]
    assert rel.max() < 2e-3
    _assert_reported_residuals_are_true(A, spec)
    lanczos = LanczosSpectrum(tol=1e-3, random_state=0).compute(MatrixOperator(A), 9)
    assert lanczos.n_matvec < spec.n_matvec / 3
    assert (lanczos.eigenvectors.T @ Q[:, :9]).diagonal().abs().min() > 1 - 1e-6


@pytest.mark.parametrize("backend", [
    LanczosSpectrum(tol=1e-8, max_iter=6, random_state=0),
    PowerIterationSpectrum(tol=1e-12, max_iter=3, random_state=0),
], ids=["lanczos", "power"])
def test_too_small_max_iter_is_reported(backend):
    A, _, _ = _planted(150, [9.0, 8.5, 8.0, 7.5, 7.0], bulk=6.0)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        spec = backend.compute(MatrixOperator(A), 5)
    assert not spec.converged.all()
    bad = ~spec.converged
    assert (spec.residuals[bad] > backend.tol).all()
    # Reported residuals are honest: they are the true ones.
    _assert_reported_residuals_are_true(A, spec)


def test_thick_restart_recovers_the_same_pairs():
    A, lam, _ = _planted(300, np.geomspace(20, 2, 6), bulk=1.5)
    small = LanczosSpectrum(tol=1e-8, max_basis=9, random_state=0).compute(MatrixOperator(A), 6)
    assert small.info["n_restarts"] > 0
    assert small.converged.all()
    np.testing.assert_allclose(small.eigenvalues.numpy(), lam[:6].numpy(), rtol=1e-9)
    assert _true_residuals(A, small).max() <= 1e-8


def test_float32_operator():
    A, lam, _ = _planted(300, [30.0, 20.0, 10.0], dtype=torch.float32)
    spec = LanczosSpectrum(tol=1e-3, random_state=0).compute(MatrixOperator(A), 3)
    assert spec.eigenvalues.dtype == torch.float32 and spec.eigenvectors.dtype == torch.float32
    assert spec.converged.all()
    np.testing.assert_allclose(spec.eigenvalues.numpy(), [30.0, 20.0, 10.0], rtol=1e-4)
    assert _true_residuals(A.double(), spec).max() <= 2e-3


# -- warm start and deflated phases (issue 6) --------------------------------------


def test_warm_start_halves_the_matvecs_on_a_slightly_perturbed_operator():
    k = 9
    A, _, _ = _planted(300, np.geomspace(10, 2, k), bulk=1.0)
    g = torch.Generator().manual_seed(5)
    E = torch.randn(300, 300, generator=g, dtype=torch.float64)
    E = 0.5 * (E + E.T)
    A2 = A + 1e-2 * E / torch.linalg.matrix_norm(E, ord=2)  # 0.1 % of ‖A‖
    before = LanczosSpectrum(tol=1e-3, random_state=0).compute(MatrixOperator(A), k)
    cold = LanczosSpectrum(tol=1e-3, random_state=1).compute(MatrixOperator(A2), k)
    warm = LanczosSpectrum(tol=1e-3, random_state=1).compute(
        MatrixOperator(A2), k, init=before.eigenvectors)
    assert warm.n_matvec <= 0.5 * cold.n_matvec, (warm.n_matvec, cold.n_matvec)
    assert warm.converged.all()
    ref = torch.linalg.eigvalsh(A2).flip(0)[:k]
    assert ((warm.eigenvalues - ref).abs() / ref).max() < 1e-3
    assert _true_residuals(A2, warm).max() <= 1e-3


def test_warm_start_on_a_hessian_at_a_nearby_theta():
    model, X, y = _mlp_problem()
    op = HessianOperator(model, X, y)
    before = LanczosSpectrum(tol=1e-3, random_state=0).compute(op, K)
    delta = before.eigenvectors @ torch.tensor([0.05, -0.03, 0.02, 0.01], dtype=torch.float64)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) + delta
    moved = HessianOperator(model, X, y, theta=theta)
    cold = LanczosSpectrum(tol=1e-3, random_state=1).compute(moved, K)
    warm = LanczosSpectrum(tol=1e-3, random_state=1).compute(moved, K, init=before.eigenvectors)
    assert warm.n_matvec < cold.n_matvec
    assert warm.converged.all()
    np.testing.assert_allclose(warm.eigenvalues.numpy(), cold.eigenvalues.numpy(), rtol=1e-3)


def test_warm_start_from_exact_pairs_costs_k_products():
    A, lam, Q = _planted(200, [8.0, 6.0, 4.0, 3.0], bulk=1.0)
    spec = LanczosSpectrum(tol=1e-6, random_state=0).compute(MatrixOperator(A), 4, init=Q[:, :4])
    assert spec.n_matvec == 4
    assert spec.info["phases"][0]["mode"] == "rayleigh_ritz"
    np.testing.assert_allclose(spec.eigenvalues.numpy(), [8.0, 6.0, 4.0, 3.0], rtol=1e-12)


def test_deflated_phases_equal_one_run_on_30_class_synthetic():
    # 30 classes: 29 spikes, found in phases of at most 10 under a memory cap.
    A, lam, Q = _planted(300, np.geomspace(60, 3, 29), bulk=1.0)
    one = LanczosSpectrum(tol=1e-8, random_state=0).compute(MatrixOperator(A), 29)
    phased = LanczosSpectrum(tol=1e-8, max_vectors=31, random_state=0).compute(
        MatrixOperator(A), 29)
    phases = phased.info["phases"]
    assert len(phases) == 3 and all(ph["n_components"] <= 10 for ph in phases)
    assert all(ph["basis"] <= 30 for ph in phases)
    assert phased.converged.all()
    np.testing.assert_allclose(phased.eigenvalues.numpy(), one.eigenvalues.numpy(), rtol=1e-10)
    np.testing.assert_allclose(phased.eigenvalues.numpy(), lam[:29].numpy(), rtol=1e-10)
    cos = (one.eigenvectors.T @ phased.eigenvectors).diagonal().abs()
    assert cos.min() > 1 - 1e-8
    assert _true_residuals(A, phased).max() <= 1e-7
    # A refresh of the phased run from its own pairs: one product per pair.
    warm = LanczosSpectrum(tol=1e-6, max_vectors=31, random_state=1).compute(
        MatrixOperator(A), 29, init=phased.eigenvectors)
    assert warm.n_matvec == 29
    np.testing.assert_allclose(warm.eigenvalues.numpy(), lam[:29].numpy(), rtol=1e-10)


def test_deflated_operator_matches_dense_projection():
    A, lam, Q = _planted(60, [9.0, 7.0, 5.0])
    top = Q[:, :2] * torch.tensor([1.0, -2.0], dtype=torch.float64)  # any basis of the span
    op = DeflatedOperator(MatrixOperator(A), top)
    P = torch.eye(60, dtype=torch.float64) - Q[:, :2] @ Q[:, :2].T
    v = torch.randn(60, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(op.matvec(v), P @ A @ P @ v, rtol=1e-12, atol=1e-12)
    spec = DenseSpectrum().compute(op, 1)
    assert abs(float(spec.eigenvalues[0]) - 5.0) < 1e-10
    with pytest.raises(ValueError, match="Q must have shape"):
        DeflatedOperator(MatrixOperator(A), torch.zeros(5, 2, dtype=torch.float64))


# -- protocol, validation, estimator conventions -----------------------------------


class _UserOperator:
    """A user's own operator: only the protocol, no n_matvec of its own."""

    def __init__(self, A):
        self.A = A
        self.shape = tuple(A.shape)
        self.dtype = A.dtype
        self.device = A.device

    def matvec(self, v):
        return self.A @ v


def test_user_operator_and_determinism():
    A, lam, _ = _planted(100, [5.0, 4.0, 3.0])
    a = LanczosSpectrum(random_state=3).compute(_UserOperator(A), 3)
    b = LanczosSpectrum(random_state=3).compute(_UserOperator(A), 3)
    assert torch.equal(a.eigenvalues, b.eigenvalues)
    assert torch.equal(a.eigenvectors, b.eigenvectors)
    assert a.n_matvec == b.n_matvec > 0


def test_dense_refuses_large_operators():
    A = torch.eye(50, dtype=torch.float64)
    with pytest.raises(ValueError, match="max_dim"):
        DenseSpectrum(max_dim=10).compute(MatrixOperator(A), 2)


@pytest.mark.parametrize("backend", [LanczosSpectrum(), PowerIterationSpectrum(),
                                     DenseSpectrum()], ids=["lanczos", "power", "dense"])
def test_bad_input(backend):
    op = MatrixOperator(torch.eye(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="n_components"):
        backend.compute(op, 0)
    with pytest.raises(ValueError, match="n_components"):
        backend.compute(op, 11)
    with pytest.raises(TypeError, match="n_components"):
        backend.compute(op, 2.0)
    with pytest.raises(TypeError, match="operator"):
        backend.compute(torch.eye(10), 2)


def test_bad_settings():
    op = MatrixOperator(torch.eye(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="tol"):
        LanczosSpectrum(tol=-1.0).compute(op, 2)
    with pytest.raises(ValueError, match="max_iter"):
        PowerIterationSpectrum(max_iter=0).compute(op, 2)
    with pytest.raises(ValueError, match="init"):
        LanczosSpectrum().compute(op, 2, init=torch.ones(9, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_vectors"):
        LanczosSpectrum(max_vectors=5, phase_size=4).compute(
            MatrixOperator(torch.eye(50, dtype=torch.float64)), 8)


def test_backends_are_sklearn_estimators():
    lanczos = LanczosSpectrum(tol=1e-4, max_vectors=40, random_state=7)
    assert lanczos.get_params()["max_vectors"] == 40
    copy = clone(lanczos)
    assert copy.get_params() == lanczos.get_params() and copy is not lanczos
    assert clone(PowerIterationSpectrum(max_iter=7)).max_iter == 7
    assert DenseSpectrum(max_dim=12).get_params() == {"max_dim": 12, "tol": 1e-6}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_vectors_stay_on_the_gpu():
    A, lam, _ = _planted(500, [9.0, 7.0, 5.0, 3.0])
    A = A.cuda()
    seen = []

    class Probe(_UserOperator):
        def matvec(self, v):
            seen.append(v.device.type)
            return self.A @ v

    cpu = LanczosSpectrum(tol=1e-8, random_state=0).compute(MatrixOperator(A.cpu()), 4)
    spec = LanczosSpectrum(tol=1e-8, random_state=0).compute(Probe(A), 4)
    assert set(seen) == {"cuda"}
    assert spec.eigenvalues.device.type == "cuda" and spec.eigenvectors.device.type == "cuda"
    np.testing.assert_allclose(spec.eigenvalues.cpu().numpy(), lam[:4].numpy(), rtol=1e-10)
    assert spec.n_matvec == cpu.n_matvec  # same seed, same start on every device
    warm = LanczosSpectrum(tol=1e-8, random_state=0).compute(Probe(A), 4, init=spec.eigenvectors)
    assert warm.n_matvec == 4
    dense = DenseSpectrum().compute(Probe(A), 4)
    np.testing.assert_allclose(dense.eigenvalues.cpu().numpy(), lam[:4].numpy(), rtol=1e-10)
