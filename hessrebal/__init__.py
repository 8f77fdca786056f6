"""hessrebal: post-hoc per-class rebalancing along Hessian spike eigenvectors."""

from .curvature import HessianOperator
from .parameters import ParameterSpace
from .surgeon import SpectralSurgeon

__version__ = "0.1.0"

__all__ = ["HessianOperator", "ParameterSpace", "SpectralSurgeon", "__version__"]
