"""Attention models out of the box: curvature and sensitivity products through
``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention`` (whose fused
kernels have no double backward), a tiny torchvision ViT, and models that take
named inputs (``model(**X)``)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Dataset

from hessrebal import HessianOperator, SpectralSurgeon
from hessrebal._data import as_data
from hessrebal._model import FunctionalModel
from hessrebal.parameters import ParameterSpace
from hessrebal.sensitivity import SoftmaxSurrogateSensitivity
from tests.conftest import assert_unchanged, snapshot

torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

C = 3


# ----------------------------------------------------------------- models
class TokenClassifier(nn.Module):
    """A BERT-like toy: token embeddings, one nn.MultiheadAttention layer
    (padding mask, ``need_weights=False``: the fused-kernel path), masked mean
    pooling; called as ``model(input_ids=..., attention_mask=...)``."""

    def __init__(self, vocab: int = 12, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, C)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        a, _ = self.attn(h, h, h, key_padding_mask=attention_mask == 0, need_weights=False)
        h = self.norm(h + a)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


class SDPAClassifier(nn.Module):
    """Self-attention written with F.scaled_dot_product_attention over a short
    sequence of feature vectors ``(n, L, d)``."""

    def __init__(self, d_in: int = 4, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.inp = nn.Linear(d_in, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, L, _ = x.shape
        h = torch.tanh(self.inp(x))
        q, k, v = (t.reshape(n, L, self.heads, -1).transpose(1, 2)
                   for t in self.qkv(h).chunk(3, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, L, -1)
        return self.out((h + a).mean(1))


class KeywordModel(nn.Module):
    """A tensor model behind a keyword argument: ``model(x=X)``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16,
        num_classes=C)


# ------------------------------------------------------------------- data
LONG_TAIL = [48, 14, 5]


def token_data(counts, seed, L=6, vocab=12):
    """Class c has marker token c somewhere in the unpadded part; the rest is
    noise tokens; 0–2 trailing pads."""
    g = torch.Generator().manual_seed(seed)
    ids, masks = [], []
    for c, n in enumerate(counts):
        t = torch.randint(3, vocab, (n, L), generator=g)
        t[torch.arange(n), torch.randint(0, L - 2, (n,), generator=g)] = c
        length = torch.randint(L - 2, L + 1, (n,), generator=g)
        masks.append((torch.arange(L)[None] < length[:, None]).long())
        ids.append(t)
    y = torch.arange(C).repeat_interleave(torch.tensor(counts))
    return {"input_ids": torch.cat(ids), "attention_mask": torch.cat(masks)}, y


def image_data(counts, seed):
    g = torch.Generator().manual_seed(100)
    means = torch.randn(C, 3, 16, 16, generator=g)
    g = torch.Generator().manual_seed(seed)
    X = torch.cat([means[c] + 1.5 * torch.randn(n, 3, 16, 16, generator=g)
                   for c, n in enumerate(counts)])
    return X, torch.arange(C).repeat_interleave(torch.tensor(counts))


def sequence_data(counts, seed):
    g = torch.Generator().manual_seed(200)
    means = torch.randn(C, 4, 4, generator=g)
    g = torch.Generator().manual_seed(seed)
    X = torch.cat([means[c] + torch.randn(n, 4, 4, generator=g) for c, n in enumerate(counts)])
    return X, torch.arange(C).repeat_interleave(torch.tensor(counts))


def call(model, X):
    out = model(**X) if isinstance(X, dict) else model(X)
    return out if isinstance(out, torch.Tensor) else out.logits  # a Hugging Face output


def train(model, X, y, steps=40, lr=0.03):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(call(model, X), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def token_model():
    torch.manual_seed(1)
    return train(TokenClassifier(), *token_data(LONG_TAIL, 0))


@pytest.fixture(scope="module")
def vit():
    return train(tiny_vit(), *image_data(LONG_TAIL, 0), steps=25)


@pytest.fixture(scope="module")
def sdpa_model():
    torch.manual_seed(2)
    return train(SDPAClassifier(), *sequence_data(LONG_TAIL, 0))


def as64(model):
    import copy

    return copy.deepcopy(model).double()


def to64(X):
    if isinstance(X, dict):
        return {k: to64(t) for k, t in X.items()}
    return X.double() if X.is_floating_point() else X


# ------------------------------------------------- independent references
def _flat(model, names):
    named = dict(model.named_parameters())
    return torch.cat([named[n].detach().reshape(-1) for n in names])


def _unflat(model, names, flat):
    named, out, i = dict(model.named_parameters()), {}, 0
    for n in names:
        k = named[n].numel()
        out[n] = flat[i:i + k].view_as(named[n])
        i += k
    return out


def _reference_logits(model, names, X):
    def logits(flat):
        args, kwargs = ((), X) if isinstance(X, dict) else ((X,), None)
        return functional_call(model, _unflat(model, names, flat), args, kwargs)

    return logits


def dense_hessian(model, X, y, names):
    """The mean cross-entropy's Hessian by torch.autograd.functional, with
    attention switched to PyTorch's math backend globally (the way a user
    would work around the fused kernels)."""
    f = _reference_logits(model, names, X)
    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(lambda t: F.cross_entropy(f(t), y),
                                                 _flat(model, names), vectorize=True)


def dense_ggn(model, X, y, names):
    f = _reference_logits(model, names, X)
    theta = _flat(model, names)
    with sdpa_kernel(SDPBackend.MATH):
        J = torch.autograd.functional.jacobian(f, theta, vectorize=True)  # (n, C, D)
        p = torch.softmax(f(theta), dim=1)
    H_out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("ncd,nce,nef->df", J, H_out, J) / len(y)


def dense_of(op):
    return op.matvec(torch.eye(op.shape[0], dtype=op.dtype))


CASES = {
    # (model fixture, data, parameters spanning the operator)
    "vit": ("vit", lambda: image_data([5, 4, 3], 1),
            ["encoder.layers.encoder_layer_0.self_attention", "heads"]),
    "multihead": ("token_model", lambda: token_data([5, 4, 3], 1), None),
    "sdpa": ("sdpa_model", lambda: sequence_data([5, 4, 3], 1), None),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_products_through_attention_equal_dense_float64(case, curvature, request):
    fixture, make_data, params = CASES[case]
    model = as64(request.getfixturevalue(fixture))
    X, y = make_data()
    X = to64(X)
    snap = snapshot(model)
    op = HessianOperator(model, X, y, params=params, curvature=curvature, batch_size=5)
    names = list(op.space.names)
    assert names and any("attn" in n or "attention" in n or "qkv" in n for n in names)
    ref = (dense_hessian if curvature == "hessian" else dense_ggn)(model, X, y, names)
    H = dense_of(op)
    assert H.shape == ref.shape
    assert torch.linalg.norm(H - ref) / torch.linalg.norm(ref) < 1e-10
    assert_unchanged(model, snap)


@pytest.mark.parametrize("case", CASES)
def test_sensitivity_products_through_attention(case, request):
    """Forward mode (k ≤ C directions) and reverse mode (k > C) both equal
    central differences of the class-mean surrogate (float64)."""
    fixture, make_data, params = CASES[case]
    model = as64(request.getfixturevalue(fixture))
    X, y = make_data()
    data = as_data(to64(X), y)
    fmodel = FunctionalModel(model, ParameterSpace(model, params))
    theta = fmodel.initial_theta()
    g = torch.Generator().manual_seed(0)
    Q = torch.randn(theta.numel(), C + 1, generator=g, dtype=torch.float64)
    Q /= Q.norm(dim=0)
    est = SoftmaxSurrogateSensitivity()
    forward = est.estimate(fmodel, theta, Q[:, :2], data, C, batch_size=4)
    reverse = est.estimate(fmodel, theta, Q, data, C, batch_size=4)
    h = 1e-5
    fd = np.stack([(est.class_scores(fmodel, theta + h * q, data, C, 4)
                    - est.class_scores(fmodel, theta - h * q, data, C, 4)) / (2 * h)
                   for q in Q.T], axis=1)
    assert np.abs(fd).max() > 1e-3  # the directions move the scores
    np.testing.assert_allclose(reverse, fd, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(forward, reverse[:, :2], rtol=1e-10, atol=1e-12)


def test_attention_mode_is_used_only_by_attention_models(token_model):
    mlp = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C))
    f = FunctionalModel(mlp, ParameterSpace(mlp))
    f.probe(torch.randn(2, 4))
    assert f.uses_attention is False
    f = FunctionalModel(token_model, ParameterSpace(token_model))
    X, _ = token_data([1, 1, 1], 3)
    f.probe(X)
    assert f.uses_attention is True


def test_the_fused_kernels_stay_the_users(sdpa_model):
    """hessrebal changes no global attention setting: after a fit, the user's
    own double backward through the fused kernel still fails as before."""
    X, y = sequence_data([8, 8, 8], 2)
    flags = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled(),
             torch.backends.cuda.mem_efficient_sdp_enabled())
    SpectralSurgeon(max_steps=2, random_state=0).fit(sdpa_model, X, y)
    assert flags == (torch.backends.cuda.flash_sdp_enabled(),
                     torch.backends.cuda.math_sdp_enabled(),
                     torch.backends.cuda.mem_efficient_sdp_enabled())
    w = sdpa_model.qkv.weight
    (g,) = torch.autograd.grad(F.cross_entropy(sdpa_model(X), y), w, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(g.sum(), w)


# ----------------------------------------------------- the estimator end to end
def _balanced(model, X, y):
    with torch.no_grad():
        pred = call(model, X).argmax(1)
    return float(np.mean([(pred[y == c] == c).double().mean() for c in range(C)]))


@pytest.mark.parametrize("case", ["vit", "token"])
def test_surgeon_fit_transform_score_save_load(case, vit, token_model, tmp_path):
    model, (X, y) = ((vit, image_data([10, 10, 10], 3)) if case == "vit"
                     else (token_model, token_data([10, 10, 10], 3)))
    snap = snapshot(model)
    surgeon = SpectralSurgeon(max_steps=4, imbalance_alpha=None, random_state=0).fit(
        model, X, y)
    assert_unchanged(model, snap)
    assert surgeon.eigenvalues_.shape[0] >= 1 and np.all(np.isfinite(surgeon.eigenvalues_))
    assert len(surgeon.history_) >= 1 and np.all(np.isfinite(surgeon.sensitivity_))
    fixed = surgeon.transform(model)
    score = surgeon.score(model, X, y)
    assert score == pytest.approx(_balanced(fixed, X, y), abs=1e-12)
    loaded = SpectralSurgeon.load(surgeon.save(tmp_path / "s.hrs"))
    assert torch.equal(loaded.perturbation_, surgeon.perturbation_)
    assert loaded.score(model, X, y) == score
    assert_unchanged(model, snap)


# ------------------------------------------------------------ mapping inputs
class LabelledMappings(Dataset):
    """Yields ``{"x": ..., "labels": ...}`` (the Hugging Face convention)."""

    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.X[i], "labels": self.y[i]}


class PairedMappings(LabelledMappings):
    def __getitem__(self, i):
        return {"x": self.X[i]}, self.y[i]


@pytest.fixture(scope="module")
def keyword_pair():
    """The same trained MLP as ``model(X)`` and as ``model(x=X)``, with
    long-tailed blobs."""
    g = torch.Generator().manual_seed(5)
    means = 2.0 * torch.eye(C, 4)
    counts = [60, 20, 8]
    X = torch.cat([means[c] + torch.randn(n, 4, generator=g) for c, n in enumerate(counts)])
    y = torch.arange(C).repeat_interleave(torch.tensor(counts))
    torch.manual_seed(0)
    plain = train(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, C)), X, y, 60, 0.05)
    Xv = torch.cat([means[c] + torch.randn(20, 4, generator=g) for c in range(C)])
    yv = torch.arange(C).repeat_interleave(20)
    return plain, KeywordModel(plain), Xv, yv


def test_mapping_forms_give_the_tensor_products(keyword_pair):
    plain, keyword, X, y = keyword_pair
    ref = HessianOperator(plain, X, y, batch_size=16)
    v = torch.randn(ref.shape[0], generator=torch.Generator().manual_seed(1))
    expected = ref.matvec(v)
    forms = {
        "dict": ({"x": X}, y),
        "dict with labels": ({"x": X, "labels": y}, None),
        "loader of (dict, y)": (DataLoader(PairedMappings(X, y), batch_size=16), None),
        "dataset of labelled dicts": (LabelledMappings(X, y), None),
    }
    for form, (Xf, yf) in forms.items():
        op = HessianOperator(keyword, Xf, yf, batch_size=16)
        torch.testing.assert_close(op.matvec(v), expected, rtol=1e-6, atol=1e-7, msg=form)
        assert op.n_samples == len(y)


def test_surgeon_and_search_on_mappings_equal_tensors(keyword_pair):
    from hessrebal.tuning import SpectralSurgeonSearch

    plain, keyword, X, y = keyword_pair
    kw = dict(max_steps=4, imbalance_alpha=None, random_state=0)
    a = SpectralSurgeon(**kw).fit(plain, X, y)
    assert a.perturbation_.abs().max() > 0, "the test needs an accepted step"
    b = SpectralSurgeon(**kw).fit(keyword, {"x": X}, y)
    c = SpectralSurgeon(**kw).fit(keyword, DataLoader(LabelledMappings(X, y), batch_size=512))
    torch.testing.assert_close(b.perturbation_, a.perturbation_)
    torch.testing.assert_close(c.perturbation_, a.perturbation_)
    assert b.score(keyword, {"x": X}, y) == a.score(plain, X, y)
    search_kw = dict(n_trials=2, random_state=0,
                     param_distributions={"max_steps": [2, 3]})
    sa = SpectralSurgeonSearch(SpectralSurgeon(**kw), **search_kw).fit(plain, X, y)
    sb = SpectralSurgeonSearch(SpectralSurgeon(**kw), **search_kw).fit(
        keyword, {"x": X, "labels": y})
    assert sb.best_params_ == sa.best_params_
    assert sb.best_score_ == pytest.approx(sa.best_score_, abs=1e-12)


def test_baselines_on_mappings_equal_tensors(keyword_pair):
    from hessrebal.baselines import (
        ClassBiasTuning,
        LastLayerRetraining,
        LogitAdjustment,
        TauNormalization,
    )

    plain, keyword, X, y = keyword_pair
    for make in (lambda: LogitAdjustment(), TauNormalization, ClassBiasTuning,
                 lambda: LastLayerRetraining(random_state=0)):
        a = make().fit(plain, X, y)
        b = make().fit(keyword, {"x": X}, y)
        za = a.transform(plain)(X)
        zb = b.transform(keyword)(x=X)
        torch.testing.assert_close(zb, za, msg=type(a).__name__)
        assert b.score(keyword, {"x": X, "labels": y}) == a.score(plain, X, y)


def test_plots_on_mappings(keyword_pair):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from hessrebal.plotting import PerClassAccuracyDisplay

    plain, keyword, X, y = keyword_pair
    kw = dict(max_steps=2, imbalance_alpha=None, random_state=0)
    a = PerClassAccuracyDisplay.from_surgeon(SpectralSurgeon(**kw).fit(plain, X, y), plain, X, y)
    b = PerClassAccuracyDisplay.from_surgeon(SpectralSurgeon(**kw).fit(keyword, {"x": X}, y),
                                             keyword, {"x": X}, y)
    np.testing.assert_array_equal(b.after, a.after)
    np.testing.assert_array_equal(b.before, a.before)


@pytest.mark.parametrize("X,match,exc", [
    ({"input_ids": torch.zeros(4, 3, dtype=torch.long),
      "attention_mask": torch.ones(5, 3, dtype=torch.long)},
     r"tensors of X_val have different numbers of samples", ValueError),
    ({0: torch.zeros(4, 3)}, r"X_val has key 0", TypeError),
    ({}, r"X_val is an empty mapping", ValueError),
    ({"input_ids": "abc"}, r"X_val\['input_ids'\]", TypeError),
    ({"x": torch.full((4, 4), float("nan"))}, r"X_val\['x'\] contains NaN", ValueError),
])
def test_mapping_errors_name_the_argument(X, match, exc, keyword_pair):
    _, keyword, _, _ = keyword_pair
    with pytest.raises(exc, match=match):
        SpectralSurgeon().fit(keyword, X, torch.zeros(4, dtype=torch.long))


def test_mapping_batches_without_labels_are_refused(keyword_pair):
    _, keyword, X, y = keyword_pair
    loader = DataLoader([{"x": X[i]} for i in range(8)], batch_size=4)
    with pytest.raises(TypeError, match=r"batch of X must be .*'labels' key"):
        HessianOperator(keyword, loader)
    with pytest.raises(ValueError, match=r"y is required when X is .*mapping"):
        HessianOperator(keyword, {"x": X})


def test_model_refusing_the_named_inputs_is_one_clear_error(keyword_pair):
    _, keyword, X, y = keyword_pair
    with pytest.raises(ValueError, match=r"cannot take X_val \{'input_ids'"):
        SpectralSurgeon().fit(keyword, {"input_ids": X}, y)


# ------------------------------------------------------- missing derivatives
class FusedBlock(nn.Module):
    """Calls the fused CPU attention kernel directly (no double backward), or,
    with ``fused=False``, the same attention through F.scaled_dot_product_attention."""

    def __init__(self, fused: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x).reshape(x.shape[0], 1, 2, 4)
        if not self.fused:
            return F.scaled_dot_product_attention(h, h, h)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(h, h, h)[0]


class FusedNet(nn.Module):
    def __init__(self, fused: bool = True) -> None:
        super().__init__()
        self.block = FusedBlock(fused)
        self.head = nn.Linear(8, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x).reshape(x.shape[0], -1))


def test_a_layer_without_second_derivatives_is_named():
    torch.manual_seed(0)
    net = FusedNet()
    X, y = torch.randn(12, 4), torch.arange(C).repeat(4)
    op = HessianOperator(net, X, y)
    with pytest.raises(ValueError, match=r"layer 'block' \(FusedBlock\) computes "
                       r"'aten::_scaled_dot_product_flash_attention_for_cpu'.*second "
                       r"derivative.*params="):
        op.matvec(torch.ones(op.shape[0]))
    # as the message says: the head alone needs no derivative of the block
    head = HessianOperator(net, X, y, params="head")
    assert torch.isfinite(head.matvec(torch.ones(head.shape[0]))).all()
    with pytest.raises(ValueError, match=r"layer 'block'"):
        SpectralSurgeon(max_steps=1).fit(net, X, y)


class _Square(torch.autograd.Function):
    """x² with a hand-written, differentiable backward (old style: no setup_context)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _OnceSquare(_Square):
    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class Squaring(nn.Module):
    def __init__(self, function) -> None:
        super().__init__()
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function.apply(x) if self.function else x * x


def squaring_net(function):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), Squaring(function), nn.Linear(6, C)).double()


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_a_once_differentiable_function_is_named_not_silently_wrong(curvature):
    """Autograd raises nothing for a @once_differentiable backward under
    double backward: it drops that second derivative. The operator refuses it."""
    X, y = torch.randn(12, 4, dtype=torch.float64), torch.arange(C).repeat(4)
    net = squaring_net(_OnceSquare)
    op = HessianOperator(net, X, y, curvature=curvature)
    with pytest.raises(ValueError, match=r"layer '1' \(Squaring\) uses the custom "
                       r"autograd.Function _OnceSquare.*once_differentiable"):
        op.matvec(torch.ones(op.shape[0], dtype=torch.float64))
    exact = dense_of(HessianOperator(squaring_net(None), X, y, curvature=curvature))
    fd = dense_of(HessianOperator(net, X, y, curvature=curvature, product="finite_difference"))
    assert torch.linalg.norm(fd - exact) / torch.linalg.norm(exact) < 1e-7
    # a differentiable custom backward is used as it is
    same = dense_of(HessianOperator(squaring_net(_Square), X, y, curvature=curvature))
    torch.testing.assert_close(same, exact, rtol=1e-12, atol=1e-14)
    head = HessianOperator(net, X, y, params="2", curvature=curvature)
    torch.testing.assert_close(dense_of(head), exact[-head.shape[0]:, -head.shape[0]:])


def test_a_function_torch_func_cannot_transform_is_named():
    net = squaring_net(_Square)
    X, y = torch.randn(12, 4, dtype=torch.float64), torch.arange(C).repeat(4)
    fmodel = FunctionalModel(net, ParameterSpace(net))
    theta = fmodel.initial_theta()
    Q = torch.eye(theta.numel(), 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"layer '1' \(Squaring\) uses a custom "
                       r"autograd.Function without setup_context.*FiniteDifferenceSensitivity"):
        SoftmaxSurrogateSensitivity().estimate(fmodel, theta, Q, as_data(X, y), C,
                                               batch_size=8)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_finite_difference_product_where_autograd_has_none(curvature):
    """product="finite_difference" needs first derivatives only: on the fused
    kernel it equals the exact product of the same net on the math kernel."""
    torch.manual_seed(0)
    fused = FusedNet().double()
    math_net = FusedNet(fused=False).double()
    math_net.load_state_dict(fused.state_dict())
    X, y = torch.randn(12, 4, dtype=torch.float64), torch.arange(C).repeat(4)
    exact = dense_of(HessianOperator(math_net, X, y, curvature=curvature))
    op = HessianOperator(fused, X, y, curvature=curvature, product="finite_difference")
    approx = dense_of(op)
    assert torch.linalg.norm(approx - exact) / torch.linalg.norm(exact) < 1e-7
    assert op.n_matvec == exact.shape[0] and op.cache_used == 0


@pytest.mark.parametrize("case", ["vit", "sdpa"])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_finite_difference_accuracy(case, curvature, request):
    """The default step's error against the exact float64 product: about 1e-9
    in float64, a few 1e-4 in float32 (docs/performance.md)."""
    fixture, make_data, params = CASES[case]
    model = request.getfixturevalue(fixture)
    X, y = make_data()
    op64 = HessianOperator(as64(model), to64(X), y, params=params, curvature=curvature)
    V = torch.randn(op64.shape[0], 4, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    V /= V.norm(dim=0)
    exact = op64.matvec(V)
    for m, Xm, tol in ((as64(model), to64(X), 1e-8), (model, X, 2e-3)):
        op = HessianOperator(m, Xm, y, params=params, curvature=curvature,
                             product="finite_difference")
        approx = op.matvec(V.to(op.dtype)).double()
        assert ((approx - exact).norm(dim=0) / exact.norm(dim=0)).max() < tol


@pytest.mark.parametrize("kwargs,match", [
    ({"product": "fd"}, "product must be one of"),
    ({"product": "finite_difference", "fd_step": 0.0}, "fd_step must be a positive"),
    ({"fd_step": float("nan")}, "fd_step must be a positive"),
])
def test_finite_difference_settings_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HessianOperator(nn.Linear(4, C), torch.randn(6, 4), torch.arange(C).repeat(2), **kwargs)


# --------------------------------------------------------------- the CLI
FACTORY_SOURCE = """
import torch
from torch import nn


class KeywordModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)


def make_net():
    return KeywordModel()
"""


def test_cli_reads_named_input_arrays(keyword_pair, tmp_path, monkeypatch, capsys):
    from hessrebal.cli import main
    from tests.conftest import import_source

    _, keyword, X, y = keyword_pair
    mod = import_source(tmp_path, "kwnets_attention", FACTORY_SOURCE)
    net = mod.make_net()
    net.net.load_state_dict(keyword.inner.state_dict())
    torch.save(net.state_dict(), tmp_path / "w.pt")
    np.savez(tmp_path / "val.npz", x=X.numpy(), y=y.numpy())
    monkeypatch.chdir(tmp_path)
    n = torch.get_num_threads()
    try:
        code = main(["fit", "--model", "w.pt", "--factory", "kwnets_attention:make_net",
                     "--val", "val.npz", "--output-dir", "out", "--seed", "0",
                     "--max-steps", "3", "--quiet"])
        assert code == 0, capsys.readouterr().err
        code = main(["spectrum", "--model", "w.pt", "--factory", "kwnets_attention:make_net",
                     "--data", "val.npz", "--output-dir", "spec", "--quiet", "--no-density"])
        assert code == 0, capsys.readouterr().err
    finally:
        torch.set_num_threads(n)
    fitted = mod.make_net()
    fitted.load_state_dict(torch.load(tmp_path / "out" / "model.pt", weights_only=True))
    surgeon = SpectralSurgeon(max_steps=3, random_state=0).fit(keyword, {"x": X}, y)
    torch.testing.assert_close(fitted(X), surgeon.transform(keyword)(x=X))


# ------------------------------------------------------- Hugging Face BERT
def test_tiny_bert_from_a_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=12, hidden_size=8, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=16,
                                     max_position_embeddings=8, num_labels=C)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    X, y = token_data(LONG_TAIL, 0)
    train(model, X, y, steps=20)
    implementation = model.config._attn_implementation
    snap = snapshot(model)
    Xv, yv = token_data([10, 10, 10], 3)
    # batches as a Hugging Face data collator gives them: mappings with "labels"
    batches = DataLoader([dict({k: t[i] for k, t in Xv.items()}, labels=yv[i])
                          for i in range(len(yv))], batch_size=16)
    surgeon = SpectralSurgeon(max_steps=3, imbalance_alpha=None, random_state=0).fit(
        model, batches)
    assert np.all(np.isfinite(surgeon.eigenvalues_)) and len(surgeon.history_) >= 1
    score = surgeon.score(model, Xv, yv)
    assert score == pytest.approx(_balanced(surgeon.transform(model), Xv, yv), abs=1e-12)
    loaded = SpectralSurgeon.load(surgeon.save(tmp_path / "bert.hrs"))
    assert loaded.score(model, dict(Xv, labels=yv)) == score
    assert model.config._attn_implementation == implementation
    assert_unchanged(model, snap)
