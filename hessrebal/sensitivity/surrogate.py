"""Exact directional derivatives of a smooth per-class surrogate of accuracy."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch.func import jvp, vjp, vmap

from .._data import LabelledData
from .._model import FunctionalModel, missing_derivative_error
from .._process_state import PROCESS_STATE_LOCK
from .base import SensitivityEstimator, check_directions

_KINDS = ("probability", "log_probability", "margin")


def per_sample_surrogate(logits: torch.Tensor, y: torch.Tensor, kind: str,
                         temperature: float) -> torch.Tensor:
    """The smooth stand-in for "sample is classified correctly"."""
    z = logits / temperature
    if kind == "probability":
        return torch.softmax(z, dim=1).gather(1, y[:, None])[:, 0]
    if kind == "log_probability":
        return torch.log_softmax(z, dim=1).gather(1, y[:, None])[:, 0]
    true = z.gather(1, y[:, None])[:, 0]
    others = z.scatter(1, y[:, None], float("-inf"))
    return torch.sigmoid(true - others.max(dim=1).values)


class SoftmaxSurrogateSensitivity(SensitivityEstimator):
    """Sensitivity of a differentiable per-class surrogate, computed exactly.

    Per-class accuracy is piecewise constant in θ, so its derivative is zero
    almost everywhere (the referee's objection). This estimator replaces it
    with the class mean of a smooth per-sample score ``s_j(θ)`` and returns the
    exact ``S = J_s Q`` by forward-mode JVPs (one per direction) or reverse-mode
    VJPs (one per class), whichever is fewer, chunk by chunk.

    Parameters
    ----------
    kind : {"probability", "log_probability", "margin"}, default="probability"
        ``probability``: softmax probability of the true class;
        ``log_probability``: its log (the negative per-class loss);
        ``margin``: sigmoid of the true-class logit minus the best other logit.
    temperature : float, default=1.0
        Logits are divided by it; larger values smooth further.

    Examples
    --------
    >>> from hessrebal.sensitivity import SoftmaxSurrogateSensitivity
    >>> SoftmaxSurrogateSensitivity(kind="margin", temperature=2.0)
    SoftmaxSurrogateSensitivity(kind='margin', temperature=2.0)
    """

    def __init__(self, kind: str = "probability", temperature: float = 1.0) -> None:
        self.kind = kind
        self.temperature = temperature

    def _validate(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}; got {self.kind!r}.")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"temperature must be positive; got {self.temperature!r}.")

    def class_scores(self, fmodel: FunctionalModel, theta: torch.Tensor, data: LabelledData,
                     n_classes: int, batch_size: int) -> np.ndarray:
        """The surrogate ``s_j(θ)`` for every class (NaN for an absent class)."""
        self._validate()
        sums = torch.zeros(n_classes, dtype=torch.float64)
        counts = torch.zeros(n_classes, dtype=torch.float64)
        with torch.no_grad():
            for x, y in data.chunks(batch_size, fmodel.device, fmodel.dtype):
                s = per_sample_surrogate(fmodel.logits(theta, x), y, self.kind, self.temperature)
                sums.index_add_(0, y.cpu(), s.cpu().to(torch.float64))
                counts.index_add_(0, y.cpu(), torch.ones(len(y), dtype=torch.float64))
        out = (sums / counts).numpy()
        out[counts.numpy() == 0] = np.nan
        return out

    def estimate(
        self,
        fmodel: FunctionalModel,
        theta: torch.Tensor,
        directions: torch.Tensor,
        data: LabelledData,
        n_classes: int,
        *,
        budget: float | None = None,
        batch_size: int,
    ) -> np.ndarray:
        """Exact derivatives of the class-mean surrogate along each direction, ``(C, k)``."""
        self._validate()
        Q = check_directions(theta, directions)
        k = Q.shape[1]
        counts = torch.bincount(data.labels(), minlength=n_classes)[:n_classes]
        counts = counts.to(device=theta.device, dtype=theta.dtype)
        S = torch.zeros(n_classes, k, dtype=theta.dtype, device=theta.device)
        for x, y in data.chunks(batch_size, fmodel.device, fmodel.dtype):

            def class_sums(th: torch.Tensor, x=x, y=y) -> torch.Tensor:
                s = per_sample_surrogate(fmodel.logits(th, x), y, self.kind, self.temperature)
                return torch.zeros(n_classes, dtype=s.dtype, device=s.device).index_add(0, y, s)

            try:
                S += self._chunk_products(class_sums, theta, Q, n_classes)
            except RuntimeError as exc:
                # A layer without the derivative taken here: name it.
                mode = "forward-mode" if k <= n_classes else "reverse-mode"
                error = missing_derivative_error(fmodel, theta, x, exc,
                                                 f"the sensitivities' {mode} products")
                if error is None:
                    raise
                raise error from exc
        S = S / counts.clamp_min(1)[:, None]
        S[counts == 0] = 0.0
        return S.detach().cpu().numpy().astype(np.float64)

    @staticmethod
    def _chunk_products(class_sums, theta: torch.Tensor, Q: torch.Tensor,
                        n_classes: int) -> torch.Tensor:
        """``J_s Q`` (C, k) of one chunk's class sums."""
        if Q.shape[1] <= n_classes:
            # k forward-mode products, vectorised over the tangents.
            def push(t: torch.Tensor) -> torch.Tensor:
                return jvp(class_sums, (theta,), (t,))[1]

            return _vectorised(push, Q.T).T
        _, pull = vjp(class_sums, theta)
        eye = torch.eye(n_classes, dtype=theta.dtype, device=theta.device)
        J = _vectorised(lambda e: pull(e)[0], eye)  # (C, D)
        return J @ Q


def _vectorised(fn, rows: torch.Tensor) -> torch.Tensor:
    """``stack([fn(r) for r in rows])`` in one vmapped call when the model allows it."""
    with PROCESS_STATE_LOCK, warnings.catch_warnings():
        # torch's forward-AD decompositions call the deprecated torch.jit.script
        # when first loaded; that warning is torch's, not the user's concern.
        warnings.filterwarnings("ignore", message=".*torch.jit.script", category=FutureWarning)
        try:
            return vmap(fn)(rows)
        except (RuntimeError, NotImplementedError):
            return torch.stack([fn(r) for r in rows])
