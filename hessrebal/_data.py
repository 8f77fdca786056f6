"""The one way hessrebal reads labelled data: in chunks, from tensors, arrays,
mappings of named input tensors, Datasets or DataLoaders.

Everything that touches data (Hessian products, accuracies, sensitivities)
goes through :func:`as_data`, so validation and chunking live here only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

DEFAULT_BATCH_SIZE = 512

#: What a model is called with: one tensor (``model(x)``), or named tensors
#: sharing their first (sample) dimension (``model(**x)``, e.g. a tokenizer's
#: ``input_ids`` and ``attention_mask``).
Inputs = torch.Tensor | dict[str, torch.Tensor]

#: The key of a mapping batch that holds the labels (Hugging Face's convention).
LABELS_KEY = "labels"


def _refuse_strings(a: np.ndarray, name: str) -> None:
    # torch's own message ("can't convert np.ndarray of type numpy.str_")
    # names neither the argument nor the fix.
    if a.dtype.kind in "USO" and a.size and isinstance(a.flat[0], (str, bytes)):
        first = a.flat[0]
        raise ValueError(
            f"{name} holds strings (e.g. {first!r}); hessrebal needs integer class indices "
            f"0..C-1 in the order of the model's outputs. Encode them, e.g. with "
            f"sklearn.preprocessing.LabelEncoder fitted on the training labels.")


def _to_tensor(a: Any, name: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    if isinstance(a, np.ndarray):
        _refuse_strings(a, name)
        if a.dtype == object:
            raise TypeError(f"{name} has dtype object; pass a numeric array or tensor.")
        return torch.from_numpy(np.ascontiguousarray(a))
    if isinstance(a, (list, tuple)):
        try:
            arr = np.asarray(a)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} could not be converted to a tensor: {exc}") from exc
        _refuse_strings(arr, name)
        try:
            return torch.as_tensor(arr)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} could not be converted to a tensor: {exc}") from exc
    raise TypeError(
        f"{name} must be a torch.Tensor, a numpy array, a mapping of named tensors, "
        f"a Dataset or a DataLoader; got {type(a).__name__}."
    )


def _to_inputs(a: Any, name: str) -> Inputs:
    """``a`` as a tensor, or a mapping as a dict of tensors with one sample count."""
    if not isinstance(a, Mapping):
        return _to_tensor(a, name)
    if not a:
        raise ValueError(f"{name} is an empty mapping; it needs at least one input tensor.")
    out: dict[str, torch.Tensor] = {}
    for key, value in a.items():
        if not isinstance(key, str):
            # The model is called as model(**X): keys must be argument names.
            raise TypeError(f"{name} has key {key!r}; the keys of a mapping input must be "
                            "the model's argument names (strings).")
        t = _to_tensor(value, f"{name}[{key!r}]")
        if t.ndim == 0:
            raise ValueError(f"{name}[{key!r}] must have a sample dimension; got a scalar.")
        out[key] = t
    rows = {k: int(t.shape[0]) for k, t in out.items()}
    if len(set(rows.values())) > 1:
        raise ValueError(f"The tensors of {name} have different numbers of samples: {rows}.")
    return out


def as_inputs(a: Any, name: str = "X") -> Inputs:
    """``a`` (a tensor, an array, or a mapping of them) as model inputs."""
    return _to_inputs(a, name)


def n_rows(x: Inputs) -> int:
    """The number of samples in ``x``."""
    if isinstance(x, Mapping):
        return int(next(iter(x.values())).shape[0])
    return int(x.shape[0])


def take_rows(x: Inputs, index: slice | torch.Tensor) -> Inputs:
    """The samples of ``x`` at ``index`` (a slice or an index tensor)."""
    if isinstance(x, Mapping):
        return {k: t[index] for k, t in x.items()}
    return x[index]


def describe(x: Inputs) -> str:
    """``x``'s shape and dtype for messages, per key for a mapping."""
    if isinstance(x, Mapping):
        parts = ", ".join(f"{k!r}: {tuple(t.shape)} {t.dtype}" for k, t in x.items())
        return f"{{{parts}}}"
    return f"of shape {tuple(x.shape)} (dtype {x.dtype})"


def check_labels(y: torch.Tensor, name: str = "y") -> torch.Tensor:
    """Return ``y`` as a 1-D int64 tensor, refusing fractional or negative labels."""
    if y.ndim != 1:
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        else:
            raise ValueError(f"{name} must be 1-D class indices; got shape {tuple(y.shape)}.")
    if y.is_floating_point():
        if not torch.isfinite(y).all():
            raise ValueError(f"{name} contains NaN or infinite labels.")
        if (y != torch.round(y)).any():
            raise ValueError(f"{name} contains fractional labels; class indices must be integers.")
    elif y.dtype == torch.bool or y.is_complex():
        raise TypeError(f"{name} must hold integer class indices; got dtype {y.dtype}.")
    y = y.to(torch.int64)
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"{name} contains negative label {int(y.min())}.")
    return y


def check_inputs(x: Inputs, name: str = "X") -> None:
    if isinstance(x, Mapping):
        for key, t in x.items():
            check_inputs(t, f"{name}[{key!r}]")
        return
    if x.is_floating_point() or x.is_complex():
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or infinite values.")


def check_label_range(y: torch.Tensor, n_outputs: int, name: str = "y") -> None:
    if y.numel() and int(y.max()) >= n_outputs:
        raise ValueError(
            f"{name} contains label {int(y.max())} but the model has {n_outputs} outputs "
            f"(valid labels are 0..{n_outputs - 1})."
        )


class LabelledData:
    """Labelled samples read chunk by chunk.

    In-memory data (tensors, arrays) are validated once here; a Dataset or
    DataLoader is validated chunk by chunk as it is read, so it never has to
    fit in memory.
    """

    def __init__(
        self,
        X: Inputs | None = None,
        y: torch.Tensor | None = None,
        loader: DataLoader | None = None,
        dataset: Dataset | None = None,
        name: str = "X",
        y_name: str = "y",
    ) -> None:
        self.X = X
        self.y = y
        self.loader = loader
        self.dataset = dataset
        # The caller's argument names, for messages about these data.
        self.name = name
        self.y_name = y_name
        self._n_samples: int | None = None if X is None else n_rows(X)
        self._labels: torch.Tensor | None = y

    @property
    def in_memory(self) -> bool:
        return self.X is not None

    @property
    def n_samples(self) -> int:
        if self._n_samples is None:
            source = self.loader.dataset if self.loader is not None else self.dataset
            try:
                self._n_samples = len(source)  # type: ignore[arg-type]
            except TypeError:
                self._n_samples = int(self.labels().shape[0])
        return self._n_samples

    def labels(self) -> torch.Tensor:
        """All labels as an int64 CPU tensor (reads a loader once, then caches)."""
        if self._labels is None:
            ys = [y.cpu() for _, y in self.chunks(DEFAULT_BATCH_SIZE)]
            self._labels = torch.cat(ys) if ys else torch.empty(0, dtype=torch.int64)
        return self._labels.cpu()

    def chunks(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Iterator[tuple[Inputs, torch.Tensor]]:
        """Yield ``(x, y)`` chunks on ``device``; floating inputs cast to ``dtype``.

        ``x`` is a tensor, or a dict of tensors (each chunked along its first
        dimension) when the inputs are a mapping.
        """
        if self.in_memory:
            n = n_rows(self.X)
            for start in range(0, n, batch_size):
                x = take_rows(self.X, slice(start, start + batch_size))
                y = self.y[start : start + batch_size]
                yield move_inputs(x, device, dtype), y.to(device, non_blocking=True)
            return
        loader = self.loader
        if loader is None:
            loader = DataLoader(self.dataset, batch_size=batch_size, shuffle=False)
        for batch in loader:
            x, y = _split_batch(batch, self.name)
            x = _to_inputs(x, self.name)
            y = check_labels(_to_tensor(y, "y"))
            check_inputs(x, self.name)
            yield move_inputs(x, device, dtype), y.to(device, non_blocking=True)

    def subset(self, indices: np.ndarray | torch.Tensor) -> LabelledData:
        """The samples at ``indices`` (stratified splits of the validation data)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        if self.in_memory:
            return LabelledData(take_rows(self.X, idx), self.y[idx], name=self.name,
                                y_name=self.y_name)
        source = self.loader.dataset if self.loader is not None else self.dataset
        return LabelledData(dataset=Subset(source, idx.tolist()), name=self.name,
                            y_name=self.y_name)


def move_inputs(x: Inputs, device: torch.device | str | None,
                dtype: torch.dtype | None) -> Inputs:
    """``x`` on ``device``, its floating tensors cast to ``dtype`` (integer
    inputs such as token ids and masks keep their dtype)."""
    if isinstance(x, Mapping):
        return {k: _move(t, device, dtype) for k, t in x.items()}
    return _move(x, device, dtype)


def _move(x: torch.Tensor, device, dtype) -> torch.Tensor:
    if dtype is not None and x.is_floating_point() and x.dtype != dtype:
        return x.to(device=device, dtype=dtype, non_blocking=True)
    return x.to(device, non_blocking=True)


def _split_batch(batch: Any, name: str) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        for kx, ky in (("x", "y"), ("X", "y"), ("input", "target"), ("image", "label")):
            if kx in batch and ky in batch:
                return batch[kx], batch[ky]
        if LABELS_KEY in batch:
            # A tokenised batch: every other entry is an input of the model.
            return _without_labels(batch), batch[LABELS_KEY]
    raise TypeError(
        f"Each batch of {name} must be an (inputs, labels) pair or a mapping with a "
        f"{LABELS_KEY!r} key; got {type(batch).__name__}."
    )


def _without_labels(batch: Mapping) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k != LABELS_KEY}


def as_data(X: Any, y: Any = None, *, name: str = "X", y_name: str = "y") -> LabelledData:
    """Validate ``(X, y)`` and wrap them for chunked reading.

    ``X`` may be a tensor or array (then ``y`` holds the labels), a mapping
    of named input tensors or arrays (a dict, a Hugging Face ``BatchEncoding``;
    the model is called as ``model(**X)``; ``y`` may then be None if ``X``
    has a ``"labels"`` entry), a ``(X, y)`` tuple passed as ``X`` with
    ``y=None``, a ``Dataset`` or a ``DataLoader`` yielding ``(inputs, labels)``
    or mappings with a ``"labels"`` key (then ``y`` must be None).
    """
    if isinstance(X, LabelledData):
        return X
    if X is None:
        raise ValueError(f"{name} must not be None.")
    if isinstance(X, (DataLoader, Dataset)):
        if y is not None:
            raise ValueError(
                f"{y_name} must be None when {name} is a {type(X).__name__}: "
                "its batches carry the labels."
            )
        if isinstance(X, DataLoader):
            return LabelledData(loader=X, name=name, y_name=y_name)
        return LabelledData(dataset=X, name=name, y_name=y_name)
    if y is None and isinstance(X, tuple) and len(X) == 2:
        X, y = X
    if y is None and isinstance(X, Mapping) and LABELS_KEY in X:
        X, y = _without_labels(X), X[LABELS_KEY]
    if y is None:
        raise ValueError(f"{y_name} is required when {name} is a tensor, an array or a "
                         f"mapping without a {LABELS_KEY!r} entry.")
    Xt = _to_inputs(X, name)
    yt = check_labels(_to_tensor(y, y_name), y_name)
    if isinstance(Xt, torch.Tensor) and Xt.ndim == 0:
        raise ValueError(f"{name} must have a sample dimension; got a scalar.")
    n = n_rows(Xt)
    if n == 0:
        raise ValueError(f"{name} is empty (0 samples).")
    if n != yt.shape[0]:
        raise ValueError(
            f"{name} and {y_name} have different numbers of samples: "
            f"{n} and {yt.shape[0]}."
        )
    check_inputs(Xt, name)
    return LabelledData(Xt, yt, name=name, y_name=y_name)


def stratified_holdout(labels: np.ndarray, fraction: float,
                       random_state: Any) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(kept, held)``: ``fraction`` of each class held out (at least
    one, at most all but one; a class with one sample is kept whole, being
    more use to the fit). ``random_state``: a seed or ``np.random.Generator``;
    classes are drawn in sorted order, so a seed gives one split everywhere."""
    rng = np.random.default_rng(random_state)
    held = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if idx.size < 2:
            continue
        n_held = min(idx.size - 1, max(1, round(fraction * idx.size)))
        held.append(rng.permutation(idx)[:n_held])
    mask = np.zeros(labels.size, dtype=bool)
    if held:
        mask[np.concatenate(held)] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)
