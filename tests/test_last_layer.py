"""Last-layer retraining against scikit-learn's LogisticRegression on the same features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from hessrebal._logistic import balanced_sample_weight, fit_multinomial
from hessrebal.baselines import LastLayerRetraining
from hessrebal.datasets import load_long_tailed
from hessrebal.models import make_model, train_model
from tests.conftest import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _net(seed=0, d_in=4, hidden=6, n_classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(),
                         nn.Linear(hidden, n_classes)).to(torch.float64)


def _data(counts, seed=0, d_in=4):
    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(len(counts), d_in, generator=g, dtype=torch.float64)
    X = torch.cat([means[c] + torch.randn(n, d_in, generator=g, dtype=torch.float64)
                   for c, n in enumerate(counts)])
    return X, torch.arange(len(counts)).repeat_interleave(torch.tensor(counts))


def _features(model, X):
    with torch.no_grad():
        return model[:2](X).numpy()


def _sklearn(F, y, C):
    ref = LogisticRegression(C=C, class_weight="balanced", tol=1e-12, max_iter=20000)
    return ref.fit(F, y)


@pytest.mark.parametrize("C", [0.05, 1.0, 20.0])
def test_solver_matches_sklearn(C):
    model = _net()
    X, y = _data([40, 15, 5])
    F, yy = _features(model, X), y.numpy()
    W, b = fit_multinomial(F, yy, 3, C, sample_weight=balanced_sample_weight(yy, 3), tol=1e-12)
    ref = _sklearn(F, yy, C)
    np.testing.assert_allclose(W, ref.coef_, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(b, ref.intercept_, atol=1e-5, rtol=1e-5)


def test_estimator_coefficients_match_sklearn_and_model_unchanged():
    model = _net(1)
    model.train()
    snap = snapshot(model)
    X, y = _data([30, 12, 6], seed=3)
    llr = LastLayerRetraining(C=0.3, standardize=False, random_state=0).fit(model, X, y)
    ref = _sklearn(_features(model, X), y.numpy(), 0.3)
    np.testing.assert_allclose(llr.coef_, ref.coef_, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(llr.intercept_, ref.intercept_, atol=1e-5, rtol=1e-5)
    new = llr.transform(model)
    assert_unchanged(model, snap)
    assert new is not model
    with torch.no_grad():
        expected = torch.from_numpy(_features(model, X) @ ref.coef_.T + ref.intercept_)
        new.eval()
        assert torch.allclose(new(X), expected, atol=1e-4)


def test_standardized_fit_is_sklearn_on_standardized_features():
    model = _net(2)
    X, y = _data([30, 12, 6], seed=4)
    llr = LastLayerRetraining(C=0.5, random_state=0).fit(model, X, y)
    F = _features(model, X)
    mu, sd = F.mean(0), F.std(0)
    ref = _sklearn((F - mu) / sd, y.numpy(), 0.5)
    np.testing.assert_allclose(llr.coef_, ref.coef_ / sd, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(llr.intercept_, ref.intercept_ - (ref.coef_ / sd) @ mu,
                               atol=1e-4, rtol=1e-4)


def test_shrink_to_model_at_tiny_C_keeps_the_trained_head_weights():
    model = _net(3)
    X, y = _data([20, 20, 20], seed=5)
    llr = LastLayerRetraining(C=1e-8, shrink_to="model", standardize=False).fit(model, X, y)
    np.testing.assert_allclose(llr.coef_, model[2].weight.detach().numpy(), atol=1e-5)
    zero = LastLayerRetraining(C=1e-8, standardize=False).fit(model, X, y)
    assert np.abs(zero.coef_).max() < 1e-5


def test_cross_validation_picks_from_the_grid_and_is_seeded():
    model = _net(4)
    X, y = _data([25, 25, 10], seed=6)
    grid = [0.001, 0.1, 10.0]
    a = LastLayerRetraining(Cs=grid, cv=3, random_state=0).fit(model, X, y)
    b = LastLayerRetraining(Cs=grid, cv=3, random_state=0).fit(model, X, y)
    assert a.C_ in grid and a.C_ == b.C_
    np.testing.assert_array_equal(a.cv_scores_, b.cv_scores_)
    # The chosen C has the best cross-validated score; the smallest C cannot separate.
    assert a.cv_scores_[grid.index(a.C_)] == a.cv_scores_.max()
    assert a.cv_scores_[0] < a.cv_scores_.max()


def test_train_data_resamples_are_balanced_and_averaged():
    model = _net(5)
    X, y = _data([10, 10, 10], seed=7)
    Xtr, ytr = _data([200, 30, 3], seed=8)
    one = LastLayerRetraining(C=1.0, n_resamples=1, random_state=0).fit(
        model, X, y, train_data=(Xtr, ytr))
    many = LastLayerRetraining(C=1.0, n_resamples=4, random_state=0).fit(
        model, X, y, train_data=(Xtr, ytr))
    plain = LastLayerRetraining(C=1.0, random_state=0).fit(model, X, y)
    assert not np.allclose(one.coef_, plain.coef_)
    # The average of 4 resample fits is the mean of the single fits with the same draws.
    est = LastLayerRetraining(C=1.0, n_resamples=4, random_state=0)
    rng = np.random.default_rng(0)
    F, yy = _features(model, X), y.numpy()
    draws = est._resamples((_features(model, Xtr), ytr.numpy()), yy, 3, rng)
    assert all(np.array_equal(np.bincount(d[1], minlength=3), [10, 10, 10]) for d in draws)
    W0 = model[2].weight.detach().numpy()
    fits = [est._fit_head(F, yy, 3, 1.0, W0, d) for d in draws]
    np.testing.assert_allclose(many.coef_, np.mean([f[0] for f in fits], 0), atol=1e-10)


def test_beats_the_trained_head_on_held_out_long_tailed_digits():
    s = load_long_tailed("digits-lt", 50, random_state=0)
    m = make_model("mlp", random_state=0, in_features=64, hidden=(32,))
    train_model(m, s.X_train, s.y_train, epochs=30, lr=3e-3)
    llr = LastLayerRetraining(random_state=0).fit(m, s.X_val, s.y_val)
    assert llr.score(m, s.X_test, s.y_test) > _bal(m, s.X_test, s.y_test) + 0.05


def _bal(model, X, y):
    from hessrebal.metrics import balanced_accuracy, per_class_accuracy

    with torch.no_grad():
        return balanced_accuracy(per_class_accuracy(y, model(X).argmax(1), 10))


def test_bad_parameters_and_layers():
    model = _net()
    X, y = _data([10, 10, 10])
    for kwargs, match in [({"C": 0}, "C must"), ({"C": "best"}, "C must"),
                          ({"Cs": [-1.0]}, "Cs"), ({"cv": 1}, "cv"),
                          ({"n_resamples": 0}, "n_resamples"),
                          ({"train_per_class": 0}, "train_per_class"),
                          ({"shrink_to": "prior"}, "shrink_to")]:
        with pytest.raises(ValueError, match=match):
            LastLayerRetraining(**kwargs).fit(model, X, y)
    with pytest.raises(ValueError, match="not the model's output layer"):
        LastLayerRetraining(layer="0").fit(model, X, y)
    with pytest.raises(TypeError, match="not nn.Linear"):
        LastLayerRetraining(layer="1").fit(model, X, y)
    nobias = nn.Sequential(nn.Linear(4, 3, bias=False)).to(torch.float64)
    with pytest.raises(ValueError, match="no bias"):
        LastLayerRetraining().fit(nobias, X, y)
    with pytest.raises(ValueError, match="train_data"):
        LastLayerRetraining().fit(model, X, y, train_data=(X[:, :2], y))
