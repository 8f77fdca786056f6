"""Issue 3's acceptance measurement (slow: ``pytest -m slow``).

Long-tailed MNIST (ratio 100), MLP trained from scratch per seed, default
SpectralSurgeon fitted on the balanced validation split, measured on the
held-out balanced test split. Mean over 3 seeds: σ of per-class accuracy down
by ≥ 40 % and balanced accuracy up by ≥ 2 points versus the untouched model.
"""

import numpy as np
import pytest
import torch

from hessrebal import SpectralSurgeon
from hessrebal.datasets import load_long_tailed
from hessrebal.metrics import summarize
from hessrebal.models import MLP, train_model


def run_seed(seed):
    splits = load_long_tailed("mnist-lt", imbalance_ratio=100, random_state=seed)
    torch.manual_seed(seed)
    model = MLP(784, (128, 64), 10)
    train_model(model, splits.X_train, splits.y_train, epochs=20, weight_decay=1e-4,
                random_state=seed)
    fixed = SpectralSurgeon(random_state=seed).fit_transform(model, splits.X_val, splits.y_val)
    with torch.no_grad():
        before = summarize(splits.y_test, model(splits.X_test))
        after = summarize(splits.y_test, fixed(splits.X_test))
    return before, after


@pytest.mark.slow
def test_default_surgery_on_long_tailed_mnist_three_seeds():
    results = [run_seed(seed) for seed in range(3)]
    std_before = np.mean([b["class_std"] for b, _ in results])
    std_after = np.mean([a["class_std"] for _, a in results])
    bal_before = np.mean([b["balanced_accuracy"] for b, _ in results])
    bal_after = np.mean([a["balanced_accuracy"] for _, a in results])
    print(f"sigma {std_before:.4f} -> {std_after:.4f} ({1 - std_after / std_before:.1%} down); "
          f"balanced accuracy {bal_before:.4f} -> {bal_after:.4f}")
    assert std_after <= 0.6 * std_before
    assert bal_after >= bal_before + 0.02
