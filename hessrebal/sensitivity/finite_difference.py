"""The paper's estimator: finite differences of per-class accuracy."""

from __future__ import annotations

import numbers

import numpy as np
import torch

from .._data import LabelledData
from .._model import FunctionalModel, predictions_many
from ..metrics import per_class_accuracy
from .base import SensitivityEstimator, check_directions

_SCHEMES = ("central", "forward")


def _check_scheme(scheme: object) -> None:
    if scheme not in _SCHEMES:
        raise ValueError(f"scheme must be one of {_SCHEMES}; got {scheme!r}.")


class FiniteDifferenceSensitivity(SensitivityEstimator):
    """Per-class accuracy differences along each direction (the paper's S).

    ``S[j, i] = (a_j(θ + ε q_i) − a_j(θ − ε q_i)) / 2ε`` (central) or
    ``(a_j(θ + ε q_i) − a_j(θ)) / ε`` (forward). Accuracy is piecewise
    constant, so this is a secant over the probe, not a derivative: the probe
    must be as large as the steps it is used to choose, which is why
    ``step=None`` ties ``ε`` to the current budget (the paper's rule).

    The ``2k`` (or ``k + 1``) perturbed models are evaluated together with
    ``torch.func.vmap``, one batched forward per data chunk.

    Parameters
    ----------
    step : float or None, default=None
        The probe ``ε``; ``None`` uses the current budget ``α_max``.
    scheme : {"central", "forward"}, default="central"

    Examples
    --------
    >>> from hessrebal.sensitivity import FiniteDifferenceSensitivity
    >>> FiniteDifferenceSensitivity(scheme="forward")
    FiniteDifferenceSensitivity(scheme='forward')
    """

    def __init__(self, step: float | None = None, scheme: str = "central") -> None:
        self.step = step
        self.scheme = scheme

    def _check_params(self) -> None:
        """Validate the constructor parameters (the surgeon calls this before
        any heavy work; :meth:`estimate` checks them again)."""
        _check_scheme(self.scheme)
        step = self.step
        if step is not None and (isinstance(step, bool) or not isinstance(step, numbers.Real)
                                 or not np.isfinite(step) or step <= 0):
            raise ValueError(f"step must be a positive number or None; got {step!r}.")

    def estimate(
        self,
        fmodel: FunctionalModel,
        theta: torch.Tensor,
        directions: torch.Tensor,
        data: LabelledData,
        n_classes: int,
        *,
        budget: float,
        batch_size: int,
    ) -> np.ndarray:
        """Secant of per-class accuracy along each direction, ``(C, k)``."""
        _check_scheme(self.scheme)
        eps = budget if self.step is None else self.step
        if not np.isfinite(eps) or eps <= 0:
            raise ValueError(f"step must be positive (got {eps!r}).")
        Q = check_directions(theta, directions)
        k = Q.shape[1]
        plus = theta[None, :] + eps * Q.T
        if self.scheme == "central":
            thetas = torch.cat([plus, theta[None, :] - eps * Q.T])
        else:
            thetas = torch.cat([plus, theta[None, :]])
        preds, y = predictions_many(fmodel, thetas, data, batch_size)
        acc = per_class_accuracy(y, preds, n_classes)  # (m, C)
        if self.scheme == "central":
            S = (acc[:k] - acc[k:]) / (2 * eps)
        else:
            S = (acc[:k] - acc[k]) / eps
        return np.nan_to_num(S.T, nan=0.0)
