"""The main job: a long-tailed MNIST model, its surgery, and the comparison."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .baselines import LogitAdjustment
from .datasets import load_long_tailed
from .metrics import summarize
from .models import MLP, train_model
from .surgeon import SpectralSurgeon


@dataclass
class DemoResult:
    """Everything the demo measured, on the held-out balanced test split."""

    before: dict[str, Any]
    after: dict[str, Any]
    logit_adjustment: dict[str, Any]
    class_counts: np.ndarray
    classes: list[str]
    surgeon: SpectralSurgeon
    settings: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    splits: Any = None


def _test_metrics(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    with torch.no_grad():
        logits = model.eval()(X)
    return summarize(y, logits)


def run_demo(
    dataset: str = "mnist-lt",
    imbalance_ratio: float = 100.0,
    random_state: int = 0,
    epochs: int = 20,
    progress: bool = False,
    surgeon: SpectralSurgeon | None = None,
) -> DemoResult:
    """Train an MLP on a long-tailed split, run the surgery with defaults,
    and measure both (and post-hoc logit adjustment) on the test split."""
    torch.manual_seed(random_state)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    splits = load_long_tailed(dataset, imbalance_ratio=imbalance_ratio, random_state=random_state)
    in_features = int(np.prod(splits.input_shape))
    model = MLP(in_features=in_features, hidden=(128, 64), n_classes=splits.n_classes)
    train_model(model, splits.X_train, splits.y_train, epochs=epochs, weight_decay=1e-4,
                random_state=random_state, progress=progress)
    timings["train"] = time.perf_counter() - t0

    surgeon = surgeon if surgeon is not None else SpectralSurgeon(
        random_state=random_state, progress=progress)
    t0 = time.perf_counter()
    fixed = surgeon.fit_transform(model, splits.X_val, splits.y_val)
    timings["surgery"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    prior = splits.class_counts / splits.class_counts.sum()
    adjusted = LogitAdjustment(class_prior=prior).fit_transform(model, splits.X_val, splits.y_val)
    timings["logit_adjustment"] = time.perf_counter() - t0

    return DemoResult(
        before=_test_metrics(model, splits.X_test, splits.y_test),
        after=_test_metrics(fixed, splits.X_test, splits.y_test),
        logit_adjustment=_test_metrics(adjusted, splits.X_test, splits.y_test),
        class_counts=np.asarray(splits.class_counts),
        classes=list(splits.classes),
        surgeon=surgeon,
        settings={"dataset": dataset, "imbalance_ratio": imbalance_ratio,
                  "random_state": random_state, "epochs": epochs, "model": "MLP(784-128-64-10)",
                  "surgeon": {k: repr(v) for k, v in surgeon.get_params(deep=False).items()}},
        timings=timings,
        models={"baseline": model, "spectral_surgery": fixed, "logit_adjustment": adjusted},
        splits=splits,
    )


def format_table(result: DemoResult) -> str:
    """The before/after per-class table, classes ordered by training count."""
    order = np.argsort(-result.class_counts, kind="stable")
    b, a, la = (result.before["per_class_accuracy"], result.after["per_class_accuracy"],
                result.logit_adjustment["per_class_accuracy"])
    lines = [f"{'class':>7} {'n_train':>8} {'before':>8} {'surgery':>8} {'logit adj':>10}"]
    for c in order:
        lines.append(f"{result.classes[c]:>7} {int(result.class_counts[c]):>8} "
                     f"{b[c]:>8.3f} {a[c]:>8.3f} {la[c]:>10.3f}")
    lines.append("-" * 45)
    for key, label in (("balanced_accuracy", "balanced accuracy"), ("class_std", "class std (σ)"),
                       ("worst_class_accuracy", "worst class"), ("accuracy", "accuracy")):
        lines.append(f"{label:>17} {result.before[key]:>8.3f} {result.after[key]:>8.3f} "
                     f"{result.logit_adjustment[key]:>10.3f}")
    return "\n".join(lines)
