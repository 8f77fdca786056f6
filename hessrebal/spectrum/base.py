"""The spectrum protocol: a ``Spectrum`` result, the backend base class, and
the operator helpers every backend shares (validation, matvec counting,
seeded random vectors, deflation).

An *operator* is anything with ``shape`` ``(D, D)``, ``dtype``, ``device`` and
``matvec(v: Tensor) -> Tensor`` applying a symmetric matrix to a vector of
shape ``(D,)``: a :class:`hessrebal.curvature.HessianOperator`, a
:class:`DeflatedOperator`, a :class:`MatrixOperator`, or a user's own class.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state

from .._validation import check_positive  # noqa: F401  (re-exported: backends import it from here)

__all__ = [
    "ConvergenceWarning",
    "DeflatedOperator",
    "LinearOperatorLike",
    "MatrixOperator",
    "Spectrum",
    "SpectrumBackend",
]


@runtime_checkable
class LinearOperatorLike(Protocol):
    """What a spectrum backend needs from an operator."""

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Spectrum:
    """Top eigenpairs of a symmetric operator.

    Attributes
    ----------
    eigenvalues : torch.Tensor of shape (k,)
        Largest (algebraic) eigenvalues, descending, on the operator's device
        and in its dtype.
    eigenvectors : torch.Tensor of shape (D, k)
        Orthonormal eigenvectors, column ``i`` for ``eigenvalues[i]``.
    n_matvec : int
        Operator products the backend made to compute them.
    residuals : ndarray of shape (k,)
        ``‖H v_i − λ_i v_i‖ / |λ_1|`` per pair.
    converged : ndarray of bool, shape (k,)
        Whether each pair met the backend's residual tolerance.
    info : dict
        Backend-specific details (restarts, phases, iterations per pair);
        ``info["scale"]`` is the ``|λ₁|`` (largest magnitude seen) that the
        residuals are relative to.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    n_matvec: int
    residuals: np.ndarray
    converged: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.eigenvalues.shape[0])

    @property
    def all_converged(self) -> bool:
        return bool(np.all(self.converged))


class SpectrumBackend(BaseEstimator):
    """Base class of the spectrum backends.

    Subclasses implement ``compute(operator, n_components, init=None) ->
    Spectrum``; ``__init__`` only stores configuration, so backends nest in
    other estimators (``get_params``/``clone``).
    """

    def compute(
        self,
        operator: LinearOperatorLike,
        n_components: int,
        init: torch.Tensor | None = None,
    ) -> Spectrum:  # pragma: no cover - abstract
        raise NotImplementedError


# -- shared helpers ----------------------------------------------------------


def check_operator(operator: Any, name: str = "operator") -> tuple[int, torch.dtype, torch.device]:
    """Validate the operator protocol; return ``(D, dtype, device)``."""
    if not callable(getattr(operator, "matvec", None)):
        raise TypeError(
            f"{name} must have a matvec(v) method (and shape, dtype, device); "
            f"got {type(operator).__name__}."
        )
    shape = getattr(operator, "shape", None)
    try:
        n, m = (int(s) for s in shape)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise TypeError(f"{name}.shape must be a pair (D, D); got {shape!r}.") from None
    if n != m or n < 1:
        raise ValueError(f"{name} must be square and non-empty; got shape {(n, m)}.")
    dtype = getattr(operator, "dtype", None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{name}.dtype must be a floating torch.dtype; got {dtype!r}.")
    device = torch.device(getattr(operator, "device", "cpu"))
    return n, dtype, device


def check_n_components(n_components: Any, dim: int) -> int:
    if isinstance(n_components, bool) or not isinstance(n_components, (int, np.integer)):
        raise TypeError(f"n_components must be an int; got {type(n_components).__name__}.")
    k = int(n_components)
    if not 1 <= k <= dim:
        raise ValueError(f"n_components must be in [1, {dim}] (the operator's dimension); "
                         f"got {k}.")
    return k


def check_init(init: Any, dim: int, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor | None:
    """``init`` as a (D, m) tensor on the operator's device, or None."""
    if init is None:
        return None
    if not isinstance(init, torch.Tensor):
        init = torch.as_tensor(np.asarray(init))
    if init.ndim == 1:
        init = init[:, None]
    if init.ndim != 2 or init.shape[0] != dim:
        raise ValueError(f"init must have shape ({dim}, m); got {tuple(init.shape)}.")
    init = init.detach().to(device=device, dtype=dtype)
    if not torch.isfinite(init).all():
        raise ValueError("init contains NaN or infinite values.")
    return init


class CountingMatvec:
    """Calls ``operator.matvec`` and counts the products (one per column); itself
    an operator, so it can be wrapped (e.g. deflated)."""

    def __init__(self, operator: Any, dim: int, dtype: torch.dtype, device: torch.device):
        self.operator = operator
        self.dim = dim
        self.dtype = dtype
        self.device = device
        self.count = 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        out = self.operator.matvec(v)
        if not isinstance(out, torch.Tensor) or out.shape != v.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"operator.matvec returned {got} for an input of shape "
                             f"{tuple(v.shape)}.")
        self.count += 1 if v.ndim == 1 else int(v.shape[1])
        return out.to(dtype=self.dtype, device=self.device)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self(v)


def check_compute_args(operator: Any,
                       n_components: Any) -> tuple[int, int, torch.dtype, torch.device]:
    """Validate a backend's ``compute(operator, n_components)``; return
    ``(D, k, dtype, device)``."""
    dim, dtype, device = check_operator(operator)
    return dim, check_n_components(n_components, dim), dtype, device


def counted_operator(operator: Any, init: Any, dim: int, dtype: torch.dtype,
                     device: torch.device) -> tuple[torch.Tensor | None, CountingMatvec]:
    """``init`` checked against the operator (see :func:`check_init`), and the
    operator wrapped in a :class:`CountingMatvec`."""
    return check_init(init, dim, dtype, device), CountingMatvec(operator, dim, dtype, device)


def torch_generator(random_state: Any, operator: Any = None) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from a sklearn-style ``random_state``
    (vectors are drawn on the CPU, then moved, so a seed gives the same start
    on every device).

    When ``operator`` has a ``process_group`` (a distributed
    ``HessianOperator``) and ``random_state`` is None, the seed drawn on rank 0
    is broadcast, so that every rank starts from the same vectors and gets the
    same result."""
    if isinstance(random_state, torch.Generator):
        return random_state
    rng = check_random_state(random_state)
    seed = int(rng.randint(0, 2**31 - 1))
    group = getattr(operator, "process_group", None)
    if group is not None and random_state is None:
        seed = broadcast_seed(seed, group, getattr(operator, "device", torch.device("cpu")))
    return torch.Generator().manual_seed(seed)


def broadcast_seed(seed: int, group: Any, device: torch.device) -> int:
    """Rank 0's ``seed`` on every rank of ``group`` (``device``: where the
    backend communicates, the GPU for NCCL)."""
    import torch.distributed as dist

    from .._distributed import broadcast

    t = torch.tensor([seed], dtype=torch.int64, device=device)
    broadcast(t, dist.get_global_rank(group, 0), group)  # watched inside a fit
    return int(t.item())


def random_vector(gen: torch.Generator, dim: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    return torch.randn(dim, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def orthogonalize(v: torch.Tensor, Q: torch.Tensor | None) -> torch.Tensor:
    """``v`` minus its projection on the orthonormal columns of ``Q``
    (two Gram–Schmidt passes: one pass loses orthogonality in float32)."""
    if Q is None or Q.shape[1] == 0:
        return v
    for _ in range(2):
        v = v - Q @ (Q.T @ v)
    return v


def relative(res: np.ndarray, scale: float) -> np.ndarray:
    scale = float(scale)
    if scale <= 0.0 or not np.isfinite(scale):
        return np.where(res == 0, 0.0, np.inf)
    return res / scale


# Per thread, so that parallel fits (SpectralSurgeonSearch(n_jobs>1)) neither
# share notes nor need the process-wide warnings machinery.
_COLLECTING = threading.local()


@contextlib.contextmanager
def collect_convergence_notes() -> Iterator[list[dict[str, Any]]]:
    """Within the block, :func:`warn_not_converged` records a note (a dict)
    in the yielded list instead of warning; :func:`convergence_summary` turns
    the notes into one message. The surgeon uses it to warn once per fit,
    not at every spectrum refresh."""
    notes: list[dict[str, Any]] = []
    previous = getattr(_COLLECTING, "notes", None)
    _COLLECTING.notes = notes
    try:
        yield notes
    finally:
        _COLLECTING.notes = previous


def convergence_summary(notes: list[dict[str, Any]], n_calls: int) -> str | None:
    """One message for the notes of ``n_calls`` spectrum computations (None if none)."""
    if not notes:
        return None
    first = notes[0]
    worst = max(n["max_residual"] for n in notes)
    most = max(n["n_bad"] for n in notes)
    return (f"{first['backend']}: eigenpairs did not converge in {len(notes)} of {n_calls} "
            f"spectrum computations of this fit (up to {most} of {first['n_pairs']} pairs; "
            f"relative residuals up to {worst:.2e} > tol={first['tol']:g}). {first['hint']}")


def warn_not_converged(backend: str, converged: np.ndarray, residuals: np.ndarray,
                       tol: float, hint: str) -> None:
    if np.all(converged):
        return
    bad = np.flatnonzero(~converged)
    notes = getattr(_COLLECTING, "notes", None)
    if notes is not None:
        notes.append({"backend": backend, "n_bad": int(bad.size), "n_pairs": int(converged.size),
                      "max_residual": float(np.max(residuals[bad])), "tol": float(tol),
                      "hint": hint})
        return
    warnings.warn(
        f"{backend}: {bad.size} of {converged.size} eigenpairs did not converge "
        f"(relative residuals up to {float(np.max(residuals[bad])):.2e} > tol={tol:g}; "
        f"pairs {bad.tolist()}). {hint}",
        ConvergenceWarning,
        stacklevel=3,
    )


# -- operators ---------------------------------------------------------------


class MatrixOperator:
    """A dense symmetric matrix seen through the operator protocol.

    Parameters
    ----------
    matrix : torch.Tensor or ndarray of shape (D, D)
        Symmetric; used as given (its device and floating dtype).

    Attributes
    ----------
    n_matvec : int
        Products computed so far.

    Examples
    --------
    >>> import torch
    >>> op = MatrixOperator(torch.diag(torch.tensor([3.0, 2.0, 1.0])))
    >>> op.matvec(torch.ones(3))
    tensor([3., 2., 1.])
    """

    def __init__(self, matrix: torch.Tensor | np.ndarray) -> None:
        A = torch.as_tensor(matrix)
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"matrix must be square; got shape {tuple(A.shape)}.")
        if not A.is_floating_point():
            A = A.to(torch.get_default_dtype())
        self.matrix = A
        self.n_matvec = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.matrix.shape[0]), int(self.matrix.shape[1]))

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.n_matvec += 1 if v.ndim == 1 else int(v.shape[1])
        return self.matrix @ v.to(dtype=self.dtype, device=self.device)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)


class DeflatedOperator:
    """``(I − QQᵀ) H (I − QQᵀ)``: ``operator`` with the span of ``Q`` removed.

    Eigenpairs of ``operator`` orthogonal to ``Q`` are eigenpairs of the
    deflated operator; the directions in ``Q`` get eigenvalue 0. Used for
    sequential phases (find the next slice of spikes once the first ones are
    known) and for projecting the known spikes out of a random walk.

    Parameters
    ----------
    operator : operator
        Anything with ``shape``, ``dtype``, ``device`` and ``matvec``.
    Q : torch.Tensor of shape (D, r)
        Directions to remove; orthonormalised here (only their span matters).

    Attributes
    ----------
    Q : torch.Tensor of shape (D, r)
        Orthonormal basis of the removed span, on the operator's device.
    n_matvec : int
        Products computed so far (each makes one product of ``operator``).

    Examples
    --------
    >>> import torch
    >>> H = MatrixOperator(torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)))
    >>> top = torch.eye(3, dtype=torch.float64)[:, :1]
    >>> DeflatedOperator(H, top).matvec(torch.ones(3, dtype=torch.float64))
    tensor([0., 2., 1.], dtype=torch.float64)
    """

    def __init__(self, operator: Any, Q: torch.Tensor) -> None:
        dim, dtype, device = check_operator(operator)
        if not isinstance(Q, torch.Tensor):
            Q = torch.as_tensor(np.asarray(Q))
        if Q.ndim == 1:
            Q = Q[:, None]
        if Q.ndim != 2 or Q.shape[0] != dim:
            raise ValueError(f"Q must have shape ({dim}, r); got {tuple(Q.shape)}.")
        if Q.shape[1] > dim:
            raise ValueError(f"Q has more columns ({Q.shape[1]}) than the dimension {dim}.")
        Q = Q.detach().to(device=device, dtype=dtype)
        if not torch.isfinite(Q).all():
            raise ValueError("Q contains NaN or infinite values.")
        if Q.shape[1]:
            Q, _ = torch.linalg.qr(Q)
        self.operator = operator
        self.Q = Q
        self.n_matvec = 0
        self._dim, self._dtype, self._device = dim, dtype, device

    @property
    def shape(self) -> tuple[int, int]:
        return (self._dim, self._dim)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """``(I − QQᵀ) v``."""
        return orthogonalize(v, self.Q)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        v = v.to(dtype=self._dtype, device=self._device)
        self.n_matvec += 1 if v.ndim == 1 else int(v.shape[1])
        return self.project(self.operator.matvec(self.project(v)))

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)
