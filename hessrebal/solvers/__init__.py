"""Coefficient solvers: choose the step along the spike eigenvectors.

See :class:`CoefficientProblem` for the problem and :class:`CoefficientSolver`
for the protocol (``solve(problem) -> ndarray (k,)``).
"""

from .base import CoefficientProblem, CoefficientSolver, SolverWarning
from .projected_gradient import ProjectedGradientSolver
from .qp import CvxpyQPSolver

__all__ = [
    "CoefficientProblem",
    "CoefficientSolver",
    "CvxpyQPSolver",
    "ProjectedGradientSolver",
    "SolverWarning",
]
