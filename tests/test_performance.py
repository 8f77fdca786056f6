"""The performance mechanisms of HessianOperator keep its results exact: chunk
sizes, cache budgets (none, partial, all), data forms, shuffling loaders,
block products, BatchNorm evaluated as an affine map, data moved once — each
against the dense float64 Hessian of ``torch.autograd.functional.hessian``."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from hessrebal.curvature import HessianOperator
from tests._reference import dense_hessian
from tests.conftest import tiny_cnn

torch.set_num_threads(1)


def _data(n=45, d=5, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    return X, torch.randint(0, c, (n,), generator=g)


def _mlp(d=5, c=3):
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(d, 6), nn.Tanh(), nn.Linear(6, c)).double()


def _bn_mlp(affine=True, track=True):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, affine=affine,
                                                          track_running_stats=track),
                          nn.Tanh(), nn.Linear(6, 3)).double()
    if track:
        with torch.no_grad():
            model[1].running_mean.copy_(torch.linspace(-0.3, 0.4, 6))
            model[1].running_var.copy_(torch.linspace(0.5, 2.0, 6))
    return model


def _ggn_dense(model, X, y):
    params = dict(model.named_parameters())
    names = list(params)
    theta = torch.cat([p.detach().reshape(-1) for p in params.values()])
    sizes = [p.numel() for p in params.values()]

    def f(flat):
        parts = torch.split(flat, sizes)
        return torch.func.functional_call(
            model, {n: t.view_as(params[n]) for n, t in zip(names, parts)}, (X,))

    model.eval()
    J = torch.autograd.functional.jacobian(f, theta)
    P = f(theta).detach().softmax(1)
    Hout = torch.diag_embed(P) - P[:, :, None] * P[:, None, :]
    return torch.einsum("ncd,nce,nef->df", J, Hout, J) / X.shape[0]


def _rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


class CountingDataset(Dataset):
    def __init__(self, X, y):
        self.X, self.y, self.reads = X, y, 0

    def __len__(self):
        return self.X.shape[0]

    def __getitem__(self, i):
        self.reads += 1
        return self.X[i], self.y[i]


# -- chunk-size and budget invariance ----------------------------------------------------


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("budget", ["all", "part", "none"])
def test_chunk_size_and_budget_invariance(curvature, budget):
    model = _mlp()
    X, y = _data()
    ref = (dense_hessian(model, X, y) if curvature == "hessian" else _ggn_dense(model, X, y))
    V = torch.randn(ref.shape[0], 4, dtype=torch.float64)
    for batch_size in (1, 7, 16, 45, 100):
        full = HessianOperator(model, X, y, curvature=curvature, batch_size=batch_size)
        full.matvec(V[:, 0])
        one_chunk = max(full.cache_used // max(full.n_cached_chunks, 1), 1)
        cache_bytes = {"all": None, "part": 2 * one_chunk + one_chunk // 2, "none": 0}[budget]
        op = HessianOperator(model, X, y, curvature=curvature, batch_size=batch_size,
                             cache_bytes=cache_bytes)
        for sweep in range(2):  # the first builds the cache, the second reuses it
            out = torch.stack([op.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)
            assert _rel(out, ref @ V) < 1e-12, (batch_size, sweep)
        n_chunks = -(-X.shape[0] // batch_size)
        assert op.cache_used <= op.cache_bytes
        expected = {"all": n_chunks, "part": min(2, n_chunks), "none": 0}[budget]
        assert op.n_cached_chunks == expected, (batch_size, op.n_cached_chunks)


def test_cache_budget_is_respected_and_prefix_kept():
    model = _mlp()
    X, y = _data(n=60)
    op = HessianOperator(model, X, y, batch_size=10)
    op.matvec(torch.ones(op.shape[0], dtype=torch.float64))
    per_chunk = op.cache_used / op.n_cached_chunks
    for n_fit in range(0, 7):
        budget = int(per_chunk * (n_fit + 0.5))
        small = HessianOperator(model, X, y, batch_size=10, cache_bytes=budget)
        small.matvec(torch.ones(small.shape[0], dtype=torch.float64))
        assert small.n_cached_chunks == min(n_fit, 6)
        assert small.cache_used <= budget
    with pytest.raises(ValueError, match="cache_bytes"):
        HessianOperator(model, X, y, cache_bytes=-1)


def test_fully_cached_matvec_does_not_read_the_data():
    model = _mlp()
    X, y = _data()
    H = dense_hessian(model, X, y)
    ds = CountingDataset(X, y)
    op = HessianOperator(model, DataLoader(ds, batch_size=8))
    reads = ds.reads  # validation reads the first chunk
    v = torch.randn(H.shape[0], dtype=torch.float64)
    op.matvec(v)
    assert ds.reads == reads + X.shape[0]
    out = op.matvec(v)
    assert ds.reads == reads + X.shape[0]  # no second pass over the data
    assert _rel(out, H @ v) < 1e-12
    # beyond the budget every product reads the data again
    part = HessianOperator(model, DataLoader(ds, batch_size=8), cache_bytes=1)
    before = ds.reads
    part.matvec(v)
    part.matvec(v)
    assert ds.reads == before + 2 * X.shape[0]


def test_shuffling_loader_keeps_all_or_nothing():
    model = _mlp()
    X, y = _data()
    H = dense_hessian(model, X, y)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    torch.manual_seed(0)
    shuffled = DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True)
    everything = HessianOperator(model, shuffled)
    full_budget = HessianOperator(model, X, y, batch_size=8)
    full_budget.matvec(v)
    budget = full_budget.cache_used // 2  # about half of the chunks would fit
    partial = HessianOperator(model, shuffled, cache_bytes=budget)
    for op in (everything, partial):
        for _ in range(3):  # new orders each pass: a kept prefix would mix samples
            assert _rel(op.matvec(v), H @ v) < 1e-12
    assert everything.n_cached_chunks == 6
    assert partial.n_cached_chunks == 0 and partial.cache_used == 0


def test_block_matvec_counts_columns_and_matches():
    model = _mlp()
    X, y = _data()
    H = dense_hessian(model, X, y)
    V = torch.randn(H.shape[0], 5, dtype=torch.float64)
    for cache_bytes in (None, 0):
        op = HessianOperator(model, X, y, batch_size=10, cache_bytes=cache_bytes)
        assert _rel(op.matvec(V), H @ V) < 1e-12
        assert op.n_matvec == 5
        assert _rel(op @ V[:, 2], H @ V[:, 2]) < 1e-12
        assert op.n_matvec == 6


def test_large_dataloader_works_with_flat_memory_budget():
    # 50,000 samples through a DataLoader, graphs beyond a 64 KiB budget rebuilt
    g = torch.Generator().manual_seed(1)
    X = torch.randn(50_000, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (50_000,), generator=g)
    model = _mlp()
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    loader = DataLoader(TensorDataset(X, y), batch_size=5000)
    op = HessianOperator(model, loader, cache_bytes=1 << 16)
    ref = HessianOperator(model, X, y, batch_size=12_500)
    assert op.n_samples == 50_000
    assert _rel(op.matvec(v), ref.matvec(v)) < 1e-12
    assert op.cache_used <= 1 << 16 and op.n_cached_chunks == 0


# -- BatchNorm, dtype and device handling ----------------------------------------------


@pytest.mark.parametrize("kind", ["affine", "no_affine", "batch_stats"])
@pytest.mark.parametrize("cache_bytes", [None, 0])
def test_batchnorm_products_match_dense_hessian(kind, cache_bytes):
    model = {"affine": _bn_mlp(), "no_affine": _bn_mlp(affine=False),
             "batch_stats": _bn_mlp(track=False)}[kind]
    X, y = _data(n=30)
    H = dense_hessian(model, X, y)  # BatchNorm1d in eval mode, autograd's own formula
    # batch statistics make the loss depend on the chunk: one chunk for that case
    op = HessianOperator(model, X, y, batch_size=30 if kind == "batch_stats" else 8,
                         cache_bytes=cache_bytes)
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    assert _rel(op.matvec(V), H @ V) < 1e-10


def test_cnn_with_batchnorm_and_ggn():
    model = tiny_cnn()
    g = torch.Generator().manual_seed(4)
    X = torch.randn(23, 1, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (23,), generator=g)
    G = _ggn_dense(model, X, y)
    model.train()
    op = HessianOperator(model, X, y, curvature="ggn", batch_size=6)
    V = torch.randn(G.shape[0], 2, dtype=torch.float64)
    assert _rel(op.matvec(V), G @ V) < 1e-10
    assert model.training  # the user's flags are untouched


def test_data_converted_once_to_the_model_dtype():
    model = _mlp()
    X, y = _data()
    op = HessianOperator(model, X.float(), y, batch_size=8)
    assert op.data.X.dtype == torch.float64  # converted at construction, not per product
    ref = HessianOperator(model, X.float().double(), y, batch_size=8)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    assert _rel(op.matvec(v), ref.matvec(v)) < 1e-14
    same = HessianOperator(model, X, y)
    assert same.data.X is X  # nothing to move: no copy


class _ConvBNVariants(nn.Module):
    """Conv → BN pairs that may and may not be folded: a biased grouped conv, a
    conv output changed in place before its BN, one also used elsewhere."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1, groups=2)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(4)
        self.c3 = nn.Conv2d(4, 4, 1)
        self.b3 = nn.BatchNorm2d(4, affine=False)
        self.fc = nn.Linear(4 * 4 * 4, 3)
        with torch.no_grad():
            for i, bn in enumerate((self.b1, self.b2, self.b3)):
                bn.running_mean.copy_(torch.linspace(-0.2, 0.3, 4) * (i + 1))
                bn.running_var.copy_(torch.linspace(0.5, 1.5, 4) + i)
            for bn in (self.b1, self.b2):
                bn.weight.copy_(torch.linspace(0.7, 1.3, 4))
                bn.bias.copy_(torch.linspace(-0.1, 0.2, 4))

    def forward(self, x):
        h = torch.tanh(self.b1(self.c1(x)))
        pre = self.c2(h)
        pre.mul_(0.5)  # in place after the conv: must not be folded
        h = torch.tanh(self.b2(pre))
        pre3 = self.c3(h)
        h = torch.tanh(self.b3(pre3)) + 0.1 * pre3  # the conv output also used directly
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("cache_bytes", [None, 0])
def test_batchnorm_folding_guards_match_dense_hessian(cache_bytes):
    torch.manual_seed(5)
    model = _ConvBNVariants().double().eval()
    g = torch.Generator().manual_seed(6)
    X = torch.randn(12, 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    H = dense_hessian(model, X, y)
    op = HessianOperator(model, X, y, batch_size=5, cache_bytes=cache_bytes)
    V = torch.randn(H.shape[0], 2, dtype=torch.float64)
    assert _rel(op.matvec(V), H @ V) < 1e-10
    G = _ggn_dense(model, X, y)
    ggn = HessianOperator(model, X, y, curvature="ggn", batch_size=5, cache_bytes=cache_bytes)
    assert _rel(ggn.matvec(V), G @ V) < 1e-10
