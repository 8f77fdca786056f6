"""Spectral density by stochastic Lanczos quadrature, and the spike counter.

SLQ: for a unit random probe ``v``, ``m`` Lanczos steps give a tridiagonal
``T`` with eigenpairs ``(θ_l, s_l)``; ``Σ_l s_{1l}² δ(x − θ_l)`` is the
``m``-node Gauss quadrature of the measure ``Σ_i (vᵀq_i)² δ(x − λ_i)``, whose
expectation over probes is the spectral distribution ``(1/D) Σ_i δ(x − λ_i)``.
Its moments up to degree ``2m − 1`` are exact for each probe, so the only
error in ``E[λ^p]`` is the probe noise.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import (
    CountingMatvec,
    check_operator,
    check_positive,
    torch_generator,
)
from .lanczos import KrylovBasis

__all__ = ["count_spikes", "slq_density", "slq_quadrature"]


def slq_quadrature(
    operator: Any,
    n_probes: int = 10,
    n_steps: int = 60,
    random_state: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of the SLQ estimate of the spectral distribution.

    Parameters
    ----------
    operator : operator
        Symmetric; ``shape``, ``dtype``, ``device``, ``matvec``.
    n_probes : int, default=10
        Random Rademacher probes (normalised).
    n_steps : int, default=60
        Lanczos steps per probe (at most ``D``; fewer when the Krylov space
        becomes invariant, which makes that probe's quadrature exact).
    random_state : int, RandomState instance or None, default=None
        Seeds the probes.

    Returns
    -------
    nodes : ndarray of shape (n,)
        Quadrature nodes of all probes (Ritz values).
    weights : ndarray of shape (n,)
        Their weights; they sum to 1, so ``Σ w f(θ) ≈ tr f(H) / D``.
        ``n_probes · n_steps`` operator products at most.

    Examples
    --------
    >>> import torch
    >>> from hessrebal.spectrum import MatrixOperator
    >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
    >>> nodes, weights = slq_quadrature(MatrixOperator(A), n_probes=4, random_state=0)
    >>> round(float(weights.sum()), 6)
    1.0
    """
    dim, dtype, device = check_operator(operator)
    n_probes = check_positive(n_probes, "n_probes", integer=True)
    n_steps = min(check_positive(n_steps, "n_steps", integer=True), dim)
    counter = CountingMatvec(operator, dim, dtype, device)
    gen = torch_generator(random_state)
    kb = KrylovBasis(counter, dim, dtype, device, n_steps)
    nodes, weights = [], []
    for _ in range(n_probes):
        signs = torch.randint(0, 2, (dim,), generator=gen, dtype=torch.int64)
        v = (2.0 * signs - 1.0).to(device=device, dtype=dtype)
        kb.start(v)
        while kb.j < n_steps:
            kb.step()
            if kb.broke_down(kb.max_abs):
                break
        theta, S = torch.linalg.eigh(kb.T[: kb.j, : kb.j])
        nodes.append(theta.numpy())
        weights.append((S[0] ** 2).numpy())
    w = np.concatenate(weights)
    return np.concatenate(nodes), w / n_probes


def slq_density(
    operator: Any,
    n_probes: int = 10,
    n_steps: int = 60,
    grid: np.ndarray | None = None,
    sigma: float | None = None,
    n_grid: int = 1000,
    random_state: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-smoothed spectral density by stochastic Lanczos quadrature.

    Parameters
    ----------
    operator : operator
        Symmetric; ``shape``, ``dtype``, ``device``, ``matvec``.
    n_probes, n_steps, random_state
        As in :func:`slq_quadrature`.
    grid : array-like, optional
        Where to evaluate the density. Default: ``n_grid`` points from
        ``5σ`` below the smallest node to ``5σ`` above the largest.
    sigma : float, optional
        Width of the Gaussian kernel; default 1 % of the node range.
    n_grid : int, default=1000
        Grid size when ``grid`` is None.

    Returns
    -------
    grid : ndarray of shape (n_grid,)
    density : ndarray of shape (n_grid,)
        ``Σ_l w_l N(x; θ_l, σ²)``; integrates to 1 over the default grid.
        An isolated eigenvalue carries mass ``1/D``, so spikes are small bumps
        far to the right of the bulk.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from hessrebal.spectrum import MatrixOperator
    >>> A = torch.diag(torch.linspace(0, 1, 200, dtype=torch.float64))
    >>> x, p = slq_density(MatrixOperator(A), random_state=0)
    >>> round(float(np.trapezoid(p, x)), 3)
    1.0
    """
    nodes, weights = slq_quadrature(operator, n_probes, n_steps, random_state)
    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        width = hi - lo
        sigma = 0.01 * (width if width > 0 else max(abs(hi), 1.0))
    sigma = check_positive(sigma, "sigma")
    if grid is None:
        n_grid = check_positive(n_grid, "n_grid", integer=True)
        grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, n_grid)
    else:
        grid = np.asarray(grid, dtype=np.float64)
        if grid.ndim != 1 or grid.size == 0 or not np.all(np.isfinite(grid)):
            raise ValueError("grid must be a non-empty 1-D array of finite values.")
    z = (grid[:, None] - nodes[None, :]) / sigma
    density = (np.exp(-0.5 * z**2) @ weights) / (sigma * np.sqrt(2.0 * np.pi))
    return grid, density


def count_spikes(
    eigenvalues: Any,
    bulk_edge: float | None = None,
    min_ratio: float = 1.5,
    floor: float = 1e-3,
    rule: str = "last",
) -> int:
    """How many of the top eigenvalues stand out from the bulk.

    Parameters
    ----------
    eigenvalues : array-like or tensor of shape (n,)
        The top of the spectrum (any order; sorted here), ideally a few more
        values than the spikes expected (``2C`` for ``C`` classes) so that
        the top of the bulk is seen.
    bulk_edge : float, optional
        If given, the count of eigenvalues above it (for example the upper
        edge of the bulk read from :func:`slq_density`); the gap rule is not
        used.
    min_ratio : float, default=1.5
        Smallest ratio ``λ_i / λ_{i+1}`` that counts as a spike/bulk gap.
        Measured: a trained 10-class MLP on long-tailed MNIST shows
        ``λ9/λ10 ≈ 2.4`` with the Hessian on training data and ≈ 1.6 on the
        smaller validation set; eigenvalues at the top of a dense bulk differ
        by a few percent.
    floor : float, default=1e-3
        Eigenvalues below ``floor·λ₁`` (the near-zero and negative bulk) are
        treated as equal to it, so ratios of tiny numbers are not gaps.
    rule : {"last", "largest"}, default="last"
        Which qualifying gap is the boundary. ``"last"``: the deepest gap
        with ratio ``≥ min_ratio``, so every value above it is a spike —
        spikes often span a decade among themselves (``λ₁/λ₂`` can exceed
        the spike/bulk gap), which makes the largest gap the wrong one.
        ``"largest"``: the largest ratio, if it is ``≥ min_ratio``.

    Returns
    -------
    int
        The number of spikes ``s``: ``λ_1 … λ_s`` stand out, 0 if no gap
        qualifies (or ``λ₁ ≤ 0``).

    Examples
    --------
    >>> count_spikes([50, 30, 20, 12, 9, 3.1, 3.0, 2.9, 2.8])
    5
    >>> count_spikes([50, 30, 20, 12, 9, 3.1, 3.0, 2.9, 2.8], rule="largest")
    5
    >>> count_spikes([3.1, 3.0, 2.9, 2.8])
    0
    """
    if isinstance(eigenvalues, torch.Tensor):
        eigenvalues = eigenvalues.detach().cpu().numpy()
    lam = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
    if lam.size == 0 or not np.all(np.isfinite(lam)):
        raise ValueError("eigenvalues must be a non-empty array of finite values.")
    lam = np.sort(lam)[::-1]
    if bulk_edge is not None:
        if not np.isfinite(bulk_edge):
            raise ValueError(f"bulk_edge must be finite; got {bulk_edge!r}.")
        return int(np.sum(lam > bulk_edge))
    min_ratio = check_positive(min_ratio, "min_ratio")
    if min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be above 1; got {min_ratio}.")
    if not (isinstance(floor, (int, float, np.number)) and 0.0 < floor < 1.0):
        raise ValueError(f"floor must be in (0, 1); got {floor!r}.")
    if rule not in ("last", "largest"):
        raise ValueError(f"rule must be 'last' or 'largest'; got {rule!r}.")
    if lam.size < 2 or lam[0] <= 0.0:
        return 0
    clipped = np.maximum(lam, floor * lam[0])
    ratios = clipped[:-1] / clipped[1:]
    gaps = np.flatnonzero(ratios >= min_ratio)
    if gaps.size == 0:
        return 0
    if rule == "last":
        return int(gaps[-1] + 1)
    return int(np.argmax(ratios) + 1)
