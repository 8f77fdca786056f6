"""Control directions for the spike premise, as spectrum backends.

Spectral Surgery rests on one claim: the directions that move per-class
accuracy are the few outlier eigenvectors ("spikes") of the loss Hessian. The
controls here test it by running the *same* surgeon loop, with the same
budget, along other directions:

- :class:`RandomDirections`: random orthonormal directions (a random
  ``k``-dimensional subspace of parameter space);
- :class:`BulkDirections`: random orthonormal directions inside the bulk,
  i.e. orthogonal to the top ``n_exclude`` eigenvectors found by Lanczos.

Both follow the spectrum-backend protocol (``compute(operator, n_components,
init=None) -> Spectrum``), so they plug into
:class:`~hessrebal.SpectralSurgeon` through ``spectrum=``. Their "eigenvalues"
are the Rayleigh quotients ``qᵀHq`` of the directions (sorted descending, the
order a :class:`~hessrebal.spectrum.Spectrum` promises), which is what the
surgeon uses for the box budget and the predicted loss increase. Pass the
spike run's budget so the comparison is at equal step length::

    spikes = SpectralSurgeon(random_state=0).fit(model, X_val, y_val)
    control = SpectralSurgeon(spectrum=BulkDirections(random_state=0),
                              budget=spikes.initial_budget_).fit(model, X_val, y_val)

With a warm start (``init``: the surgeon passes the previous directions when
it refreshes the spectrum) both keep their subspace: the random control stays
in the same random subspace while θ moves, as the spike run stays with its
(rotating) spikes; the bulk control projects its previous directions off the
spikes recomputed at the new θ.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .spectrum import LanczosSpectrum, Spectrum
from .spectrum.base import (
    SpectrumBackend,
    check_compute_args,
    counted_operator,
    orthogonalize,
    relative,
    torch_generator,
)

__all__ = ["RandomDirections", "BulkDirections", "rayleigh_spectrum"]


def _orthonormal(A: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of ``A`` (QR in float64 for accuracy)."""
    Q, R = torch.linalg.qr(A.to(torch.float64))
    # Fix the sign so the basis is a deterministic function of A.
    signs = torch.sign(torch.diagonal(R))
    signs[signs == 0] = 1.0
    return (Q * signs).to(A.dtype)


def _gaussian(gen: torch.Generator, dim: int, k: int, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    # Drawn on the CPU in float64, then moved: a seed gives the same
    # directions on every device and in every dtype.
    return torch.randn(dim, k, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def _complete_randomly(kept: torch.Tensor | None, k: int, gen: torch.Generator, dim: int,
                      dtype: torch.dtype, device: torch.device,
                      avoid: torch.Tensor | None = None) -> torch.Tensor:
    """``kept`` (orthonormal columns, or None) completed to ``k`` orthonormal
    columns with Gaussian draws orthogonal to ``kept`` and to ``avoid``."""
    m = 0 if kept is None else kept.shape[1]
    if m >= k:
        return kept
    basis = avoid if kept is None else (kept if avoid is None else torch.cat([avoid, kept], dim=1))
    fresh = _orthonormal(orthogonalize(_gaussian(gen, dim, k - m, dtype, device), basis))
    return fresh if kept is None else torch.cat([kept, fresh], dim=1)


def rayleigh_spectrum(counter: Any, Q: torch.Tensor, info: dict[str, Any] | None = None,
                      n_matvec: int | None = None) -> Spectrum:
    """The :class:`Spectrum` of fixed orthonormal directions.

    Eigenvalues are the Rayleigh quotients ``ρ_i = q_iᵀ H q_i`` (one product
    per direction), sorted descending with their directions; residuals are
    ``‖H q_i − ρ_i q_i‖ / max|ρ|``, which says how far each direction is from
    an eigenvector. ``converged`` is all True: the quotients are exact, which
    is all this backend promises.

    Parameters
    ----------
    counter : operator
        Applies ``H`` (typically a counting wrapper).
    Q : torch.Tensor of shape (D, k)
        Orthonormal directions.
    info : dict, optional
        Extra entries for ``Spectrum.info``.
    n_matvec : int, optional
        Products to report (default: ``counter.count``).
    """
    k = Q.shape[1]
    rho = torch.empty(k, dtype=torch.float64)
    r_abs = np.empty(k)
    for i in range(k):
        q = Q[:, i]
        w = counter.matvec(q)
        rho[i] = float(q @ w)
        r_abs[i] = float(torch.linalg.vector_norm(w - rho[i].item() * q))
    order = torch.argsort(rho, descending=True)
    scale = float(rho.abs().max()) if k else 0.0
    info = dict(info or {})
    info["scale"] = scale
    return Spectrum(
        eigenvalues=rho[order].to(device=Q.device, dtype=Q.dtype),
        eigenvectors=Q[:, order.to(Q.device)],
        n_matvec=int(counter.count if n_matvec is None else n_matvec),
        residuals=relative(r_abs[order.numpy()], scale),
        converged=np.ones(k, dtype=bool),
        info=info,
    )


class RandomDirections(SpectrumBackend):
    """Random orthonormal directions in place of the spikes (a control).

    ``compute`` draws a ``D × k`` Gaussian matrix and orthonormalises it
    (QR), so the directions are a uniformly random ``k``-dimensional
    subspace; their "eigenvalues" are the Rayleigh quotients ``qᵀHq``
    (``k`` products), typically near the bulk's mean curvature, far below the
    spikes. With ``init`` (the surgeon's warm start at a refresh) the given
    columns are kept (re-orthonormalised) and only their Rayleigh quotients
    are recomputed, so the loop stays in one random subspace.

    Parameters
    ----------
    random_state : int, RandomState instance or None, default=None
        Seeds the directions (drawn on the CPU in float64, then moved).

    Examples
    --------
    >>> import torch
    >>> from hessrebal.spectrum import MatrixOperator
    >>> A = torch.diag(torch.arange(20, dtype=torch.float64))
    >>> spec = RandomDirections(random_state=0).compute(MatrixOperator(A), 3)
    >>> Q = spec.eigenvectors
    >>> bool(torch.allclose(Q.T @ Q, torch.eye(3, dtype=torch.float64)))
    True
    >>> spec.n_matvec
    3
    """

    def __init__(self, random_state: Any = None) -> None:
        self.random_state = random_state

    def compute(self, operator: Any, n_components: int,
                init: torch.Tensor | None = None) -> Spectrum:
        """``n_components`` random orthonormal directions and their Rayleigh quotients.

        Parameters
        ----------
        operator : operator
            Symmetric; ``shape``, ``dtype``, ``device``, ``matvec``.
        n_components : int
            Number of directions ``k``.
        init : torch.Tensor of shape (D, m), optional
            Directions to keep (the first ``min(m, k)`` columns); the rest
            are random, orthogonal to them.

        Returns
        -------
        Spectrum
            ``info["kind"] == "random"``.
        """
        dim, k, dtype, device = check_compute_args(operator, n_components)
        init, counter = counted_operator(operator, init, dim, dtype, device)
        gen = torch_generator(self.random_state)
        kept = None
        if init is not None:
            kept = _orthonormal(init[:, :k])
        m = 0 if kept is None else kept.shape[1]
        Q = _complete_randomly(kept, k, gen, dim, dtype, device)
        return rayleigh_spectrum(counter, Q, {"kind": "random", "n_kept": m})


class BulkDirections(SpectrumBackend):
    """Random orthonormal directions from the Hessian's bulk (a control).

    ``compute`` first finds the top ``n_exclude`` eigenvectors (the spikes
    and a margin) with ``spectrum``, then draws ``k`` Gaussian directions,
    projects them off those eigenvectors and orthonormalises them: random
    combinations of bulk eigenvectors, weighted by nothing but chance. Their
    "eigenvalues" are the Rayleigh quotients ``qᵀHq``, a weighted mean of the
    bulk eigenvalues.

    Why random bulk combinations and not, say, the eigenvectors just below
    the spike edge: the paper's claim is about the bulk as a whole ("class
    information lives in the spikes"), and its bulk walk uses exactly these
    directions; the eigenvectors right below the edge are a borderline case
    (the C-th outlier Papyan ties to the class means often sits there),
    which the default ``n_exclude = k + 1`` removes as well.

    Parameters
    ----------
    n_exclude : int, optional
        How many top eigenvectors to project off. Default ``k + 1`` for ``k``
        requested directions (the surgeon asks for ``C − 1``, so the ``C``
        possible outliers are removed), capped at ``D − k``.
    spectrum : spectrum backend, optional
        Finds the top eigenvectors; default ``LanczosSpectrum(tol=1e-3)``
        seeded from ``random_state``.
    random_state : int, RandomState instance or None, default=None
        Seeds the directions and the default spectrum backend.

    Attributes
    ----------
    spikes_ : torch.Tensor of shape (D, n_exclude)
        The eigenvectors excluded in the last ``compute`` (they warm-start
        the next one, at a nearby θ).
    spike_eigenvalues_ : ndarray of shape (n_exclude,)

    Examples
    --------
    >>> import torch
    >>> from hessrebal.spectrum import MatrixOperator
    >>> from hessrebal.spectrum import LanczosSpectrum
    >>> d = torch.cat([torch.tensor([50.0, 40.0, 30.0]), torch.linspace(0, 1, 60)])
    >>> A = torch.diag(d.to(torch.float64))
    >>> control = BulkDirections(n_exclude=3, spectrum=LanczosSpectrum(tol=1e-10), random_state=0)
    >>> spec = control.compute(MatrixOperator(A), 2)
    >>> float(spec.eigenvectors[:3].abs().max()) < 1e-6   # no weight on the spikes
    True
    >>> bool(spec.eigenvalues.max() < 1.0)
    True
    """

    def __init__(self, n_exclude: int | None = None, spectrum: Any = None,
                 random_state: Any = None) -> None:
        self.n_exclude = n_exclude
        self.spectrum = spectrum
        self.random_state = random_state

    def compute(self, operator: Any, n_components: int,
                init: torch.Tensor | None = None) -> Spectrum:
        """``n_components`` random bulk directions and their Rayleigh quotients.

        Parameters
        ----------
        operator : operator
            Symmetric; ``shape``, ``dtype``, ``device``, ``matvec``.
        n_components : int
            Number of directions ``k``.
        init : torch.Tensor of shape (D, m), optional
            Directions to keep after projecting them off the spikes found
            now (the surgeon's warm start); the rest are drawn at random.

        Returns
        -------
        Spectrum
            ``info`` has ``kind="bulk"``, ``n_exclude``, ``spike_eigenvalues``
            and ``spike_n_matvec``; ``n_matvec`` counts the spike search too.
        """
        dim, k, dtype, device = check_compute_args(operator, n_components)
        if dim - k < 1:
            raise ValueError(f"n_components={k} leaves no room for excluded spikes in dimension "
                             f"{dim}.")
        if self.n_exclude is None:
            n_ex = min(k + 1, dim - k)
        else:
            n_ex = self.n_exclude
            if isinstance(n_ex, bool) or not isinstance(n_ex, (int, np.integer)) or n_ex < 1:
                raise ValueError(f"n_exclude must be a positive int or None; got {n_ex!r}.")
            if n_ex + k > dim:
                raise ValueError(f"n_exclude + n_components = {n_ex + k} exceeds the "
                                 f"dimension {dim}.")
            n_ex = int(n_ex)
        init, counter = counted_operator(operator, init, dim, dtype, device)
        gen = torch_generator(self.random_state)

        backend = self.spectrum
        if backend is None:
            seed = int(torch.randint(0, 2**31 - 1, (), generator=gen))
            backend = LanczosSpectrum(tol=1e-3, random_state=seed)
        warm = getattr(self, "spikes_", None)
        if (isinstance(warm, torch.Tensor) and warm.shape == (dim, n_ex)
                and warm.device == device):
            spikes = _call_spectrum(backend, counter, n_ex, warm.to(dtype))
        else:
            spikes = _call_spectrum(backend, counter, n_ex, None)
        S = _orthonormal(spikes.eigenvectors[:, :n_ex].to(device=device, dtype=dtype))
        spike_products = counter.count

        kept = None
        if init is not None:
            kept = orthogonalize(init[:, :k], S)
            # Drop columns that lay (almost) inside the spike span.
            norms = torch.linalg.vector_norm(kept, dim=0)
            kept = kept[:, norms > 1e-3 * torch.linalg.vector_norm(init[:, :k], dim=0)]
            kept = _orthonormal(kept) if kept.shape[1] else None
        m = 0 if kept is None else kept.shape[1]
        Q = _complete_randomly(kept, k, gen, dim, dtype, device, avoid=S)
        # Re-project: QR of nearly-orthogonal columns may reintroduce rounding-size
        # components along S, which the spikes' large eigenvalues would amplify.
        Q = _orthonormal(orthogonalize(Q, S))

        self.spikes_ = S.detach().clone()
        self.spike_eigenvalues_ = spikes.eigenvalues[:n_ex].detach().cpu().to(
            torch.float64).numpy()
        return rayleigh_spectrum(counter, Q, {
            "kind": "bulk", "n_exclude": n_ex, "n_kept": m,
            "spike_eigenvalues": self.spike_eigenvalues_.tolist(),
            "spike_n_matvec": spike_products,
        })


def _call_spectrum(backend: Any, operator: Any, k: int, init: torch.Tensor | None) -> Spectrum:
    import inspect

    if init is not None and "init" in inspect.signature(backend.compute).parameters:
        return backend.compute(operator, k, init=init)
    return backend.compute(operator, k)
