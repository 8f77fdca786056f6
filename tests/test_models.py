"""Reference models, the seeded training routine and the fine-tune references."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from hessrebal.datasets import load_long_tailed
from hessrebal.metrics import summarize
from hessrebal.models import (
    MLP,
    SmallCNN,
    focal_loss,
    make_model,
    resnet18_cifar,
    resnet32,
    train_model,
)
from hessrebal.training import class_balanced_finetune, class_balanced_weights, focal_finetune


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mlp_shapes_and_flattening():
    m = MLP(64, (16, 8), 10)
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(m(x), m(x.reshape(5, 64)))
    assert m(x).shape == (5, 10)
    assert isinstance(m.classifier, nn.Linear) and m.classifier.out_features == 10
    with pytest.raises(ValueError, match="784 input features"):
        MLP()(torch.zeros(2, 64))
    with pytest.raises(ValueError, match="hidden"):
        MLP(10, (0,), 2)


@pytest.mark.parametrize("size", [8, 28])
def test_small_cnn_flat_and_image_inputs(size):
    m = SmallCNN(1, size, 10).eval()
    x = torch.randn(3, 1, size, size)
    assert torch.allclose(m(x), m(x.reshape(3, -1)), atol=1e-6)
    assert torch.allclose(m(x), m(x[:, 0]), atol=1e-6)
    assert m(x).shape == (3, 10)
    with pytest.raises(ValueError, match="flat inputs"):
        m(torch.zeros(2, size * size + 1))


def test_resnets():
    m = resnet32(10)
    # He et al.'s ResNet-32 (option-A shortcuts): 0.46 M parameters, 31 convs + 1 linear.
    assert sum(p.numel() for p in m.parameters()) == 464_154
    assert sum(isinstance(x, (nn.Conv2d, nn.Linear)) for x in m.modules()) == 32
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 10)
    r18 = resnet18_cifar(7).eval()
    assert r18.conv1.kernel_size == (3, 3) and r18.conv1.stride == (1, 1)
    assert isinstance(r18.maxpool, nn.Identity)
    assert r18(x).shape == (2, 7)


def test_make_model_seeded_without_touching_global_rng():
    before = torch.get_rng_state()
    a = make_model("mlp", random_state=4, in_features=20, hidden=(8,))
    b = make_model("mlp", random_state=4, in_features=20, hidden=(8,))
    c = make_model("mlp", random_state=5, in_features=20, hidden=(8,))
    assert torch.equal(torch.get_rng_state(), before)
    assert _same_state(_state(a), _state(b)) and not _same_state(_state(a), _state(c))
    assert isinstance(make_model("cnn", image_size=8), SmallCNN)
    with pytest.raises(ValueError, match="name must be one of"):
        make_model("vgg")


def _digits():
    return load_long_tailed("digits", random_state=0)


def test_train_model_reproducible_and_accurate():
    s = _digits()
    runs = []
    for _ in range(2):
        m = make_model("mlp", random_state=0, in_features=64, hidden=(64,))
        out = train_model(m, s.X_train, s.y_train, epochs=15, lr=3e-3, random_state=1)
        assert out is m and not m.training
        runs.append(_state(m))
    assert _same_state(*runs)
    with torch.no_grad():
        r = summarize(s.y_test, m(s.X_test))
    assert r["accuracy"] > 0.9
    other = make_model("mlp", random_state=0, in_features=64, hidden=(64,))
    train_model(other, s.X_train, s.y_train, epochs=15, lr=3e-3, random_state=2)
    assert not _same_state(runs[0], _state(other))


def test_train_model_cnn_with_dataset_and_sgd():
    s = _digits()
    m = make_model("cnn", random_state=0, image_size=8, width=8)
    before = torch.get_rng_state()
    ds = TensorDataset(s.X_train, s.y_train)
    train_model(m, ds, epochs=3, lr=0.05, optimizer="sgd", weight_decay=5e-4)
    assert torch.equal(torch.get_rng_state(), before)
    assert not m.training
    with torch.no_grad():
        acc = summarize(s.y_test, m(s.X_test))["accuracy"]
    assert acc > 0.7


@pytest.mark.parametrize("kwargs, match", [
    ({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"), ({"optimizer": "rmsprop"}, "optimizer"),
    ({"loss": "hinge"}, "loss"), ({"batch_size": 0}, "batch_size"),
    ({"class_weights": [1.0, -1.0]}, "class_weights"),
])
def test_train_model_bad_input(kwargs, match):
    X, y = torch.randn(10, 3), torch.arange(10) % 2
    m = make_model("mlp", in_features=3, hidden=(4,), n_classes=2)
    with pytest.raises(ValueError, match=match):
        train_model(m, X, y, **kwargs)


def test_train_model_rejects_non_module():
    with pytest.raises(TypeError, match="model"):
        train_model(object(), torch.zeros(2, 2), torch.zeros(2))


def test_focal_loss_closed_form():
    z = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    t = torch.tensor([0, 2])
    p = torch.softmax(z, 1)[torch.arange(2), t]
    expected = (-(1 - p) ** 2 * torch.log(p)).mean()
    assert torch.allclose(focal_loss(z, t, gamma=2.0), expected)
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert torch.allclose(focal_loss(z, t, 0.0, w), F.cross_entropy(z, t, weight=w))
    assert torch.allclose(focal_loss(z, t, 0.0), F.cross_entropy(z, t))


def test_class_balanced_weights_formula():
    counts = np.array([1000, 100, 10, 0])
    beta = 0.999
    raw = np.array([(1 - beta) / (1 - beta ** n) for n in counts[:3]])
    expected = np.append(raw / raw.sum() * 3, 0.0)
    np.testing.assert_allclose(class_balanced_weights(counts, beta), expected, rtol=1e-12)
    np.testing.assert_allclose(class_balanced_weights([5, 50], 0.0), [1.0, 1.0])
    # β → 1 approaches inverse frequency.
    w = class_balanced_weights([1000, 10], 1 - 1e-9)
    assert abs(w[1] / w[0] - 100) < 1e-3
    with pytest.raises(ValueError, match="beta"):
        class_balanced_weights([1, 2], 1.0)
    with pytest.raises(ValueError, match="class_counts"):
        class_balanced_weights([-1, 2])


def _two_gaussians(n0, n1, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.cat([torch.randn(n0, 2, generator=g),
                   torch.randn(n1, 2, generator=g) + torch.tensor([1.5, 0.0])])
    y = torch.cat([torch.zeros(n0), torch.ones(n1)]).long()
    return X, y


def test_finetunes_copy_and_shift_towards_minority():
    X, y = _two_gaussians(400, 20, 0)
    Xt, _ = _two_gaussians(0, 500, 1)
    m = make_model("mlp", random_state=0, in_features=2, hidden=(16,), n_classes=2)
    train_model(m, X, y, epochs=20, lr=1e-2)
    m.train()  # the finetunes must also leave the mode alone
    before = _state(m)
    kw = dict(epochs=10, lr=1e-2, random_state=0)
    plain = train_model(copy.deepcopy(m), X, y, **kw)
    cb = class_balanced_finetune(m, X, y, beta=0.999, **kw)
    focal0 = focal_finetune(m, X, y, gamma=0.0, **kw)
    focal2 = focal_finetune(m, X, y, gamma=2.0, **kw)
    assert _same_state(before, _state(m)) and m.training
    assert cb is not m and focal2 is not m and not cb.training
    # γ = 0 is the cross-entropy fine-tune.
    for k, v in _state(plain).items():
        assert torch.allclose(v, _state(focal0)[k], atol=1e-5), k
    with torch.no_grad():
        p_plain = torch.softmax(plain(Xt), 1)[:, 1].mean()
        p_cb = torch.softmax(cb(Xt), 1)[:, 1].mean()
    # Up-weighting the minority class raises its predicted probability on its own samples.
    assert p_cb > p_plain + 0.05
    assert not _same_state(_state(focal2), _state(plain))


def test_class_balanced_finetune_label_check():
    m = make_model("mlp", in_features=2, hidden=(4,), n_classes=2)
    with pytest.raises(ValueError, match="label 2"):
        class_balanced_finetune(m, torch.zeros(3, 2), torch.tensor([0, 1, 2]))


@pytest.mark.slow
def test_mnist_lt_mlp_reference_numbers():
    import time

    s = load_long_tailed("mnist-lt", 100, random_state=0)
    m = make_model("mlp", random_state=0)
    t = time.perf_counter()
    train_model(m, s.X_train, s.y_train, epochs=30, lr=1e-3)
    seconds = time.perf_counter() - t
    with torch.no_grad():
        r = summarize(s.y_test, m(s.X_test))
    assert seconds < 30
    assert r["accuracy"] > 0.6 and r["class_std"] > 0.15  # the tail really suffers
