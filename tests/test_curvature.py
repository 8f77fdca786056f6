import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hessrebal import HessianOperator
from tests._reference import dense_hessian, flat_params
from tests.conftest import assert_unchanged, snapshot, tanh_mlp, tiny_cnn


def dense_of(op):
    eye = torch.eye(op.shape[0], dtype=op.dtype)
    return torch.stack([op.matvec(e) for e in eye], dim=1)


def mlp_data(n=37, d=5, c=3):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    return X, torch.randint(0, c, (n,), generator=g)


def cnn_data(n=23, c=3):
    g = torch.Generator().manual_seed(4)
    return (torch.randn(n, 1, 5, 5, generator=g, dtype=torch.float64),
            torch.randint(0, c, (n,), generator=g))


@pytest.mark.parametrize("make_model,make_data", [(tanh_mlp, mlp_data), (tiny_cnn, cnn_data)])
@pytest.mark.parametrize("cache_bytes", [None, 0])
def test_matvec_equals_dense_hessian(make_model, make_data, cache_bytes):
    model = make_model()
    X, y = make_data()
    snap = snapshot(model)
    H = dense_hessian(model, X, y)
    op = HessianOperator(model, X, y, batch_size=10, cache_bytes=cache_bytes)  # uneven last chunk
    Hop = dense_of(op)
    assert op.n_matvec == H.shape[0]
    assert torch.linalg.norm(Hop - H) / torch.linalg.norm(H) < 1e-10
    # a second sweep (reusing cached graphs where kept) gives the same products
    v = torch.randn(H.shape[0], dtype=torch.float64)
    assert torch.allclose(op @ v, H @ v, rtol=1e-10, atol=1e-12)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("batch_size", [1, 7, 16, 100])
def test_batch_size_invariance(batch_size):
    model = tanh_mlp()
    X, y = mlp_data()
    v = torch.randn(flat_params(model)[1].numel(), dtype=torch.float64)
    ref = HessianOperator(model, X, y, batch_size=37).matvec(v)
    out = HessianOperator(model, X, y, batch_size=batch_size).matvec(v)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)


def test_symmetry_and_block_matvec():
    model = tiny_cnn()
    X, y = cnn_data()
    op = HessianOperator(model, X, y, batch_size=8)
    D = op.shape[0]
    u, v = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    assert abs(u @ op.matvec(v) - v @ op.matvec(u)) < 1e-12 * (u.norm() * v.norm())
    block = torch.stack([u, v], dim=1)
    torch.testing.assert_close(op.matvec(block)[:, 1], op.matvec(v))


def test_ggn_is_symmetric_psd_and_matches_reference():
    model = tanh_mlp()
    X, y = mlp_data()
    op = HessianOperator(model, X, y, curvature="ggn", batch_size=10)
    G = dense_of(op)
    torch.testing.assert_close(G, G.T, rtol=0, atol=1e-14)
    assert torch.linalg.eigvalsh(G).min() > -1e-12
    # independent GGN: Σ Jᵀ (diag p − ppᵀ) J / N from the full Jacobian
    names, theta = flat_params(model)
    space = op.space

    def f(flat):
        return torch.func.functional_call(model, space.unflatten(flat), (X,))

    J = torch.autograd.functional.jacobian(f, theta)
    P = f(theta).detach().softmax(1)
    Hout = torch.diag_embed(P) - P[:, :, None] * P[:, None, :]
    G_ref = torch.einsum("ncd,nce,nef->df", J, Hout, J) / X.shape[0]
    assert torch.linalg.norm(G - G_ref) / torch.linalg.norm(G_ref) < 1e-10


def test_softmax_regression_closed_form():
    # H = Σ_i (diag p_i − p_i p_iᵀ) ⊗ x_i x_iᵀ / N for logits W x (no bias)
    g = torch.Generator().manual_seed(5)
    N, d, C = 50, 4, 3
    X = torch.randn(N, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    model = nn.Linear(d, C, bias=False).double()
    op = HessianOperator(model, X, y, batch_size=16)
    P = (X @ model.weight.detach().T).softmax(1)
    H = sum(torch.kron(torch.diag(p) - torch.outer(p, p), torch.outer(x, x)) for p, x in zip(P, X))
    H = H / N
    assert torch.linalg.norm(dense_of(op) - H) / torch.linalg.norm(H) < 1e-12


def test_data_forms_agree_numpy_dataset_dataloader():
    model = tanh_mlp()
    X, y = mlp_data()
    v = torch.randn(flat_params(model)[1].numel(), dtype=torch.float64)
    ref = HessianOperator(model, X, y).matvec(v)
    outs = [
        HessianOperator(model, X.numpy(), y.numpy()).matvec(v),
        HessianOperator(model, TensorDataset(X, y), batch_size=9).matvec(v),
        HessianOperator(model, DataLoader(TensorDataset(X, y), batch_size=6)).matvec(v),
    ]
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)


def test_parameter_subset_is_the_submatrix():
    model = tanh_mlp()
    X, y = mlp_data()
    H = dense_hessian(model, X, y)
    op = HessianOperator(model, X, y, params=["2"])  # the last Linear, by module prefix
    n_first = sum(p.numel() for p in model[0].parameters())
    torch.testing.assert_close(dense_of(op), H[n_first:, n_first:], rtol=1e-10, atol=1e-13)


def test_float32_model_and_scipy_operator():
    model = tanh_mlp(dtype=torch.float32)
    X, y = mlp_data()
    op = HessianOperator(model, X.float(), y)
    assert op.dtype == torch.float32
    H64 = dense_hessian(tanh_mlp(), X, y)
    lin = op.to_scipy()
    v = np.random.default_rng(0).standard_normal(op.shape[0])
    np.testing.assert_allclose(lin.matvec(v), H64.numpy() @ v, rtol=1e-4, atol=1e-5)


def test_gradient_and_loss_match_autograd():
    model = tanh_mlp()
    X, y = mlp_data()
    op = HessianOperator(model, X, y, batch_size=8)
    loss = nn.functional.cross_entropy(model(X), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(op.gradient(), torch.cat([g.reshape(-1) for g in grads]))
    assert abs(op.loss() - loss.item()) < 1e-12


def test_output_adapters():
    class TupleOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tanh_mlp()

        def forward(self, x):
            return {"logits": self.net(x), "aux": x}

    model = TupleOut()
    X, y = mlp_data()
    v = torch.randn(flat_params(model)[1].numel(), dtype=torch.float64)
    ref = HessianOperator(model.net, X, y).matvec(v)
    torch.testing.assert_close(HessianOperator(model, X, y).matvec(v), ref)
    custom = HessianOperator(model, X, y, output_to_logits=lambda out: out["logits"])
    torch.testing.assert_close(custom.matvec(v), ref)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(y=torch.zeros(5, dtype=torch.long)), ValueError, "different numbers"),
        (dict(y=torch.full((37,), 3)), ValueError, "3 outputs"),
        (dict(y=-torch.ones(37, dtype=torch.long)), ValueError, "negative"),
        (dict(y=torch.full((37,), 0.5)), ValueError, "fractional"),
        (dict(params=["nope"]), ValueError, "nope"),
        (dict(params=lambda n, p: False), ValueError, "selects no parameters"),
        (dict(curvature="fisher"), ValueError, "curvature"),
        (dict(X=torch.full((37, 5), float("nan"), dtype=torch.float64)), ValueError, "NaN"),
        (dict(X=torch.randn(37, 4, dtype=torch.float64)), ValueError, "cannot take X"),
        (dict(X=torch.empty(0, 5), y=torch.empty(0)), ValueError, "empty"),
        (dict(model="not a model"), TypeError, "nn.Module"),
        (dict(batch_size=0), ValueError, "batch_size"),
    ],
)
def test_bad_input(kwargs, exc, match):
    X, y = mlp_data()
    args = dict(model=tanh_mlp(), X=X, y=y)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        HessianOperator(**args)


def test_nonfinite_weights_rejected():
    model = tanh_mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    X, y = mlp_data()
    with pytest.raises(ValueError, match="0.weight"):
        HessianOperator(model, X, y)


def test_interrupt_leaves_model_intact():
    model = tiny_cnn()
    X, y = cnn_data()
    snap = snapshot(model)
    op = HessianOperator(model, X, y)

    class Boom(Exception):
        pass

    def bad_forward_hook(module, inp, out):
        raise Boom

    handle = model.fc.register_forward_hook(bad_forward_hook)
    op.clear_cache()
    with pytest.raises(Boom):
        op.matvec(torch.ones(op.shape[0], dtype=torch.float64))
    handle.remove()
    assert_unchanged(model, snap)
