"""SurgicalClassifier: scikit-learn's checks, pipelines, grid search, cloning."""

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks
from torch import nn

from hessrebal import SpectralSurgeon
from hessrebal.amplitude import GammaDecay
from hessrebal.datasets import load_long_tailed
from hessrebal.models import MLP, train_model
from hessrebal.sklearn import SurgicalClassifier
from tests.conftest import assert_unchanged, snapshot, tiny_cnn

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_torch_thread")]


class AnyWidth(nn.Module):
    """A fixed small network that takes any number of features (through four
    summary statistics), so scikit-learn's checks can feed it their data."""

    def __init__(self, n_classes=4):
        super().__init__()
        self.head = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, n_classes))

    def forward(self, x):
        x = x.flatten(1)
        stats = torch.stack([x.mean(1), (x**2).mean(1), x.amax(1), x.amin(1)], 1)
        return self.head(stats)

    def __repr__(self):  # short test ids
        return "AnyWidth()"


def _check_instance():
    torch.manual_seed(0)
    # Four outputs: the checks use labels 0..3 (binary, three blobs, and
    # check_dtype_object's int(4·x)).
    return SurgicalClassifier(AnyWidth(4).double(),
                              SpectralSurgeon(max_steps=1, n_components=1, random_state=0))


_WHOLE_OUTPUTS = ("the model's outputs are the classes whatever y holds: for binary y "
                  "decision_function has shape (n, C), not (n,)")
EXPECTED_FAILED_CHECKS = {
    "check_estimators_overwrite_params": (
        "it compares joblib.hash of the model before and after fit, but two bitwise-equal "
        "torch tensors hash differently (a pickled tensor carries its storage's identity); "
        "test_given_model_is_never_changed compares the model bitwise instead"),
    "check_classifiers_one_label": (
        "a trained model keeps predicting all of its classes; one label in y cannot make it "
        "predict only that label (fit does not train, it rebalances)"),
    "check_classifiers_classes": (
        "y must hold the model's class indices 0..C-1; string labels are refused with a "
        "ValueError that says to encode them"),
    "check_classifiers_train": _WHOLE_OUTPUTS,
    "check_decision_proba_consistency": _WHOLE_OUTPUTS,
}


def _expected_failed_checks(estimator):
    return EXPECTED_FAILED_CHECKS


@parametrize_with_checks([_check_instance()], expected_failed_checks=_expected_failed_checks)
def test_scikit_learn_checks(estimator, check):
    check(estimator)


# --------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def digits():
    """An MLP trained on standardised long-tailed digits (8×8, 10 classes)."""
    s = load_long_tailed("digits-lt", 10, random_state=0, standardize=False)
    scaler = StandardScaler().fit(s.X_train.numpy())
    X_tr = torch.as_tensor(scaler.transform(s.X_train.numpy()), dtype=torch.float32)
    torch.manual_seed(0)
    model = train_model(MLP(64, (32,), 10), X_tr, s.y_train, epochs=15, lr=1e-2,
                        random_state=0)
    as64 = {k: getattr(s, k).numpy().astype(np.float64) for k in ("X_val", "X_test")}
    return model, as64["X_val"], s.y_val.numpy(), as64["X_test"], s.y_test.numpy()


def _changed_logits(surgeon, model, X):
    with torch.no_grad():
        return surgeon.transform(model)(torch.as_tensor(X, dtype=torch.float32)).double()


def test_pipeline_with_a_scaler_matches_the_surgeon_on_scaled_data(digits):
    model, X_val, y_val, X_te, y_te = digits
    snap = snapshot(model)
    pipe = Pipeline([("scale", StandardScaler()),
                     ("surgery", SurgicalClassifier(model, SpectralSurgeon(max_steps=3,
                                                                           random_state=0)))])
    pipe.fit(X_val, y_val)
    assert_unchanged(model, snap)
    clf = pipe.named_steps["surgery"]
    assert np.array_equal(clf.classes_, np.arange(10)) and clf.n_features_in_ == 64

    # Independently: scale by hand, run the surgeon on float32 tensors.
    scaler = StandardScaler().fit(X_val)
    ref = SpectralSurgeon(max_steps=3, random_state=0).fit(
        model, torch.as_tensor(scaler.transform(X_val), dtype=torch.float32),
        torch.as_tensor(y_val))
    torch.testing.assert_close(clf.surgeon_.perturbation_, ref.perturbation_)
    logits = _changed_logits(ref, model, scaler.transform(X_te))
    proba = pipe.predict_proba(X_te)
    assert proba.dtype == np.float64 and proba.shape == (len(y_te), 10)
    np.testing.assert_allclose(proba, torch.softmax(logits, 1).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-12)
    pred = pipe.predict(X_te)
    assert np.array_equal(pred, logits.argmax(1).numpy())
    np.testing.assert_allclose(pipe.decision_function(X_te), logits.numpy(), rtol=1e-5, atol=1e-6)
    assert pipe.score(X_te, y_te) == pytest.approx(accuracy_score(y_te, pred))
    moved = [not torch.equal(a, b) for a, b in zip(clf.model_.parameters(), model.parameters())]
    assert any(moved) == bool(clf.surgeon_.perturbation_.abs().sum() > 0)


def test_grid_search_over_nested_surgeon_parameters(digits):
    model, X_val, y_val, *_ = digits
    snap = snapshot(model)
    pipe = Pipeline([("scale", StandardScaler()),
                     ("clf", SurgicalClassifier(model, SpectralSurgeon(
                         max_steps=2, amplitude=GammaDecay(), random_state=0)))])
    grid = {"clf__surgeon__budget": [0.05, 0.5], "clf__surgeon__amplitude__gamma": [0.5, 0.9]}
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    search = GridSearchCV(pipe, grid, cv=cv, scoring="balanced_accuracy").fit(X_val, y_val)
    assert_unchanged(model, snap)
    best = search.best_estimator_.named_steps["clf"]
    assert best.surgeon_.budget == search.best_params_["clf__surgeon__budget"]
    assert best.surgeon_.amplitude.gamma == search.best_params_["clf__surgeon__amplitude__gamma"]

    # Every fold score of one candidate, recomputed without scikit-learn's machinery.
    i = 1
    params = search.cv_results_["params"][i]
    for fold, (tr, te) in enumerate(cv.split(X_val, y_val)):
        scaler = StandardScaler().fit(X_val[tr])
        s = SpectralSurgeon(max_steps=2, random_state=0,
                            amplitude=GammaDecay(params["clf__surgeon__amplitude__gamma"]),
                            budget=params["clf__surgeon__budget"]).fit(
            model, torch.as_tensor(scaler.transform(X_val[tr]), dtype=torch.float32),
            torch.as_tensor(y_val[tr]))
        pred = _changed_logits(s, model, scaler.transform(X_val[te])).argmax(1).numpy()
        assert search.cv_results_[f"split{fold}_test_score"][i] == pytest.approx(
            balanced_accuracy_score(y_val[te], pred), abs=1e-12)


def test_clone_copies_the_model_and_exposes_nested_names():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    clf = SurgicalClassifier(model, SpectralSurgeon(amplitude=GammaDecay()))
    names = clf.get_params(deep=True)
    assert {"surgeon__budget", "surgeon__amplitude__gamma", "model", "batch_size"} <= set(names)
    twin = clone(clf)
    assert twin.model is not model and twin.surgeon is not clf.surgeon
    for a, b in zip(twin.model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    twin.set_params(surgeon__budget=0.1, surgeon__amplitude__gamma=0.4)
    assert clf.surgeon.budget is None and clf.surgeon.amplitude.gamma == 0.7


def test_given_model_is_never_changed_and_fit_is_repeatable():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.2), nn.Linear(6, 3))
    model.train()
    snap = snapshot(model)
    X = np.random.default_rng(0).normal(size=(60, 3))
    y = np.arange(60) % 3
    clf = SurgicalClassifier(model, SpectralSurgeon(max_steps=2, random_state=0))
    p1 = clf.fit(X, y).predict_proba(X)
    assert_unchanged(model, snap)
    assert clf.model_ is not model
    p2 = clf.fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(p1, p2)


def test_tensor_inputs_of_any_shape_and_skorch_like_nets():
    model = tiny_cnn(n_classes=3)  # (N, 1, 5, 5) images, float64, BatchNorm, dropout
    snap = snapshot(model)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(45, 1, 5, 5, generator=g, dtype=torch.float64)
    y = torch.arange(45) % 3

    class FakeNet:  # what a fitted skorch net exposes
        module_ = model

    clf = SurgicalClassifier(FakeNet(), SpectralSurgeon(max_steps=2, random_state=0))
    proba = clf.fit(X, y).predict_proba(X)
    assert_unchanged(model, snap)
    assert proba.shape == (45, 3) and not hasattr(clf, "n_features_in_")
    ref = SpectralSurgeon(max_steps=2, random_state=0).fit(model, X, y)
    changed = ref.transform(model).eval()
    with torch.no_grad():
        np.testing.assert_allclose(proba, torch.softmax(changed(X), 1).numpy(), rtol=1e-10)


def test_binary_model_decision_function_is_one_dimensional():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X = np.random.default_rng(1).normal(size=(40, 2))
    y = (X[:, 0] > 0).astype(int)
    clf = SurgicalClassifier(model, SpectralSurgeon(max_steps=1, random_state=0)).fit(X, y)
    d = clf.decision_function(X)
    assert d.shape == (40,)
    with torch.no_grad():
        logits = clf.model_(torch.as_tensor(X))
    np.testing.assert_allclose(d, (logits[:, 1] - logits[:, 0]).numpy(), rtol=1e-12)
    np.testing.assert_allclose(clf.predict_proba(X)[:, 1], 1 / (1 + np.exp(-d)), rtol=1e-10)


@pytest.mark.parametrize("make, error, match", [
    (lambda X, y: (X, np.array(["a", "b", "c"] * 10)), ValueError, "class indices"),
    (lambda X, y: (X, y + 1), ValueError, "y contains label 3"),
    (lambda X, y: (X, -y), ValueError, "negative"),
    (lambda X, y: (X, y + 0.5), ValueError, "Unknown label type"),
    (lambda X, y: (X, None), ValueError, "requires y"),
    (lambda X, y: (X[:, :2], y), ValueError, "cannot take X"),
    (lambda X, y: (X[:-1], y), ValueError, "samples"),
])
def test_invalid_inputs_raise_naming_them(make, error, match):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3))
    X = np.random.default_rng(0).normal(size=(30, 3))
    X_bad, y_bad = make(X, np.arange(30) % 3)
    with pytest.raises(error, match=match):
        SurgicalClassifier(model, SpectralSurgeon(max_steps=1)).fit(X_bad, y_bad)


def test_warnings_name_the_classifiers_arguments():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3))
    X = np.random.default_rng(0).normal(size=(30, 3))
    y = np.r_[np.zeros(15), np.ones(14), [2]].astype(int)
    with pytest.warns(UserWarning, match=r"fewer than 10 samples in y \(") as record:
        SurgicalClassifier(model, SpectralSurgeon(max_steps=1, random_state=0)).fit(X, y)
    assert not any("y_val" in str(w.message) for w in record)


def test_prediction_errors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3))
    X = np.random.default_rng(0).normal(size=(30, 3))
    clf = SurgicalClassifier(model, SpectralSurgeon(max_steps=1, random_state=0))
    with pytest.raises(NotFittedError):
        clf.predict(X)
    clf.fit(X, np.arange(30) % 3)
    with pytest.raises(ValueError, match="X has 2 features, but SurgicalClassifier is expecting"):
        clf.predict_proba(X[:, :2])
    with pytest.raises(TypeError, match="model"):
        SurgicalClassifier("not a model").fit(X, np.arange(30) % 3)
    with pytest.raises(TypeError, match="surgeon"):
        SurgicalClassifier(model, surgeon=GammaDecay()).fit(X, np.arange(30) % 3)
    with pytest.raises(ValueError, match="batch_size"):
        SurgicalClassifier(model, batch_size=0).fit(X, np.arange(30) % 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_moves_only_the_private_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3))
    X = np.random.default_rng(0).normal(size=(60, 3))
    y = np.arange(60) % 3
    clf = SurgicalClassifier(model, SpectralSurgeon(max_steps=2, random_state=0), device="cuda")
    proba = clf.fit(X, y).predict_proba(X)
    assert next(model.parameters()).device.type == "cpu"
    assert next(clf.model_.parameters()).device.type == "cuda"
    cpu = SurgicalClassifier(model, SpectralSurgeon(max_steps=2, random_state=0)).fit(X, y)
    np.testing.assert_allclose(proba, cpu.predict_proba(X), atol=1e-4)
