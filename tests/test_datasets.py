"""Long-tailed splits: counts against the closed form, contents against the
shipped arrays, disjointness, seeding; CIFAR-10 and ISIC 2019 loaders on tiny
files written here."""

from __future__ import annotations

import csv
import pickle

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

from hessrebal._data import as_data
from hessrebal.datasets import (
    CIFAR10_FILES,
    ISIC2019_CLASSES,
    ImageArrayDataset,
    load_long_tailed,
    long_tailed_counts,
)


def test_counts_match_published_cifar10_lt():
    # Cao et al. 2019 / Cui et al. 2019: 12,406 images at r = 100, 20,431 at r = 10.
    c100 = long_tailed_counts(5000, 10, 100)
    assert c100.tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert long_tailed_counts(5000, 10, 10).sum() == 20431
    assert (long_tailed_counts(300, 10, 1) == 300).all()
    tiny = long_tailed_counts(3, 10, 1000)
    assert tiny.min() == 1 and (np.diff(tiny) <= 0).all()


@pytest.mark.parametrize("bad, exc", [(0.5, ValueError), (float("nan"), ValueError),
                                      ("x", TypeError)])
def test_bad_ratio(bad, exc):
    with pytest.raises(exc, match="imbalance_ratio"):
        load_long_tailed("digits-lt", imbalance_ratio=bad)


def test_unknown_name():
    with pytest.raises(ValueError, match="name must be one of"):
        load_long_tailed("imagenet-lt")


@pytest.mark.parametrize("ratio", [1, 10, 100])
def test_digits_lt_splits(ratio):
    s = load_long_tailed("digits-lt", imbalance_ratio=ratio, random_state=3)
    C = 10
    assert s.X_train.dtype == torch.float32 and s.y_train.dtype == torch.int64
    assert s.X_train.shape[1] == 64 and s.input_shape == (1, 8, 8)
    # Counts: the closed form, applied along the seeded head-to-tail order.
    expected = long_tailed_counts(int(s.class_counts.max()), C, ratio)
    assert s.class_counts[s.tail_order].tolist() == expected.tolist()
    assert np.bincount(s.y_train.numpy(), minlength=C).tolist() == s.class_counts.tolist()
    # n_max is the smallest training pool: 174 samples of digit 8, minus 40 + 40.
    assert s.class_counts.max() == 174 - 80
    # Balanced evaluation splits.
    assert (np.bincount(s.y_val.numpy(), minlength=C) == 40).all()
    assert (np.bincount(s.y_test.numpy(), minlength=C) == 40).all()
    # Disjoint splits.
    tr, va, te = (set(s.indices[k].tolist()) for k in ("train", "val", "test"))
    assert not (tr & va) and not (tr & te) and not (va & te)
    # Contents equal the shipped data, scaled and standardised with training statistics.
    d = load_digits()
    pre = s.preprocessing
    for split in ("train", "val", "test"):
        X, y = s.data(split)
        idx = s.indices[split]
        raw = (X.double().numpy() * pre["std"] + pre["mean"]) * pre["scale"]
        np.testing.assert_allclose(raw, d.data[idx], atol=1e-4)
        assert y.tolist() == d.target[idx].tolist()
    assert abs(float(s.X_train.mean())) < 1e-4 and abs(float(s.X_train.std()) - 1) < 1e-3


def test_seeding():
    a = load_long_tailed("digits-lt", 10, random_state=0)
    b = load_long_tailed("digits-lt", 10, random_state=0)
    c = load_long_tailed("digits-lt", 10, random_state=1)
    assert torch.equal(a.X_train, b.X_train) and torch.equal(a.y_test, b.y_test)
    assert a.tail_order.tolist() == b.tail_order.tolist()
    assert a.tail_order.tolist() != c.tail_order.tolist()
    fixed = load_long_tailed("digits-lt", 10, random_state=1, permute_classes=False)
    assert fixed.tail_order.tolist() == list(range(10))


def test_balanced_name_and_options():
    s = load_long_tailed("digits", random_state=0, val_per_class=20, test_per_class=30)
    assert s.imbalance_ratio == 1 and (s.class_counts == 174 - 50).all()
    assert len(s.y_val) == 200 and len(s.y_test) == 300
    assert np.allclose(s.class_prior, 0.1)
    with pytest.raises(ValueError, match="cannot give"):
        load_long_tailed("digits", val_per_class=100, test_per_class=100)
    with pytest.raises(TypeError, match="val_per_class"):
        load_long_tailed("digits", val_per_class=2.5)
    none_val = load_long_tailed("digits-lt", val_per_class=0)
    assert none_val.X_val is None and len(none_val.labels("val")) == 0


def test_mnist_lt():
    s = load_long_tailed("mnist-lt", random_state=0)
    assert s.imbalance_ratio == 100 and s.X_train.shape[1] == 784
    assert s.class_counts.max() == 300 and s.class_counts.min() == 3
    assert (np.bincount(s.y_val.numpy()) == 100).all()
    assert (np.bincount(s.y_test.numpy()) == 100).all()
    tr, va, te = (set(s.indices[k].tolist()) for k in ("train", "val", "test"))
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert 0.0 < s.preprocessing["mean"] < 0.5  # pixels were scaled to [0, 1] first
    balanced = load_long_tailed("mnist", random_state=0)
    assert (balanced.class_counts == 300).all()


# --------------------------------------------------------------------------- CIFAR-10


def _write_cifar(root, per_class_train=30, per_class_test=4, n_classes=10, seed=0):
    """The pickle layout torchvision reads, with each image's pixels encoding
    its label (value 20·label) and its position (one pixel)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    labels = np.repeat(np.arange(n_classes), per_class_train)
    rng.shuffle(labels)

    def images(lbls, offset):
        data = np.repeat((20 * lbls).astype(np.uint8)[:, None], 3072, axis=1)
        data[:, 0] = (np.arange(lbls.size) + offset) % 256
        return data

    for b, part in enumerate(np.array_split(np.arange(labels.size), 5)):
        entry = {"batch_label": f"training batch {b + 1}", "labels": labels[part].tolist(),
                 "data": images(labels[part], part[0]), "filenames": [f"{i}.png" for i in part]}
        (folder / f"data_batch_{b + 1}").write_bytes(pickle.dumps(entry))
    test_labels = np.repeat(np.arange(n_classes), per_class_test)
    (folder / "test_batch").write_bytes(pickle.dumps(
        {"batch_label": "testing batch", "labels": test_labels.tolist(),
         "data": images(test_labels, 0)}))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"][:n_classes]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return labels


def test_cifar10_lt_on_fake_files(tmp_path):
    labels = _write_cifar(tmp_path)
    s = load_long_tailed("cifar10-lt", imbalance_ratio=10, root=tmp_path, val_per_class=5,
                         verify_checksums=False, random_state=0)
    wanted = long_tailed_counts(30, 10, 10)
    # The head class is capped at its 30 images minus the 5 validation images.
    assert s.class_counts.tolist() == np.minimum(wanted, 25).tolist()
    assert s.tail_order.tolist() == list(range(10))
    assert s.classes[3] == "cat"
    assert s.y_train is None and len(s.X_train) == s.class_counts.sum()
    assert np.bincount(s.labels("train").numpy()).tolist() == s.class_counts.tolist()
    assert (np.bincount(s.labels("val").numpy()) == 5).all()
    assert len(s.X_test) == 40
    assert not set(s.indices["train"]) & set(s.indices["val"])
    assert (labels[s.indices["train"]] == s.labels("train").numpy()).all()
    # Items: default transform = /255 then CIFAR normalisation; label matches pixels.
    ds = s.X_train
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    raw = x * ds.std + ds.mean
    assert torch.allclose(raw[:, 5, 5], torch.full((3,), 20 * y / 255.0), atol=1e-5)
    # Works with the package's data reader.
    n = sum(xb.shape[0] for xb, _ in as_data(s.X_val).chunks(16))
    assert n == 50


def test_cifar10_transform_and_exact_standard(tmp_path):
    _write_cifar(tmp_path)
    seen = []

    def tf(img):
        seen.append(img.size)
        return torch.zeros(1)

    s = load_long_tailed("cifar10-lt", 10, root=tmp_path, val_per_class=0,
                         verify_checksums=False, transform=tf)
    assert s.X_val is None
    assert s.class_counts.tolist() == long_tailed_counts(30, 10, 10).tolist()
    s.X_test[0]
    assert seen == [(32, 32)]


def test_cifar10_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_long_tailed("cifar10-lt", root=tmp_path)
    with pytest.raises(ValueError, match="root is required"):
        load_long_tailed("cifar10-lt")
    _write_cifar(tmp_path)
    with pytest.raises(ValueError, match="checksums"):
        load_long_tailed("cifar10-lt", root=tmp_path)
    # A hostile pickle is refused by the restricted reader, never executed.
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ValueError, match="not a CIFAR-10 batch"):
        load_long_tailed("cifar10-lt", root=tmp_path, verify_checksums=False)
    assert not marker.exists()
    assert "test_batch" in CIFAR10_FILES


def test_image_array_dataset_loader():
    imgs = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    ds = ImageArrayDataset(imgs, [0, 1, 2, 3])
    xb, yb = next(iter(DataLoader(ds, batch_size=4)))
    assert xb.shape == (4, 3, 32, 32) and yb.tolist() == [0, 1, 2, 3]


# --------------------------------------------------------------------------- ISIC 2019


def _write_isic(root, counts=(10, 20, 5, 3, 2, 0, 1, 1), unk=1, subdir=True, fmt="JPEG"):
    from PIL import Image

    img_dir = root / "ISIC_2019_Training_Input" if subdir else root
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    k = 0
    for c, n in enumerate(counts):
        for _ in range(n):
            rows.append((f"ISIC_{k:07d}", c))
            k += 1
    for _ in range(unk):
        rows.append((f"ISIC_{k:07d}", 8))
        k += 1
    ext = ".jpg" if fmt == "JPEG" else ".png"
    for name, c in rows:
        colour = (c * 30 % 256, 100, 200)
        Image.new("RGB", (12, 10), colour).save(img_dir / (name + ext), format=fmt)
    with open(root / "ISIC_2019_Training_GroundTruth.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", *ISIC2019_CLASSES, "UNK"])
        for name, c in rows:
            hot = [0.0] * 9
            hot[c] = 1.0
            w.writerow([name, *hot])
    return rows


@pytest.mark.parametrize("subdir, fmt", [(True, "JPEG"), (False, "PNG")])
def test_isic2019_on_fake_files(tmp_path, subdir, fmt):
    rows = _write_isic(tmp_path, subdir=subdir, fmt=fmt)
    with pytest.warns(UserWarning, match="skipped 1 row"):
        s = load_long_tailed("isic2019", root=tmp_path, image_size=16, random_state=0,
                             val_fraction=0.2, test_fraction=0.2)
    labelled = [c for _, c in rows if c < 8]
    y_all = np.array(labelled)
    counts = np.bincount(y_all, minlength=8)
    # Stratified: per class round(0.2·n) test and validation images, the rest training.
    for c in range(8):
        n_te = round(0.2 * counts[c])
        assert (s.labels("test").numpy() == c).sum() == n_te
        assert (s.labels("val").numpy() == c).sum() == round(0.2 * counts[c])
    assert s.class_counts.sum() + len(s.labels("val")) + len(s.labels("test")) == len(labelled)
    parts = [set(s.indices[k].tolist()) for k in ("train", "val", "test")]
    assert set.union(*parts) == set(range(len(labelled)))
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert s.classes == list(ISIC2019_CLASSES) and s.class_counts[5] == 0
    assert s.tail_order[0] == 1  # NV is the most frequent
    x, y = s.X_train[0]
    assert x.shape == (3, 16, 16)
    # The image of class y has red channel 30·y: undo the ImageNet normalisation.
    red = float(x[0, 8, 8]) * 0.229 + 0.485
    assert abs(red - (30 * y % 256) / 255) < 0.03


def test_isic2019_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="ISIC_2019_Training_GroundTruth.csv"):
        load_long_tailed("isic2019", root=tmp_path)
    _write_isic(tmp_path, unk=0)
    with pytest.raises(ValueError, match="imbalance_ratio must be None"):
        load_long_tailed("isic2019", imbalance_ratio=10, root=tmp_path)
    with pytest.raises(ValueError, match="val_fraction"):
        load_long_tailed("isic2019", root=tmp_path, val_fraction=1.5)
    next((tmp_path / "ISIC_2019_Training_Input").glob("*.jpg")).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        load_long_tailed("isic2019", root=tmp_path)


def test_isic2019_bad_csv(tmp_path):
    (tmp_path / "ISIC_2019_Training_GroundTruth.csv").write_text("image,MEL,NV\nISIC_1,1,0\n")
    with pytest.raises(ValueError, match="lacks the column"):
        load_long_tailed("isic2019", root=tmp_path)
