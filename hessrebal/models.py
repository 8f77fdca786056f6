"""Reference classifiers and a seeded training routine for the benchmarks.

``MLP`` and ``SmallCNN`` fit the shipped digit sets (flat inputs are reshaped
inside); ``resnet32`` is the CIFAR ResNet of the long-tail literature (He et
al. 2016, as used by Cao et al. 2019 and Menon et al. 2021) and
``resnet18_cifar`` torchvision's ResNet-18 with a 3×3 stem for 32×32 images.
:func:`train_model` trains any of them reproducibly from a seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ._data import as_data
from ._model import default_output_to_logits
from ._validation import check_positive
from .parameters import unwrap_model

__all__ = [
    "MLP",
    "SmallCNN",
    "CifarResNet",
    "resnet32",
    "resnet18_cifar",
    "make_model",
    "train_model",
    "focal_loss",
    "MODEL_NAMES",
]

MODEL_NAMES = ("mlp", "cnn", "resnet32", "resnet18_cifar")


class MLP(nn.Module):
    """A ReLU multilayer perceptron; any input is flattened to ``(N, in_features)``.

    Parameters
    ----------
    in_features : int, default=784
    hidden : sequence of int, default=(256, 128)
        Widths of the hidden layers (empty for a linear model).
    n_classes : int, default=10
    dropout : float, default=0.0
        Dropout after each hidden layer.

    Attributes
    ----------
    features : nn.Sequential
        The hidden layers.
    classifier : nn.Linear
        The final layer (``TauNormalization`` finds it).

    Examples
    --------
    >>> import torch
    >>> MLP(64, (32,), 10)(torch.zeros(5, 64)).shape
    torch.Size([5, 10])
    """

    def __init__(self, in_features: int = 784, hidden: Sequence[int] = (256, 128),
                 n_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        check_positive(in_features, "in_features", integer=True)
        check_positive(n_classes, "n_classes", integer=True)
        hidden = tuple(hidden)
        for h in hidden:
            check_positive(h, "hidden", integer=True)
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}.")
        self.in_features = int(in_features)
        layers: list[nn.Module] = []
        width = self.in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.in_features:
            raise ValueError(f"MLP expects {self.in_features} input features; got {x.shape[1]}.")
        return self.classifier(self.features(x))


class SmallCNN(nn.Module):
    """Three 3×3 conv + BatchNorm + ReLU blocks (with max-pooling while the map
    is large), a 2×2 average pool, a linear classifier. Works from 8×8
    (sklearn digits) to 32×32 inputs.

    Parameters
    ----------
    in_channels : int, default=1
    image_size : int, default=28
        Side of the square input; flat inputs ``(N, C·H·W)`` are reshaped.
    n_classes : int, default=10
    width : int, default=16
        Channels of the first block (doubled in the next ones).

    Examples
    --------
    >>> import torch
    >>> SmallCNN(1, 8, 10)(torch.zeros(4, 64)).shape
    torch.Size([4, 10])
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, n_classes: int = 10,
                 width: int = 16) -> None:
        super().__init__()
        for v, n in ((in_channels, "in_channels"), (image_size, "image_size"),
                     (n_classes, "n_classes"), (width, "width")):
            check_positive(v, n, integer=True)
        self.in_channels = int(in_channels)
        self.image_size = int(image_size)

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]

        layers = block(in_channels, width)
        size = image_size
        # Pool only while the map stays at least 4×4, so 8×8 digits keep detail.
        if size >= 16:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        layers += block(width, 2 * width)
        if size >= 8:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        layers += block(2 * width, 2 * width)
        # A 2×2 average pool keeps coarse layout (where the strokes are); full
        # global pooling lost 20 points of balanced accuracy on MNIST-LT.
        layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(8 * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            expected = self.in_channels * self.image_size ** 2
            if x.shape[1] != expected:
                raise ValueError(f"SmallCNN expects flat inputs of {expected} features "
                                 f"({self.in_channels}×{self.image_size}×{self.image_size}); "
                                 f"got {x.shape[1]}.")
            x = x.reshape(x.shape[0], self.in_channels, self.image_size, self.image_size)
        elif x.ndim == 3 and self.in_channels == 1:
            x = x.unsqueeze(1)
        return self.classifier(self.features(x))


class _PadShortcut(nn.Module):
    """Option-A shortcut of the CIFAR ResNets: subsample and zero-pad channels
    (no parameters, as in He et al. 2016 and the long-tail papers' ResNet-32)."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = _PadShortcut(cout - cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet family (6n+2 layers; 16/32/64 channels).

    Parameters
    ----------
    depth : int, default=32
        ``6n + 2`` (20, 32, 44, 56, 110).
    n_classes : int, default=10
    in_channels : int, default=3
    image_size : int, default=32
        Used to reshape flat inputs.
    """

    def __init__(self, depth: int = 32, n_classes: int = 10, in_channels: int = 3,
                 image_size: int = 32) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth must be 6n+2 (20, 32, 44, ...); got {depth}.")
        check_positive(n_classes, "n_classes", integer=True)
        n = (depth - 2) // 6
        self.in_channels = int(in_channels)
        self.image_size = int(image_size)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, n_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            x = x.reshape(x.shape[0], self.in_channels, self.image_size, self.image_size)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def resnet32(n_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-32 for 32×32 images (0.46 M parameters), as in the long-tail literature.

    Examples
    --------
    >>> import torch
    >>> resnet32(10)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """
    return CifarResNet(32, n_classes, in_channels)


def resnet18_cifar(n_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 adapted to 32×32 inputs: 3×3 stride-1 stem, no max-pool."""
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=n_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def make_model(name: str, random_state: int | None = 0, **kwargs: Any) -> nn.Module:
    """Build a reference model by name with a seeded initialisation.

    Parameters
    ----------
    name : {"mlp", "cnn", "resnet32", "resnet18_cifar"}
        ``"small_cnn"`` is an alias of ``"cnn"``, ``"resnet18"`` of
        ``"resnet18_cifar"``.
    random_state : int or None, default=0
        Seeds the weight initialisation without touching the global RNG
        (None: use the global RNG as it is).
    **kwargs
        Passed to the constructor (e.g. ``in_features``, ``n_classes``).

    Returns
    -------
    nn.Module
        In training mode, on the CPU.

    Examples
    --------
    >>> a = make_model("mlp", in_features=64, hidden=(16,))
    >>> b = make_model("mlp", in_features=64, hidden=(16,))
    >>> bool((a.classifier.weight == b.classifier.weight).all())
    True
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a string; got {type(name).__name__}.")
    builders = {"mlp": MLP, "cnn": SmallCNN, "small_cnn": SmallCNN, "smallcnn": SmallCNN,
                "resnet32": resnet32, "resnet18_cifar": resnet18_cifar,
                "resnet18": resnet18_cifar}
    key = name.lower().replace("-", "_")
    if key not in builders:
        raise ValueError(f"name must be one of {', '.join(MODEL_NAMES)}; got {name!r}.")
    if random_state is None:
        return builders[key](**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(random_state))
        return builders[key](**kwargs)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean focal loss ``−w_y (1 − p_y)^γ log p_y`` (Lin et al. 2017).

    With ``gamma=0`` it is the (weighted) cross-entropy; with class weights
    the mean is normalised by the sum of the samples' weights, as
    ``F.cross_entropy`` does.
    """
    logp = F.log_softmax(logits, dim=1).gather(1, target[:, None])[:, 0]
    loss = -((1 - logp.exp()).clamp_min(0) ** gamma) * logp
    if weight is None:
        return loss.mean()
    w = weight[target]
    return (w * loss).sum() / w.sum().clamp_min(torch.finfo(w.dtype).tiny)


def _loss_function(loss: str, gamma: float, weight: torch.Tensor | None):
    if loss == "ce":
        return lambda z, t: F.cross_entropy(z, t, weight=weight)
    if loss == "focal":
        return lambda z, t: focal_loss(z, t, gamma=gamma, weight=weight)
    raise ValueError(f"loss must be 'ce' or 'focal'; got {loss!r}.")


def _model_device(module: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def train_model(
    model: Any,
    X: Any,
    y: Any = None,
    *,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 128,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    momentum: float = 0.9,
    random_state: int | None = 0,
    class_weights: Any = None,
    loss: str = "ce",
    gamma: float = 2.0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> Any:
    """Train ``model`` in place with a seeded schedule and return it in eval mode.

    Parameters
    ----------
    model : nn.Module or skorch net
        Trained in place (this is a training routine; the post-hoc tools of
        hessrebal never change a model).
    X, y : tensor/array and labels, or a Dataset/DataLoader with ``y=None``
        In-memory data are shuffled by a seeded permutation each epoch; a
        Dataset is wrapped in a seeded shuffling DataLoader; a DataLoader is
        iterated as given (its own shuffling, seeded through the global RNG
        inside this call).
    epochs : int, default=30
    lr : float, default=1e-3
        Initial learning rate, annealed to zero by a cosine schedule.
    batch_size : int, default=128
    weight_decay : float, default=0.0
        Decoupled (AdamW) for Adam, L2 for SGD.
    optimizer : {"adam", "sgd"}, default="adam"
    momentum : float, default=0.9
        SGD momentum (Nesterov).
    random_state : int or None, default=0
        Seeds shuffling, dropout and any other randomness of the training;
        the global RNG state is restored afterwards.
    class_weights : array-like of shape (C,), optional
        Per-class loss weights.
    loss : {"ce", "focal"}, default="ce"
    gamma : float, default=2.0
        Focal-loss exponent.
    device : str or torch.device, optional
        Where to train (default: where the model's parameters are); the
        model stays there.
    progress : bool, default=False
        Show a progress bar over the epochs (tqdm, on stderr) with the mean
        loss of the last epoch.

    Returns
    -------
    model
        The same object, trained, in eval mode.

    Examples
    --------
    >>> import torch
    >>> X = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    >>> y = (X[:, 0] > 0).long()
    >>> m = train_model(make_model("mlp", in_features=5, hidden=(16,), n_classes=2), X, y,
    ...                 epochs=50, lr=1e-2)
    >>> float((m(X).argmax(1) == y).float().mean()) > 0.9
    True
    """
    module = unwrap_model(model)
    epochs = _int_at_least(epochs, "epochs", 1)
    batch_size = _int_at_least(batch_size, "batch_size", 1)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number; got {lr!r}.")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a non-negative number; got {weight_decay!r}.")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd'; got {optimizer!r}.")
    if loss not in ("ce", "focal"):
        raise ValueError(f"loss must be 'ce' or 'focal'; got {loss!r}.")
    if not (isinstance(gamma, (int, float)) and gamma >= 0):
        raise ValueError(f"gamma must be a non-negative number; got {gamma!r}.")
    data = as_data(X, y)
    dev = _model_device(module, device)
    module.to(dev)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=True).")
    dtype = params[0].dtype
    weight = None
    if class_weights is not None:
        weight = torch.as_tensor(np.asarray(class_weights, dtype=np.float64), dtype=dtype,
                                 device=dev)
        if weight.ndim != 1 or not torch.isfinite(weight).all() or (weight < 0).any():
            raise ValueError("class_weights must be a 1-D array of finite non-negative numbers.")
    loss_fn = _loss_function(loss, float(gamma), weight)

    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        if random_state is not None:
            torch.manual_seed(int(random_state))
        gen = torch.Generator()
        gen.manual_seed(int(random_state) if random_state is not None else
                        int(torch.randint(0, 2**31 - 1, ()).item()))
        if optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr,
                                                           weight_decay=weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0,
                                  weight_decay=weight_decay)
        batches_per_epoch = _batches_per_epoch(data, batch_size)
        total = epochs * batches_per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
        module.train()
        epoch_iter: Any = range(epochs)
        if progress:
            from tqdm.auto import tqdm

            epoch_iter = tqdm(epoch_iter, desc="training", unit="epoch", leave=False)
        try:
            for epoch in epoch_iter:
                running, seen = 0.0, 0
                for xb, yb in _training_batches(data, batch_size, gen, dev, dtype):
                    opt.zero_grad(set_to_none=True)
                    out = default_output_to_logits(module(xb))
                    if weight is not None and weight.shape[0] != out.shape[1]:
                        raise ValueError(f"class_weights has {weight.shape[0]} entries but the "
                                         f"model has {out.shape[1]} outputs.")
                    batch_loss = loss_fn(out, yb)
                    if not torch.isfinite(batch_loss.detach()):
                        raise FloatingPointError(
                            f"the training loss became {batch_loss.item()} at epoch {epoch}; "
                            "lower lr.")
                    batch_loss.backward()
                    opt.step()
                    sched.step()
                    running += batch_loss.item() * yb.shape[0]
                    seen += yb.shape[0]
                if progress:
                    epoch_iter.set_postfix(loss=f"{running / max(seen, 1):.4f}")
        finally:
            if progress:
                epoch_iter.close()
            module.eval()
    return model


def _int_at_least(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}; got {value!r}.")
    return int(value)


def _batches_per_epoch(data, batch_size: int) -> int:
    if data.loader is not None:
        try:
            return max(1, len(data.loader))
        except TypeError:
            return 1
    return max(1, math.ceil(data.n_samples / batch_size))


def _training_batches(data, batch_size: int, gen: torch.Generator, device, dtype):
    if data.in_memory:
        n = data.X.shape[0]
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            if idx.numel() < 2 and n >= 2:
                continue  # a batch of one breaks BatchNorm and adds only noise
            x = data.X[idx].to(device)
            if x.is_floating_point():
                x = x.to(dtype)
            yield x, data.y[idx].to(device)
        return
    loader = data.loader
    if loader is None:
        loader = DataLoader(data.dataset, batch_size=batch_size, shuffle=True, generator=gen,
                            drop_last=len(data.dataset) > batch_size)
    yield from data.__class__(loader=loader, name=data.name).chunks(batch_size, device, dtype)
