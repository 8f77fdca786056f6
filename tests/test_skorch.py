"""Issue 14, item 6: a real skorch ``NeuralNetClassifier`` (a dev dependency),
through ``SpectralSurgeon.fit/transform``, the baselines and ``SurgicalClassifier``."""

import warnings

import numpy as np
import pytest
import torch
from skorch import NeuralNetClassifier
from torch import nn

from hessrebal import SpectralSurgeon
from hessrebal.baselines import LogitAdjustment
from hessrebal.sklearn import SurgicalClassifier
from tests.conftest import PAPER_RULES

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Logits(nn.Module):
    def __init__(self, softmax: bool = False):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3))
        self.softmax = softmax

    def forward(self, X):
        z = self.body(X)
        return torch.softmax(z, dim=1) if self.softmax else z


def _blobs(seed, counts):
    rng = np.random.default_rng(seed)
    means = np.array([[2.0, 0, 0, 0, 0], [0, 2.0, 0, 0, 0], [0, 0, 2.0, 0.5, 0]])
    X = np.concatenate([means[c] + 1.3 * rng.standard_normal((n, 5)) for c, n in
                        enumerate(counts)]).astype(np.float32)
    return X, np.repeat(np.arange(3), counts).astype(np.int64)


@pytest.fixture(scope="module")
def skorch_net():
    X, y = _blobs(0, [300, 60, 12])
    torch.manual_seed(0)
    net = NeuralNetClassifier(Logits, criterion=nn.CrossEntropyLoss, max_epochs=40, lr=0.1,
                              batch_size=64, train_split=None, verbose=0,
                              iterator_train__shuffle=True)
    net.fit(X, y)
    return net, _blobs(1, [40, 40, 40]), _blobs(2, [100, 100, 100])


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_surgeon_fit_transform_on_a_skorch_net(skorch_net):
    net, (X_val, y_val), (X_te, y_te) = skorch_net
    before = _params(net.module_)
    surgeon = SpectralSurgeon(max_steps=4, random_state=0, **PAPER_RULES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fingerprint or probability warning
        fixed = surgeon.fit(net, X_val, y_val).transform(net)
    assert any(h["accepted"] for h in surgeon.history_), "the test needs a changed model"
    # the same type back, the given net untouched
    assert isinstance(fixed, NeuralNetClassifier) and fixed is not net
    for k, v in _params(net.module_).items():
        assert torch.equal(v, before[k]), k
    # the fitted module equals the surgery applied to the bare module
    bare = SpectralSurgeon(max_steps=4, random_state=0, **PAPER_RULES).fit(
        net.module_, X_val, y_val)
    assert torch.equal(bare.perturbation_, surgeon.perturbation_)
    ref = bare.transform(net.module_)
    for (n, p), (_, q) in zip(fixed.module_.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n
    # the changed skorch net predicts as its module does, and its balanced
    # accuracy is what score() reports
    with torch.no_grad():
        want = ref(torch.as_tensor(X_te)).argmax(1).numpy()
    np.testing.assert_array_equal(fixed.predict(X_te), want)
    per_class = [np.mean(want[y_te == c] == c) for c in range(3)]
    assert surgeon.score(net, X_te, y_te) == pytest.approx(np.mean(per_class))


def test_logit_adjustment_on_a_skorch_net(skorch_net):
    net, (X_val, y_val), _ = skorch_net
    la = LogitAdjustment(class_prior=[300, 60, 12], tau=1.0).fit(net, X_val, y_val)
    adjusted = la.transform(net)
    with torch.no_grad():
        z = net.module_(torch.as_tensor(X_val))
        out = adjusted(torch.as_tensor(X_val))
    prior = np.array([300, 60, 12]) / 372
    np.testing.assert_allclose(out.numpy(), (z - torch.log(torch.tensor(prior))).numpy(),
                               rtol=1e-5, atol=1e-5)


def test_surgical_classifier_with_a_skorch_net(skorch_net):
    net, (X_val, y_val), (X_te, y_te) = skorch_net
    surgeon = SpectralSurgeon(max_steps=4, random_state=0, **PAPER_RULES)
    clf = SurgicalClassifier(net, surgeon).fit(X_val, y_val)
    bare = SurgicalClassifier(net.module_, surgeon).fit(X_val, y_val)
    np.testing.assert_array_equal(clf.predict_proba(X_te), bare.predict_proba(X_te))
    assert clf.predict_proba(X_te).shape == (300, 3)
    np.testing.assert_array_equal(clf.classes_, [0, 1, 2])
    assert torch.equal(clf.surgeon_.perturbation_, bare.surgeon_.perturbation_)
    # a pipeline-style clone keeps the net usable
    from sklearn.base import clone

    again = clone(clf).fit(X_val, y_val)
    np.testing.assert_array_equal(again.predict(X_te), clf.predict(X_te))


def test_skorch_net_with_softmax_outputs_is_warned_about():
    # skorch's default criterion (NLLLoss on log of the outputs) trains a
    # module that ends in a softmax: its outputs are probabilities.
    X, y = _blobs(0, [100, 40, 10])
    torch.manual_seed(0)
    net = NeuralNetClassifier(Logits, module__softmax=True, max_epochs=5, lr=0.1,
                              train_split=None, verbose=0)
    net.fit(X, y)
    X_val, y_val = _blobs(1, [20, 20, 20])
    with pytest.warns(UserWarning, match="outputs are probabilities"):
        SpectralSurgeon(max_steps=0).fit(net, X_val, y_val)


def test_grid_search_clones_a_trained_skorch_net(skorch_net):
    # clone() of a skorch net is an untrained net: SurgicalClassifier must
    # deep-copy the trained one instead, or every GridSearchCV fit fails.
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV

    net, (X_val, y_val), (X_te, y_te) = skorch_net
    clf = SurgicalClassifier(net, SpectralSurgeon(max_steps=1, random_state=0))
    copied = clone(clf)
    assert copied.model is not net and hasattr(copied.model, "module_")
    for (n, p), (_, q) in zip(copied.model.module_.named_parameters(),
                              net.module_.named_parameters()):
        assert torch.equal(p, q) and p is not q, n
    grid = GridSearchCV(clf, {"surgeon__amplitude__gamma": [0.4, 0.8]}, cv=2,
                        scoring="balanced_accuracy").fit(X_val, y_val)
    assert grid.best_estimator_.predict(X_te).shape == (300,)
