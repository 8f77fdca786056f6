"""Spike–class sensitivity estimators: ``estimate(...) -> ndarray (C, k)``."""

from .base import SensitivityEstimator
from .finite_difference import FiniteDifferenceSensitivity
from .surrogate import SoftmaxSurrogateSensitivity

__all__ = ["FiniteDifferenceSensitivity", "SensitivityEstimator", "SoftmaxSurrogateSensitivity"]
