"""Post-hoc baselines against closed forms, brute force and held-out data."""

from __future__ import annotations

import copy
import json
import pickle
import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hessrebal._persistence import load_state, save_state
from hessrebal.baselines import (
    ClassBiasTuning,
    LastLayerRetraining,
    LogitAdjustedModel,
    LogitAdjustment,
    TauNormalization,
)
from hessrebal.datasets import load_long_tailed
from hessrebal.metrics import balanced_accuracy, per_class_accuracy
from hessrebal.models import make_model, train_model

BASELINES = [LogitAdjustment, TauNormalization, ClassBiasTuning, LastLayerRetraining]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _bal(model, X, y):
    with torch.no_grad():
        pred = model(X).argmax(1)
    return balanced_accuracy(per_class_accuracy(y, pred, int(y.max()) + 1))


# --------------------------------------------------------------------------- synthetic problem

MEANS = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
PRIOR = np.array([0.8, 0.15, 0.05])


def _gaussians(n_per_class, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.cat([torch.randn(n_per_class, 2, generator=g, dtype=torch.float64) + mu
                   for mu in MEANS])
    y = torch.arange(3).repeat_interleave(n_per_class)
    return X, y


def _bayes_model(prior_scale):
    """Linear logits log p(x|y) + const + s·log π for unit-covariance Gaussians: the
    balanced-accuracy-optimal rule is argmax log p(x|y), reached exactly at τ = s."""
    lin = nn.Linear(2, 3).to(torch.float64)
    with torch.no_grad():
        lin.weight.copy_(MEANS)
        lin.bias.copy_(-0.5 * (MEANS ** 2).sum(1) + prior_scale * torch.log(
            torch.from_numpy(PRIOR)))
    return lin


def test_logit_adjustment_recovers_optimal_tau():
    model = _bayes_model(1.5)
    X, y = _gaussians(3000, 0)
    la = LogitAdjustment(class_prior=PRIOR * 1000).fit(model, X, y)  # counts are fine
    assert abs(la.tau_ - 1.5) <= 0.2
    np.testing.assert_allclose(la.class_prior_, PRIOR)
    assert la.balanced_accuracy_after_ > la.balanced_accuracy_before_ + 0.05
    # Held-out: close to the Bayes rule's balanced accuracy.
    Xh, yh = _gaussians(3000, 1)
    bayes = _bayes_model(0.0)
    adjusted = la.transform(model)
    assert _bal(adjusted, Xh, yh) > _bal(model, Xh, yh) + 0.05
    assert abs(_bal(adjusted, Xh, yh) - _bal(bayes, Xh, yh)) < 0.01
    # Output is exactly logits − τ·log π.
    with torch.no_grad():
        expected = model(Xh) - la.tau_ * torch.log(torch.from_numpy(PRIOR))
        assert torch.allclose(adjusted(Xh), expected, atol=1e-12)


def test_logit_adjustment_fixed_tau_and_grid():
    model = _bayes_model(1.0)
    X, y = _gaussians(200, 0)
    la = LogitAdjustment(class_prior=PRIOR, tau=0.5).fit(model, X, y)
    assert la.tau_ == 0.5 and la.taus_.tolist() == [0.5]
    np.testing.assert_allclose(la.offsets_, 0.5 * np.log(PRIOR))
    la2 = LogitAdjustment(class_prior=PRIOR, taus=[0.0, 1.0, 2.0]).fit(model, X, y)
    assert la2.taus_.tolist() == [0.0, 1.0, 2.0] and la2.tau_ in (0.0, 1.0, 2.0)
    # Each grid score is the balanced accuracy of the hand-adjusted logits.
    with torch.no_grad():
        z = model(X)
    for t, s in zip(la2.taus_, la2.tau_scores_):
        pc = per_class_accuracy(y, (z - t * torch.log(torch.from_numpy(PRIOR))).argmax(1), 3)
        assert s == pytest.approx(balanced_accuracy(pc))


def test_logit_adjustment_estimated_prior():
    model = _bayes_model(1.0)
    X, y = _gaussians(500, 0)
    # An imbalanced validation set: the estimate averages within classes first.
    keep = torch.cat([torch.arange(0, 500), torch.arange(500, 600), torch.arange(1000, 1050)])
    la = LogitAdjustment().fit(model, X[keep], y[keep])
    with torch.no_grad():
        p = torch.softmax(model(X[keep]), 1)
    yk = y[keep]
    expected = torch.stack([p[yk == c].mean(0) for c in range(3)]).mean(0).numpy()
    np.testing.assert_allclose(la.class_prior_, expected / expected.sum(), rtol=1e-10)
    assert la.prior_estimated_
    # The estimate ranks the classes like the true training prior.
    assert np.argsort(la.class_prior_).tolist() == np.argsort(PRIOR).tolist()


def test_logit_adjustment_improves_long_tailed_model():
    s = load_long_tailed("digits-lt", 100, random_state=0)
    m = make_model("mlp", random_state=0, in_features=64, hidden=(32,))
    train_model(m, s.X_train, s.y_train, epochs=40, lr=3e-3)
    la = LogitAdjustment(class_prior=s.class_counts).fit(m, s.X_val, s.y_val)
    assert la.tau_ > 0
    assert _bal(la.transform(m), s.X_test, s.y_test) > _bal(m, s.X_test, s.y_test) + 0.03


def test_probability_outputs():
    logits_model = _bayes_model(1.5)
    prob_model = nn.Sequential(copy.deepcopy(logits_model), nn.Softmax(dim=1))
    X, y = _gaussians(300, 0)
    with pytest.warns(UserWarning, match="probabilities"):
        la_p = LogitAdjustment(class_prior=PRIOR).fit(prob_model, X, y)
    la_z = LogitAdjustment(class_prior=PRIOR).fit(logits_model, X, y)
    assert la_p.log_input_ and not la_z.log_input_
    assert la_p.tau_ == la_z.tau_
    with torch.no_grad():
        out = la_p.transform(prob_model)(X)
        ref = torch.log_softmax(logits_model(X), 1) - torch.from_numpy(la_z.offsets_)
    assert torch.allclose(out, ref, atol=1e-9)
    with pytest.raises(ValueError, match="probabilities"):
        LogitAdjustment(class_prior=PRIOR, on_probabilities="raise").fit(prob_model, X, y)
    with pytest.warns(UserWarning, match="probabilities"):
        ClassBiasTuning().fit(prob_model, X, y)


# --------------------------------------------------------------------------- τ-normalisation


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).to(torch.float64)


def test_tau_normalization_hand_computation():
    model = _mlp()
    with torch.no_grad():
        model[2].weight.mul_(torch.tensor([[3.0], [1.0], [0.2]], dtype=torch.float64))
    X = torch.randn(60, 4, dtype=torch.float64)
    y = torch.arange(60) % 3
    tn = TauNormalization(tau=0.7).fit(model, X, y)
    out = tn.transform(model)
    W = model[2].weight.detach()
    expected = W / W.norm(dim=1, keepdim=True) ** 0.7
    assert torch.allclose(out[2].weight, expected, atol=1e-14)
    assert torch.equal(out[2].bias, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(out[0].weight, model[0].weight)
    assert tn.layer_ == "2" and tn.used_cached_features_
    kept = TauNormalization(tau=0.7, keep_bias=True).fit(model, X, y).transform(model)
    assert torch.equal(kept[2].bias, model[2].bias)


def _brute_force_scores(model, layer, taus, X, y, keep_bias=False):
    scores = []
    for t in taus:
        m = copy.deepcopy(model)
        lin = dict(m.named_modules())[layer]
        with torch.no_grad():
            lin.weight.div_(lin.weight.norm(dim=1, keepdim=True) ** t)
            if not keep_bias:
                lin.bias.zero_()
        scores.append(_bal(m, X, y))
    return np.array(scores)


class _Scaled(nn.Module):
    """Something after the final linear layer: tuning cannot use cached features."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 2.0 * self.inner(x) + torch.tensor([0.0, 0.3, -0.3], dtype=x.dtype)


@pytest.mark.parametrize("wrapped", [False, True])
def test_tau_normalization_sweep_matches_brute_force(wrapped):
    model = _mlp(1)
    with torch.no_grad():
        model[2].weight.mul_(torch.tensor([[4.0], [1.0], [0.3]], dtype=torch.float64))
    if wrapped:
        model = _Scaled(model)
    layer = "inner.2" if wrapped else "2"
    g = torch.Generator().manual_seed(3)
    X = torch.randn(300, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (300,), generator=g)
    tn = TauNormalization().fit(model, X, y)
    assert tn.layer_ == layer and tn.used_cached_features_ is (not wrapped)
    np.testing.assert_allclose(tn.tau_scores_, _brute_force_scores(model, layer, tn.taus_, X, y))
    assert tn.tau_scores_[tn.taus_.tolist().index(tn.tau_)] == tn.tau_scores_.max()


def test_tau_normalization_layer_argument():
    model = _mlp()
    X, y = torch.randn(20, 4, dtype=torch.float64), torch.arange(20) % 3
    with pytest.raises(ValueError, match="no module named 'fc'"):
        TauNormalization(layer="fc").fit(model, X, y)
    with pytest.raises(TypeError, match="not nn.Linear"):
        TauNormalization(layer="1").fit(model, X, y)
    with pytest.raises(ValueError, match="8 outputs"):
        TauNormalization(layer="0").fit(model, X, y)
    tn = TauNormalization(tau=1.0, layer="2").fit(model, X, y)
    other = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5)).to(torch.float64)
    with pytest.raises(ValueError, match="fitted layer"):
        tn.transform(other)
    with pytest.raises(ValueError, match="no nn.Linear"):
        TauNormalization().fit(nn.Sequential(nn.Flatten()), X, y)


# --------------------------------------------------------------------------- class bias


def test_class_bias_improves_held_out_and_never_lowers_validation():
    model = _bayes_model(2.0)  # strongly prior-biased
    Xv, yv = _gaussians(400, 0)
    Xh, yh = _gaussians(3000, 1)
    cb = ClassBiasTuning().fit(model, Xv, yv)
    assert cb.balanced_accuracy_after_ >= cb.balanced_accuracy_before_
    assert np.all(np.diff(cb.history_) >= 0)
    assert _bal(cb.transform(model), Xv, yv) == pytest.approx(cb.balanced_accuracy_after_)
    assert _bal(cb.transform(model), Xh, yh) > _bal(model, Xh, yh) + 0.05
    # The output is logits + bias.
    with torch.no_grad():
        assert torch.allclose(cb.transform(model)(Xh), model(Xh) + torch.from_numpy(cb.bias_))
    np.testing.assert_allclose(cb.offsets_, -cb.bias_)


@pytest.mark.parametrize("seed", range(5))
def test_class_bias_coordinatewise_optimal_on_random_logits(seed):
    g = torch.Generator().manual_seed(seed)
    C, n = 4, 120
    Z = torch.randn(n, C, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, C, (n,), generator=g)
    Z[torch.arange(n), y] += 1.0
    model = nn.Identity()
    cb = ClassBiasTuning(max_iter=50).fit(model, Z, y)
    before = balanced_accuracy(per_class_accuracy(y, Z.argmax(1), C))
    assert cb.balanced_accuracy_before_ == pytest.approx(before)
    assert cb.balanced_accuracy_after_ >= before
    # At convergence no single offset on a fine grid does better (brute force).
    if cb.n_iter_ < 50:
        b = torch.from_numpy(cb.bias_)
        best = cb.balanced_accuracy_after_
        grid = torch.linspace(-8, 8, 801, dtype=torch.float64)
        for c in range(C):
            trial = (Z + b).unsqueeze(0).repeat(grid.numel(), 1, 1)
            trial[:, :, c] = Z[:, c] + grid[:, None]
            pc = per_class_accuracy(y, trial.argmax(2), C)  # (801, C)
            assert np.nanmean(pc, axis=1).max() <= best + 1e-12


def test_class_bias_grid_and_absent_class():
    Z = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [2.0, 0.0, 0.1]],
                     dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0])
    with pytest.warns(UserWarning, match=r"class\(es\) \[2\]"):
        cb = ClassBiasTuning(grid=np.linspace(-2, 2, 41)).fit(nn.Identity(), Z, y)
    assert cb.bias_[2] == 0.0
    assert cb.balanced_accuracy_after_ == 1.0
    assert set(np.round(cb.bias_[:2], 10)) <= set(np.round(np.linspace(-2, 2, 41), 10))


# --------------------------------------------------------------------------- shared behaviour


def _fitted(cls, model, X, y):
    return cls().fit(model, X, y)


class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.lin(x)))))


@pytest.mark.parametrize("cls", BASELINES)
def test_models_untouched_and_mode_kept(cls):
    torch.manual_seed(0)
    model = _BNNet()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
    model.train()
    before = _state(model)
    X, y = torch.randn(50, 4), torch.arange(50) % 3
    est = cls().fit(model, X, y)
    out = est.transform(model)
    est.score(model, X, y)
    assert _same_state(before, _state(model)) and model.training and model.bn.training
    assert out is not model
    # copy=False: the wrappers still leave the model alone; the layer rewrites
    # (τ-norm, last-layer retraining) change it in place.
    out2 = est.transform(model, copy=False)
    if cls in (TauNormalization, LastLayerRetraining):
        assert out2 is model
    else:
        assert out2.base is model and _same_state(before, _state(model))


@pytest.mark.parametrize("cls", BASELINES)
def test_not_fitted(cls, tmp_path):
    est = cls()
    with pytest.raises(NotFittedError):
        est.transform(_mlp())
    with pytest.raises(NotFittedError):
        est.score(_mlp(), torch.zeros(3, 4), torch.zeros(3))
    with pytest.raises(NotFittedError):
        est.save(tmp_path / "x.safetensors")


@pytest.mark.parametrize("cls", BASELINES)
def test_bad_input(cls):
    model = _mlp()
    X, y = torch.randn(12, 4, dtype=torch.float64), torch.arange(12) % 3
    with pytest.raises(TypeError, match="model"):
        cls().fit("not a model", X, y)
    with pytest.raises(ValueError, match="different numbers of samples"):
        cls().fit(model, X, y[:-1])
    with pytest.raises(ValueError, match="label 5"):
        cls().fit(model, X, torch.full((12,), 5))
    with pytest.raises(ValueError, match="negative"):
        cls().fit(model, X, -y)
    with pytest.raises(ValueError, match="NaN"):
        cls().fit(model, torch.full((12, 4), float("nan")), y)
    with pytest.raises(ValueError, match="cannot take X_val"):
        cls().fit(model, torch.randn(12, 7), y)
    with pytest.raises(ValueError, match="batch_size"):
        cls(batch_size=0).fit(model, X, y)


def test_bad_parameters():
    model = _mlp()
    X, y = torch.randn(12, 4, dtype=torch.float64), torch.arange(12) % 3
    for bad in (-1.0, "best", float("inf")):
        with pytest.raises(ValueError, match="tau"):
            LogitAdjustment(class_prior=[1, 1, 1], tau=bad).fit(model, X, y)
        with pytest.raises(ValueError, match="tau"):
            TauNormalization(tau=bad).fit(model, X, y)
    with pytest.raises(ValueError, match="taus"):
        LogitAdjustment(taus=[]).fit(model, X, y)
    with pytest.raises(ValueError, match="taus"):
        TauNormalization(taus=[-1.0, 1.0]).fit(model, X, y)
    with pytest.raises(ValueError, match="class_prior has 2"):
        LogitAdjustment(class_prior=[1, 2]).fit(model, X, y)
    with pytest.raises(ValueError, match="class_prior"):
        LogitAdjustment(class_prior=[1, 0, 2]).fit(model, X, y)
    with pytest.raises(ValueError, match="on_probabilities"):
        LogitAdjustment(on_probabilities="ignore").fit(model, X, y)
    with pytest.raises(ValueError, match="max_iter"):
        ClassBiasTuning(max_iter=0).fit(model, X, y)
    with pytest.raises(ValueError, match="grid"):
        ClassBiasTuning(grid=[np.nan]).fit(model, X, y)


def test_sklearn_conventions():
    la = LogitAdjustment(class_prior=[1, 2, 3], tau=0.5)
    assert la.get_params()["tau"] == 0.5
    c = clone(la)
    assert c.get_params() == la.get_params()
    assert not hasattr(c, "tau_")


def test_dataset_and_loader_inputs():
    model = _mlp()
    X, y = torch.randn(40, 4, dtype=torch.float64), torch.arange(40) % 3
    ref = ClassBiasTuning().fit(model, X, y).bias_
    ds = TensorDataset(X, y)
    np.testing.assert_array_equal(ClassBiasTuning().fit(model, ds).bias_, ref)
    np.testing.assert_array_equal(
        ClassBiasTuning(batch_size=7).fit(model, DataLoader(ds, batch_size=9)).bias_, ref)
    with pytest.raises(ValueError, match="y_val must be None"):
        ClassBiasTuning().fit(model, ds, y)


def test_composition():
    s = load_long_tailed("digits-lt", 50, random_state=1)
    m = make_model("mlp", random_state=0, in_features=64, hidden=(32,))
    train_model(m, s.X_train, s.y_train, epochs=30, lr=3e-3)
    before = _state(m)
    la = LogitAdjustment(class_prior=s.class_counts).fit(m, s.X_val, s.y_val)
    step1 = la.transform(m)
    cb = ClassBiasTuning().fit(step1, s.X_val, s.y_val)
    step2 = cb.transform(step1)
    tn = TauNormalization().fit(step2, s.X_val, s.y_val)
    step3 = tn.transform(step2)
    assert tn.layer_ == "base.base.classifier" and not tn.used_cached_features_
    assert isinstance(step2, LogitAdjustedModel) and isinstance(step2.base, LogitAdjustedModel)
    with torch.no_grad():
        z = m(s.X_val)
        expected = z - torch.as_tensor(la.offsets_, dtype=z.dtype) - torch.as_tensor(
            cb.offsets_, dtype=z.dtype)
        assert torch.allclose(step2(s.X_val), expected, atol=1e-5)
        assert step3(s.X_test).shape == (len(s.y_test), 10)
    # Each stage is judged on validation: never below the stage it started from.
    assert cb.balanced_accuracy_after_ >= la.balanced_accuracy_after_ - 1e-12
    assert _same_state(before, _state(m))
    # skorch-style nets are unwrapped.

    class Net:
        module_ = m

    assert isinstance(LogitAdjustment(class_prior=s.class_counts).fit(
        Net(), s.X_val, s.y_val).transform(Net()), LogitAdjustedModel)


# --------------------------------------------------------------------------- persistence


@pytest.mark.parametrize("cls, kwargs", [
    (LogitAdjustment, {"class_prior": np.array([5.0, 3.0, 1.0])}),
    (LogitAdjustment, {}),
    (TauNormalization, {"taus": [0.0, 0.5, 1.0], "keep_bias": True}),
    (ClassBiasTuning, {"max_iter": 5}),
    (LastLayerRetraining, {"Cs": [0.1, 1.0], "random_state": 0}),
])
def test_save_load_round_trip(tmp_path, cls, kwargs):
    model = _mlp(2)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(90, 4, generator=g, dtype=torch.float64)
    y = torch.arange(90) % 3
    est = cls(**kwargs).fit(model, X, y)
    path = est.save(tmp_path / "baseline.safetensors")
    loaded = cls.load(path)
    assert type(loaded) is cls
    for k, v in est.get_params().items():
        assert np.all(np.asarray(loaded.get_params()[k]) == np.asarray(v)) if v is not None \
            else loaded.get_params()[k] is None
    with torch.no_grad():
        assert torch.equal(est.transform(model)(X), loaded.transform(model)(X))
    for attr in cls._array_attrs:
        np.testing.assert_array_equal(getattr(loaded, attr), getattr(est, attr))
    for attr in cls._scalar_attrs:
        assert getattr(loaded, attr) == getattr(est, attr)
    # The file is plain safetensors: a length, a JSON header, raw tensor bytes.
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"]["format"] == "hessrebal"
    assert header["__metadata__"]["kind"] == cls.__name__
    assert set(header) - {"__metadata__"} == set(cls._array_attrs)


def test_load_refuses_pickle_corrupt_and_wrong_kind(tmp_path):
    model = _mlp()
    X, y = torch.randn(30, 4, dtype=torch.float64), torch.arange(30) % 3
    good = LogitAdjustment(class_prior=[1, 1, 2]).fit(model, X, y).save(tmp_path / "la.st")
    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps({"offsets_": [1, 2, 3]}))
    with pytest.raises(ValueError, match="pickle"):
        LogitAdjustment.load(p)
    z = tmp_path / "torch.pt"
    torch.save({"a": torch.zeros(2)}, z)
    with pytest.raises(ValueError, match="zip"):
        LogitAdjustment.load(z)
    for name, data in [("junk", b"\x13\x00\x00\x00\x00\x00\x00\x00not json at all!!!!"),
                       ("short", b"abc"), ("huge", (2**40).to_bytes(8, "little") + b"{}"),
                       ("truncated", good.read_bytes()[:-5])]:
        bad = tmp_path / name
        bad.write_bytes(data)
        with pytest.raises(ValueError):
            LogitAdjustment.load(bad)
    with pytest.raises(ValueError, match="holds a 'LogitAdjustment'"):
        TauNormalization.load(good)
    with pytest.raises(FileNotFoundError):
        LogitAdjustment.load(tmp_path / "missing")
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not written by hessrebal"):
        LogitAdjustment.load(foreign)


def test_persistence_helpers(tmp_path):
    t = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2])}
    meta = {"x": np.float64(1.5), "names": ("p", "q"), "nested": {"k": np.int64(3)},
            "flag": np.bool_(True)}
    save_state(tmp_path / "s", t, meta, kind="Thing")
    tensors, back = load_state(tmp_path / "s", expected_kind="Thing")
    assert torch.equal(tensors["a"], t["a"]) and torch.equal(tensors["b"], t["b"])
    assert back["x"] == 1.5 and back["names"] == ["p", "q"] and back["nested"] == {"k": 3}
    assert back["flag"] is True and back["_version"] == 1
    with pytest.raises(ValueError, match="version"):
        save_state(tmp_path / "v", {}, {}, kind="Thing", version=99)
        load_state(tmp_path / "v", "Thing")
    with pytest.raises(TypeError, match="tensors"):
        save_state(tmp_path / "w", {"a": [1]}, {}, kind="Thing")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_state(tmp_path / "e", {}, {}, kind="Empty")
        assert load_state(tmp_path / "e", "Empty")[0] == {}


def test_header_length_starting_with_0x80_is_not_mistaken_for_pickle(tmp_path):
    # A pickle starts with 0x80; so does a safetensors file whose header length
    # is 128 mod 256. Structure decides, not the first byte.
    for pad in range(300):
        path = save_state(tmp_path / "p", {"a": torch.zeros(1)}, {"pad": "x" * pad}, kind="K")
        if path.read_bytes()[0] == 0x80:
            break
    else:  # pragma: no cover
        pytest.fail("no padding gave a 0x80 first byte")
    tensors, meta = load_state(path, "K")
    assert meta["pad"] == "x" * pad and torch.equal(tensors["a"], torch.zeros(1))
