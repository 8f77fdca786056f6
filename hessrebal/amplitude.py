"""Amplitude controllers: how the step budget ``alpha_max`` evolves (docs/method.md §6).

Protocol, shared by every controller (and by a user's own class):

``initial(budget, max_steps) -> float``
    Reset the internal state (attributes ending in ``_``) and return the
    starting budget. Validation of the constructor parameters and of the
    arguments happens here.
``update(accepted, signal) -> float``
    Record the outcome of one iteration and return the next budget.
    ``signal`` is the improvement signal computed by the surgeon:
    ``sigma_{t-1} - sigma_t`` after an accepted step and, after a rollback,
    minus the size of what went wrong (never positive: mostly ``-Delta_max``,
    the largest per-class accuracy drop of the rejected candidate; the σ rise
    or total drop when larger and the cause; -1 for non-finite logits, 0 for
    a zero step; docs/method.md lists the cases). :class:`GammaDecay` and
    :class:`GrowShrink` only use ``accepted``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

__all__ = ["AdamSNR", "AmplitudeController", "GammaDecay", "GrowShrink"]


def _real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}.")
    return value


def _open_unit(value, name: str) -> float:
    value = _real(value, name)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie in (0, 1); got {value}.")
    return value


class AmplitudeController(BaseEstimator):
    """Base class of the amplitude controllers (see the module docstring).

    Attributes
    ----------
    budget_ : float
        The current budget.
    initial_budget_ : float
        The budget given to :meth:`initial`.
    max_steps_ : int
        The ``max_steps`` given to :meth:`initial`.
    n_updates_ : int
        Number of :meth:`update` calls since :meth:`initial`.
    """

    def _check_params(self) -> None:
        """Validate the constructor parameters (called by :meth:`initial`)."""

    def _reset(self) -> None:
        """Reset controller-specific state (called by :meth:`initial`)."""

    def _next_budget(self, accepted: bool, signal: float) -> float:
        raise NotImplementedError

    def initial(self, budget: float, max_steps: int) -> float:
        """Reset the state and return the starting budget.

        Parameters
        ----------
        budget : float
            Initial budget ``alpha_max(0) > 0``.
        max_steps : int
            Number of iterations the loop will run (``T >= 1``).

        Returns
        -------
        budget : float
        """
        self._check_params()
        budget = _real(budget, "budget")
        if budget <= 0:
            raise ValueError(f"budget must be > 0; got {budget}.")
        if isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral):
            raise TypeError(f"max_steps must be an int; got {type(max_steps).__name__}.")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1; got {max_steps}.")
        self.initial_budget_ = budget
        self.budget_ = budget
        self.max_steps_ = int(max_steps)
        self.n_updates_ = 0
        self._reset()
        return budget

    def update(self, accepted: bool, signal: float) -> float:
        """Record one iteration's outcome and return the next budget.

        Parameters
        ----------
        accepted : bool
            Whether the candidate step was accepted (False: rolled back).
        signal : float
            The improvement signal (see the module docstring); must be finite.

        Returns
        -------
        budget : float
        """
        if not hasattr(self, "budget_"):
            raise NotFittedError(
                f"{type(self).__name__}.update called before initial(budget, max_steps)."
            )
        if not isinstance(accepted, (bool, np.bool_)) and not (
            isinstance(accepted, numbers.Integral) and accepted in (0, 1)
        ):
            raise TypeError(f"accepted must be a bool; got {accepted!r}.")
        signal = _real(signal, "signal")
        self.n_updates_ += 1
        self.budget_ = float(self._next_budget(bool(accepted), signal))
        return self.budget_


class GammaDecay(AmplitudeController):
    """Multiply the budget by ``gamma`` after each rollback (the paper's rule).

    The budget is unchanged after an accepted step. The paper's CIFAR-10 run
    went 0.020 → 0.014 → 0.0098 → 0.0069 with ``gamma = 0.7``.

    Parameters
    ----------
    gamma : float, default=0.7
        Decay factor in (0, 1).

    Attributes
    ----------
    budget_, initial_budget_, max_steps_, n_updates_
        See :class:`AmplitudeController`.

    Examples
    --------
    >>> c = GammaDecay(gamma=0.7)
    >>> c.initial(0.02, max_steps=10)
    0.02
    >>> round(c.update(False, -0.1), 6), round(c.update(True, 0.01), 6)
    (0.014, 0.014)
    """

    def __init__(self, gamma: float = 0.7):
        self.gamma = gamma

    def _check_params(self) -> None:
        _open_unit(self.gamma, "gamma")

    def _next_budget(self, accepted: bool, signal: float) -> float:
        return self.budget_ if accepted else self.gamma * self.budget_


class GrowShrink(AmplitudeController):
    """Grow the budget after an accepted step, shrink it after a rollback.

    ``budget <- min(grow * budget, max_factor * initial_budget)`` on success,
    ``budget <- shrink * budget`` on rollback (a trust-region style rule).

    Parameters
    ----------
    grow : float, default=1.25
        Factor > 1 applied after an accepted step.
    shrink : float, default=0.5
        Factor in (0, 1) applied after a rollback.
    max_factor : float, default=4.0
        Cap (>= 1) on the budget relative to the initial budget.

    Attributes
    ----------
    budget_, initial_budget_, max_steps_, n_updates_
        See :class:`AmplitudeController`.

    Examples
    --------
    >>> c = GrowShrink(grow=2.0, shrink=0.5, max_factor=3.0)
    >>> c.initial(1.0, max_steps=5)
    1.0
    >>> [c.update(True, 0.0), c.update(True, 0.0), c.update(False, -0.1)]
    [2.0, 3.0, 1.5]
    """

    def __init__(self, grow: float = 1.25, shrink: float = 0.5, max_factor: float = 4.0):
        self.grow = grow
        self.shrink = shrink
        self.max_factor = max_factor

    def _check_params(self) -> None:
        if _real(self.grow, "grow") <= 1.0:
            raise ValueError(f"grow must be > 1; got {self.grow}.")
        _open_unit(self.shrink, "shrink")
        if _real(self.max_factor, "max_factor") < 1.0:
            raise ValueError(f"max_factor must be >= 1; got {self.max_factor}.")

    def _next_budget(self, accepted: bool, signal: float) -> float:
        if accepted:
            return min(self.grow * self.budget_, self.max_factor * self.initial_budget_)
        return self.shrink * self.budget_


class AdamSNR(AmplitudeController):
    """Budget from the signal-to-noise ratio of Adam moments of the improvement.

    With the signal ``g_t`` (``sigma_{t-1} - sigma_t`` on success, minus the
    size of the failure, mostly ``-Delta_max``, on rollback) and
    ``T = max_steps``::

        m_t = beta1 m_{t-1} + (1 - beta1) g_t,   v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
        SNR_t = (m_t / (1 - beta1^t)) / (sqrt(v_t / (1 - beta2^t)) + eps)
        alpha_max(t) = alpha_min + 0.5 (1 + tanh(5 SNR_t)) (alpha_max(0) - alpha_min)

    with ``beta1 = 1 - 4/T``, ``beta2 = 1 - 1/T`` and
    ``alpha_min = min_fraction * alpha_max(0)``. The budget therefore stays in
    ``[alpha_min, alpha_max(0)]``: near the top while improvements are
    consistent, near the bottom after consistent rollbacks.

    Short loops: for ``T <= 4`` the formula gives ``beta1 <= 0``, which is
    clamped to ``beta1 = 0`` (the first moment is then the last signal, and its
    bias correction is 1). ``beta2 = 1 - 1/T`` lies in ``[0, 1)`` for every
    ``T >= 1`` and is used as is (``T = 1``: ``v_t = g_t^2``).

    Parameters
    ----------
    min_fraction : float, default=0.1
        ``alpha_min / alpha_max(0)``, in (0, 1].
    eps : float, default=1e-8
        Added to ``sqrt(v_hat)`` (> 0).

    Attributes
    ----------
    budget_, initial_budget_, max_steps_, n_updates_
        See :class:`AmplitudeController`.
    beta1_, beta2_ : float
        The moment decay rates used.
    min_budget_ : float
        ``alpha_min``.
    m_, v_ : float
        Raw first and second moments.
    snr_ : float
        The last bias-corrected SNR (0 before any update).

    Examples
    --------
    >>> c = AdamSNR(min_fraction=0.1)
    >>> c.initial(1.0, max_steps=20)
    1.0
    >>> round(c.update(False, -0.05), 4)  # a rollback: SNR = -1, budget near alpha_min
    0.1
    """

    def __init__(self, min_fraction: float = 0.1, eps: float = 1e-8):
        self.min_fraction = min_fraction
        self.eps = eps

    def _check_params(self) -> None:
        frac = _real(self.min_fraction, "min_fraction")
        if not 0.0 < frac <= 1.0:
            raise ValueError(f"min_fraction must lie in (0, 1]; got {frac}.")
        if _real(self.eps, "eps") <= 0:
            raise ValueError(f"eps must be > 0; got {self.eps}.")

    def _reset(self) -> None:
        T = self.max_steps_
        self.beta1_ = max(0.0, 1.0 - 4.0 / T)
        self.beta2_ = 1.0 - 1.0 / T
        self.min_budget_ = float(self.min_fraction) * self.initial_budget_
        self.m_ = 0.0
        self.v_ = 0.0
        self.snr_ = 0.0

    def _next_budget(self, accepted: bool, signal: float) -> float:
        t = self.n_updates_
        b1, b2 = self.beta1_, self.beta2_
        self.m_ = b1 * self.m_ + (1.0 - b1) * signal
        self.v_ = b2 * self.v_ + (1.0 - b2) * signal * signal
        m_hat = self.m_ / (1.0 - b1**t)
        v_hat = self.v_ / (1.0 - b2**t)
        self.snr_ = m_hat / (math.sqrt(v_hat) + float(self.eps))
        lo, hi = self.min_budget_, self.initial_budget_
        return lo + 0.5 * (1.0 + math.tanh(5.0 * self.snr_)) * (hi - lo)
