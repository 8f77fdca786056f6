"""Top eigenpairs and spectral density of symmetric operators (Hessians).

Backends share one protocol, ``compute(operator, n_components, init=None) ->
Spectrum``: :class:`LanczosSpectrum` (the default: thick-restart Lanczos,
warm starts, deflated phases), :class:`PowerIterationSpectrum` (PyHessian's
method, the reference) and :class:`DenseSpectrum` (the exact oracle for small
operators).
"""

from .base import (
    ConvergenceWarning,
    DeflatedOperator,
    MatrixOperator,
    Spectrum,
    SpectrumBackend,
)
from .dense import DenseSpectrum
from .density import count_spikes, slq_density, slq_quadrature
from .lanczos import LanczosSpectrum
from .power import PowerIterationSpectrum

__all__ = [
    "ConvergenceWarning",
    "DeflatedOperator",
    "DenseSpectrum",
    "LanczosSpectrum",
    "MatrixOperator",
    "PowerIterationSpectrum",
    "Spectrum",
    "SpectrumBackend",
    "count_spikes",
    "slq_density",
    "slq_quadrature",
]
