"""Issue 14, item 3: the surgeon does not act silently on the wrong thing.

Softmax outputs, another model's weights at ``transform``, string labels,
nested names on a default strategy and saving a control strategy.
"""

import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from torch import nn

from hessrebal import SpectralSurgeon
from hessrebal.amplitude import GammaDecay
from hessrebal.baselines import LogitAdjustment
from hessrebal.controls import BulkDirections, RandomDirections
from tests.conftest import PAPER_RULES, tanh_mlp, train_full_batch, trained_blobs_mlp

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def blobs():
    return trained_blobs_mlp(0, [30, 30, 30])


def _fit(model, X, y, **kw):
    settings = dict(max_steps=2, random_state=0, **PAPER_RULES)
    settings.update(kw)
    return SpectralSurgeon(**settings).fit(model, X, y)


# ------------------------------------------------------------ softmax outputs
def test_softmax_outputs_are_warned_about(blobs):
    model, X, y = blobs
    soft = nn.Sequential(model, nn.Softmax(dim=1))
    with pytest.warns(UserWarning, match="outputs are probabilities"):
        _fit(soft, X, y, max_steps=0)


def test_logits_give_no_probability_warning(blobs):
    model, X, y = blobs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(model, X, y, max_steps=0)
    assert not [w for w in caught if "probabilities" in str(w.message)]


def test_log_softmax_outputs_are_logits(blobs):
    # Log-probabilities are valid logits: no warning.
    model, X, y = blobs
    logsoft = nn.Sequential(model, nn.LogSoftmax(dim=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(logsoft, X, y, max_steps=0)
    assert not [w for w in caught if "probabilities" in str(w.message)]


# ---------------------------------------------------------- another model
def _other_model(X, y):
    torch.manual_seed(7)
    other = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(torch.float64)
    return train_full_batch(other, X, y, 0.05, 20)


def test_transform_on_other_weights_warns(blobs):
    model, X, y = blobs
    s = _fit(model, X, y)
    other = _other_model(X, y)
    with pytest.warns(UserWarning, match="fingerprint mismatch"):
        s.transform(other)
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        s.transform(other, check_weights="raise")
    with pytest.warns(UserWarning, match="fingerprint mismatch"):
        s.score(other, X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.transform(other, check_weights="ignore")
        s.transform(model, check_weights="raise")   # the fitted weights: no complaint
        s.transform(model)


def test_fingerprint_survives_save_and_load(blobs, tmp_path):
    model, X, y = blobs
    s = _fit(model, X, y)
    s.save(tmp_path / "s.hrs")
    loaded = SpectralSurgeon.load(tmp_path / "s.hrs")
    assert loaded.weights_fingerprint_ == s.weights_fingerprint_
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        loaded.transform(_other_model(X, y), check_weights="raise")
    loaded.transform(model, check_weights="raise")


def test_one_changed_weight_is_caught(blobs):
    model, X, y = blobs
    s = _fit(model, X, y, max_steps=0)
    nudged = tanh_mlp()
    nudged.load_state_dict(model.state_dict())
    with torch.no_grad():
        nudged[2].bias[0] += 1e-12
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        s.transform(nudged, check_weights="raise")


def test_check_weights_is_validated(blobs):
    model, X, y = blobs
    s = _fit(model, X, y, max_steps=0)
    with pytest.raises(ValueError, match="check_weights must be"):
        s.transform(model, check_weights="yes")


# ---------------------------------------------------------------- strings
@pytest.mark.parametrize("as_list", [False, True])
def test_string_labels_name_y_val(blobs, as_list):
    model, X, y = blobs
    names = np.array(["a", "b", "c"])[y.numpy()]
    y_str = names.tolist() if as_list else names
    with pytest.raises(ValueError, match=r"y_val holds strings .*LabelEncoder"):
        SpectralSurgeon().fit(model, X, y_str)
    with pytest.raises(ValueError, match=r"y_val holds strings"):
        LogitAdjustment().fit(model, X, y_str)


def test_string_object_array_labels_name_y_val(blobs):
    model, X, y = blobs
    y_obj = np.array(["a", "b", "c"], dtype=object)[y.numpy()]
    with pytest.raises(ValueError, match=r"y_val holds strings"):
        SpectralSurgeon().fit(model, X, y_obj)


# ----------------------------------------------------------- nested names
def test_nested_name_on_a_default_strategy():
    s = SpectralSurgeon().set_params(amplitude__gamma=0.5)
    assert isinstance(s.amplitude, GammaDecay) and s.amplitude.gamma == 0.5
    assert clone(s).get_params()["amplitude__gamma"] == 0.5
    s = SpectralSurgeon().set_params(spectrum__tol=1e-4)
    assert s.spectrum.tol == 1e-4
    # a strategy given in the same call receives the nested name
    s = SpectralSurgeon().set_params(amplitude=GammaDecay(), amplitude__gamma=0.3)
    assert s.amplitude.gamma == 0.3
    with pytest.raises(ValueError, match="amplitude=None together"):
        SpectralSurgeon().set_params(amplitude=None, amplitude__gamma=0.3)
    with pytest.raises(ValueError, match="Invalid parameter"):
        SpectralSurgeon().set_params(amplitude__nope=0.3)


def test_nested_name_reaches_the_fit(blobs):
    # gamma shrinks the budget after a rollback: a fit with gamma=0.5 must
    # differ from one with the default 0.7 whenever a step is rolled back.
    model, X, y = blobs
    s = SpectralSurgeon(max_steps=4, random_state=0, budget=50.0, **PAPER_RULES)
    s.set_params(amplitude__gamma=0.5)
    s.fit(model, X, y)
    budgets = [h["budget"] for h in s.history_]
    ratios = {round(b / a, 6) for a, b, h in zip(budgets, budgets[1:], s.history_)
              if not h["accepted"]}
    assert ratios == {0.5}


def test_grid_search_over_a_default_strategy_setting(blobs):
    from sklearn.model_selection import GridSearchCV

    from hessrebal.sklearn import SurgicalClassifier

    model, X, y = blobs
    clf = SurgicalClassifier(model, SpectralSurgeon(max_steps=1, random_state=0))
    grid = GridSearchCV(clf, {"surgeon__amplitude__gamma": [0.4, 0.8]}, cv=2)
    grid.fit(X.numpy(), y.numpy())
    assert grid.best_estimator_.surgeon.amplitude.gamma in (0.4, 0.8)


# ------------------------------------------------------- saving controls
@pytest.mark.parametrize("control", [RandomDirections(random_state=0),
                                     BulkDirections(n_exclude=2, random_state=0)])
def test_saving_a_control_strategy(blobs, tmp_path, control):
    model, X, y = blobs
    s = _fit(model, X, y, spectrum=control, budget=0.05)
    path = s.save(tmp_path / "control.hrs")
    loaded = SpectralSurgeon.load(path)
    assert type(loaded.spectrum) is type(control)
    assert loaded.spectrum.get_params() == control.get_params()
    a, b = s.transform(model), loaded.transform(model)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
