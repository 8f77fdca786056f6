"""hessrebal: post-hoc per-class rebalancing along Hessian spike eigenvectors."""

from .curvature import HessianOperator
from .parameters import ParameterSpace

__version__ = "0.1.0"

__all__ = ["HessianOperator", "ParameterSpace", "__version__"]
