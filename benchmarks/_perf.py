"""Helpers shared by the ``perf_*.py`` scripts: thread setup, timing on a noisy
machine, the trained long-tailed MNIST MLP, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch


def setup(threads: int) -> dict[str, Any]:
    """Fix the thread count (ratios are only stable with a fixed one) and
    describe the machine for the JSON output."""
    torch.set_num_threads(threads)
    # Import the provenance helper now: the tree may change while the script runs.
    import _common  # noqa: F401

    import hessrebal.bench  # noqa: F401

    return {
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Time every function once per round, in turn, so that the machine's load
    (shared with other jobs) hits all of them alike; returns all the times."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return times


def ratio(times: dict[str, list[float]], num: str, den: str) -> dict[str, float]:
    """``num/den`` from the fastest runs (the least disturbed) and the median of
    the per-round ratios."""
    per_round = [a / b for a, b in zip(times[num], times[den])]
    return {"best": min(times[num]) / min(times[den]), "median": statistics.median(per_round)}


def trained_lt_mnist_mlp(random_state: int = 0, epochs: int = 20):
    """The demo's model: MLP 784-128-64-10 trained on long-tailed MNIST (ratio 100)."""
    from hessrebal.datasets import load_long_tailed
    from hessrebal.models import MLP, train_model

    splits = load_long_tailed("mnist-lt", imbalance_ratio=100, random_state=random_state)
    torch.manual_seed(random_state)
    model = MLP(784, (128, 64), splits.n_classes)
    train_model(model, splits.X_train, splits.y_train, epochs=epochs, weight_decay=1e-4,
                random_state=random_state)
    return model.eval(), splits


def emit(result: dict[str, Any], path: str | None = None) -> None:
    """Print ``result`` as JSON and write it to ``path``, with the run's
    provenance (commit, date, versions, threads, CPU, load average at the end;
    ``_common.provenance``) under ``"provenance"``."""
    from _common import provenance

    result = {**result, "provenance": provenance()}
    text = json.dumps(result, indent=2, default=_jsonable)
    print(text)
    if path:
        with open(path, "w") as fh:
            fh.write(text + "\n")
    sys.stdout.flush()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)
