"""Thick-restart Lanczos with full reorthogonalisation, torch-native.

The Krylov basis lives on the operator's device in the operator's dtype; only
the small projected matrix ``T = Vᵀ H V`` (at most a few hundred entries per
column) goes to the host, in float64. Each new vector is orthogonalised
against the whole basis twice (one Gram–Schmidt pass loses orthogonality in
float32), and the Gram–Schmidt coefficients *are* the new column of ``T``, so
the same code serves a plain Lanczos run, a thick restart (the basis begins
with Ritz vectors) and a warm start.

Residuals come from the Lanczos relation ``H V_j = V_j T_j + f e_jᵀ``: a Ritz
pair ``(θ, V s)`` has ``‖H V s − θ V s‖ = ‖f‖·|s_j|``, exact up to rounding
with full reorthogonalisation, so every check is free of extra products.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import (
    DeflatedOperator,
    Spectrum,
    SpectrumBackend,
    check_compute_args,
    check_positive,
    counted_operator,
    orthogonalize,
    random_vector,
    relative,
    torch_generator,
    warn_not_converged,
)

__all__ = ["LanczosSpectrum"]

# Coordinates per block when rotating the basis in place at a restart: keeps
# the temporary at (k, block) instead of a second (k, D) copy of the basis.
_ROTATE_COLS = 1 << 16
_RR_FACTOR = 1.0


class KrylovBasis:
    """An orthonormal basis grown by products with a symmetric operator, with
    the projected matrix ``T = Vᵀ H V`` built from the Gram–Schmidt
    coefficients. Vectors are stored as rows (contiguous on any device);
    rows ``:j`` have known products, row ``j`` is the next vector (the
    normalised residual ``f/‖f‖``)."""

    def __init__(self, matvec, dim: int, dtype: torch.dtype, device: torch.device,
                 capacity: int) -> None:
        self.matvec = matvec
        self.capacity = capacity
        self.V = torch.zeros((capacity + 1, dim), dtype=dtype, device=device)
        self.T = torch.zeros((capacity, capacity), dtype=torch.float64)
        self.j = 0
        self.beta = 0.0
        self.max_abs = 0.0  # largest |entry| of T seen: a scale for breakdown tests
        self.eps = float(torch.finfo(dtype).eps)

    def start(self, v: torch.Tensor) -> None:
        """Begin at ``v`` (normalised here)."""
        self.V[0] = v / torch.linalg.vector_norm(v)
        self.j = 0
        self.beta = 0.0
        self.T.zero_()

    def step(self, w: torch.Tensor | None = None) -> float:
        """One product and two Gram–Schmidt passes; returns ``‖f‖``. ``w``:
        the product with the next vector when it is already known."""
        j = self.j
        w = self.matvec(self.V[j]) if w is None else w
        B = self.V[: j + 1]
        h = B @ w
        w = w - h @ B
        h2 = B @ w
        w = w - h2 @ B
        hc = (h + h2).to(device="cpu", dtype=torch.float64)
        self.T[: j + 1, j] = hc
        self.T[j, : j + 1] = hc
        self.max_abs = max(self.max_abs, float(hc.abs().max()))
        beta = float(torch.linalg.vector_norm(w))
        self.j = j + 1
        self.beta = beta
        if beta > 0.0 and math.isfinite(beta):
            self.V[self.j] = w / beta
        else:
            self.V[self.j] = 0.0
        return beta

    def broke_down(self, scale: float) -> bool:
        """The basis spans an invariant subspace (to rounding)."""
        return not self.beta > 100.0 * self.eps * max(scale, self.max_abs)

    def inject(self, v: torch.Tensor) -> bool:
        """Continue after a breakdown with ``v`` orthogonalised against the
        basis (the dropped ``‖f‖`` is at rounding level). False if ``v`` lies
        in the span."""
        B = self.V[: self.j]
        for _ in range(2):
            v = v - (B @ v) @ B
        norm = float(torch.linalg.vector_norm(v))
        if not norm > 0.0:
            return False
        self.V[self.j] = v / norm
        self.beta = 0.0
        return True

    def ritz(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ritz values (descending), their coefficient vectors ``S`` and the
        residual norms ``‖f‖·|S[j-1, i]|``."""
        j = self.j
        theta, S = torch.linalg.eigh(self.T[:j, :j])
        theta, S = theta.flip(0), S.flip(1)
        res = self.beta * S[j - 1].abs()
        return theta, S, res

    def vectors(self, S: torch.Tensor) -> torch.Tensor:
        """Ritz vectors ``V S`` as columns, shape (D, S.shape[1])."""
        return self.V[: self.j].T @ S.to(device=self.V.device, dtype=self.V.dtype)

    def restart(self, theta: torch.Tensor, S: torch.Tensor, n_keep: int) -> None:
        """Thick restart: the basis becomes the ``n_keep`` leading Ritz vectors
        plus the current residual direction; ``T`` becomes diagonal, and the
        arrow coupling ``β s_j`` comes back as the next Gram–Schmidt column."""
        j = self.j
        St = S[:, :n_keep].T.to(device=self.V.device, dtype=self.V.dtype).contiguous()
        for c0 in range(0, self.V.shape[1], _ROTATE_COLS):
            cols = slice(c0, c0 + _ROTATE_COLS)
            self.V[:n_keep, cols] = St @ self.V[:j, cols]
        self.V[n_keep] = self.V[j]
        self.T.zero_()
        self.T[:n_keep, :n_keep] = torch.diag(theta[:n_keep])
        self.j = n_keep


class LanczosSpectrum(SpectrumBackend):
    """Top eigenpairs by thick-restart Lanczos with full reorthogonalisation.

    Stops when every wanted Ritz pair has ``‖H v − θ v‖ ≤ tol·|λ₁|``, checked
    after each product through the Lanczos relation (no extra products).
    Eigenvalues are the largest *algebraic* ones (the spikes of a Hessian are
    large and positive).

    Parameters
    ----------
    tol : float, default=1e-3
        Relative residual tolerance.
    max_iter : int, optional
        Most operator products in total (at least one per wanted pair is
        always made). Default ``max(300, 30·n_components)``.
    max_basis : int, optional
        Basis size at which the run restarts, keeping the leading
        ``k + (max_basis − k)//2`` Ritz vectors. Default ``max(3k, k + 20)``
        for ``k`` pairs per phase (a basis of only ``k + 1`` misses spikes;
        ``2k``–``3k`` is enough in practice).
    max_vectors : int, optional
        Memory cap: the most length-``D`` vectors the working basis may hold.
        When ``n_components`` pairs do not fit, they are found in sequential
        phases on the deflated operator ``(I − QQᵀ)H(I − QQᵀ)``, ``Q`` the pairs
        found so far (which are the result and are not counted).
    phase_size : int, optional
        Pairs per phase (default: all at once, or ``(max_vectors − 1)//3``
        with a memory cap).
    random_state : int, RandomState instance or None, default=None
        Seeds the start vector (drawn on the CPU, then moved, so a seed gives
        the same start on every device).

    Notes
    -----
    Warm start: with ``init`` (for example the previous spikes at a nearby
    θ, ordered like a Spectrum), a phase of ``p`` pairs starts from the
    normalised sum ``v0`` of its ``p`` columns. The first product checks
    them: the part of ``H v0`` outside their span is about the RMS of their
    residuals. If it is below ``tol``, the other ``p − 1`` products give the
    Rayleigh–Ritz pairs of the span (with a few Davidson expansions for
    pairs just above ``tol``), so an unchanged set of spikes is confirmed in
    ``p`` products. Otherwise Lanczos runs from ``v0`` (the first product is
    reused): ``v0`` lies almost in the wanted subspace, so no ``2k`` guard is
    needed. Measured at ``tol=1e-3``, ``k=9``: a planted operator perturbed
    by 0.1 % costs 9 products against 18 cold; the refreshes of a surgery on
    a trained MNIST MLP cost 14–16 against 18–19 (a surgery step moves the
    spikes by 0.3–12 % of ``λ₁``, far more than ``tol``, so confirming them
    alone takes ``k`` products; ``docs/performance.md`` has the measurement).
    Columns missing from ``init`` come from a random part, which
    gets the cold-start guard. A spike absent from ``init`` that overtakes
    one of the previous ones can be missed by a warm start.

    A cold start makes at least ``2k`` products before it accepts
    convergence, so as not to converge on the wrong set (a spike whose
    component in the random start is small surfaces late; a basis of
    ``k + 1`` vectors is known to miss spikes).

    Single-vector Lanczos sees one vector per eigenspace: exactly repeated
    eigenvalues are found one copy at a time (rounding brings the others in
    slowly). In deflated phases, the reported residuals are those of the
    deflated operator; the true residual adds at most the residual norms of
    the pairs deflated.

    Examples
    --------
    >>> import torch
    >>> from hessrebal.spectrum import LanczosSpectrum, MatrixOperator
    >>> A = torch.diag(torch.arange(50, dtype=torch.float64))
    >>> spec = LanczosSpectrum(tol=1e-8, random_state=0).compute(MatrixOperator(A), 3)
    >>> [round(x, 6) for x in spec.eigenvalues.tolist()], bool(spec.converged.all())
    ([49.0, 48.0, 47.0], True)
    """

    def __init__(
        self,
        tol: float = 1e-3,
        max_iter: int | None = None,
        max_basis: int | None = None,
        max_vectors: int | None = None,
        phase_size: int | None = None,
        random_state: Any = None,
    ) -> None:
        self.tol = tol
        self.max_iter = max_iter
        self.max_basis = max_basis
        self.max_vectors = max_vectors
        self.phase_size = phase_size
        self.random_state = random_state

    def compute(self, operator: Any, n_components: int,
                init: torch.Tensor | None = None) -> Spectrum:
        """Top ``n_components`` eigenpairs of ``operator``.

        Parameters
        ----------
        operator : operator
            Symmetric; ``shape``, ``dtype``, ``device``, ``matvec``.
        n_components : int
            Number of pairs.
        init : torch.Tensor of shape (D, m), optional
            Warm start: vectors near the wanted eigenvectors.

        Returns
        -------
        Spectrum
        """
        dim, k, dtype, device = check_compute_args(operator, n_components)
        tol = check_positive(self.tol, "tol")
        max_iter = check_positive(self.max_iter, "max_iter", integer=True, allow_none=True)
        max_basis = check_positive(self.max_basis, "max_basis", integer=True, allow_none=True)
        max_vectors = check_positive(self.max_vectors, "max_vectors", integer=True,
                                     allow_none=True)
        phase_size = check_positive(self.phase_size, "phase_size", integer=True,
                                    allow_none=True)
        init, counter = counted_operator(operator, init, dim, dtype, device)
        if max_vectors is not None and max_vectors < 4:
            raise ValueError(f"max_vectors must be at least 4; got {max_vectors}.")
        if phase_size is None:
            phase_size = k if max_vectors is None else max(1, (max_vectors - 1) // 3)
        phase_size = min(phase_size, k)
        if max_vectors is not None and phase_size + 3 > max_vectors and phase_size + 1 < dim:
            raise ValueError(
                f"phase_size={phase_size} needs max_vectors of at least {phase_size + 3}; "
                f"got max_vectors={max_vectors}."
            )
        budget = max_iter if max_iter is not None else max(300, 30 * k)

        gen = torch_generator(self.random_state, operator)
        init_cols = _normalized_columns(init)
        vals, vecs, res, scale = [], [], [], 0.0
        Q: torch.Tensor | None = None
        info: dict[str, Any] = {"n_restarts": 0, "phases": [], "scale": 0.0}
        while sum(v.shape[0] for v in vals) < k:
            p = min(phase_size, k - sum(v.shape[0] for v in vals))
            matvec = counter if Q is None else DeflatedOperator(counter, Q).matvec
            n_eff = dim - (0 if Q is None else Q.shape[1])
            basis = max_basis if max_basis is not None else max(3 * p, p + 20)
            if max_vectors is not None:
                basis = min(basis, max_vectors - 1)
            basis = min(basis, n_eff)
            if basis < min(p + 2, n_eff):
                raise ValueError(f"max_basis={basis} is too small for {p} pairs per phase; "
                                 f"it needs at least {p + 2}.")
            before = counter.count
            limit = max(budget, counter.count + p)
            g = orthogonalize(random_vector(gen, dim, dtype, device), Q)
            cols = _warm_columns(init_cols, Q, p)
            out, start = None, (g, None)
            min_steps = min(n_eff, 2 * p)
            if cols is not None:
                m = cols.shape[1]
                v0 = cols.sum(dim=1)
                if m < p:
                    # Random part for the pairs init cannot cover.
                    v0 = v0 + g * (math.sqrt(p - m) / float(torch.linalg.vector_norm(g)))
                min_steps = min(n_eff, m + 2 * (p - m))
                start = (v0, None)
                if m == p and 2 * p + 2 <= basis + 1:
                    out, start = _rayleigh_ritz_phase(
                        matvec, counter, Q, cols, v0, tol, scale, limit,
                        max_add=min((basis + 1) // 2 - p, -(-p // 2)))
                    min_steps = min(n_eff, p)
            if out is None:
                out = _lanczos_phase(
                    matvec, counter, Q, n_eff, p, start, tol, scale, basis, limit,
                    min_steps, gen)
            theta, Y, r_abs, phase_info = out
            phase_info["n_matvec"] = counter.count - before
            info["phases"].append(phase_info)
            info["n_restarts"] += phase_info.get("n_restarts", 0)
            scale = max(scale, phase_info["scale"])
            vals.append(theta)
            vecs.append(Y)
            res.append(r_abs)
            Q = Y if Q is None else torch.cat([Q, Y], dim=1)

        info["scale"] = scale
        theta = torch.cat(vals)
        order = torch.argsort(theta, descending=True)
        r_abs = torch.cat(res)[order].numpy()
        residuals = relative(r_abs, scale)
        converged = residuals <= tol
        eigvecs = torch.cat(vecs, dim=1)[:, order.to(device)]
        warn_not_converged(
            "LanczosSpectrum", converged, residuals, tol,
            "Raise max_iter or max_basis, or loosen tol.")
        return Spectrum(
            eigenvalues=theta[order].to(device=device, dtype=dtype),
            eigenvectors=eigvecs,
            n_matvec=counter.count,
            residuals=residuals,
            converged=converged,
            info=info,
        )


def _normalized_columns(init: torch.Tensor | None) -> torch.Tensor | None:
    if init is None:
        return None
    norms = torch.linalg.vector_norm(init, dim=0)
    cols = init[:, norms > 0]
    if cols.shape[1] == 0:
        return None
    return cols / norms[norms > 0]


def _warm_columns(init_cols, Q, p):
    """The first ``p`` ``init`` columns that lie mostly outside the deflated
    span, projected and normalised (init is ordered like a Spectrum)."""
    if init_cols is None:
        return None
    proj = orthogonalize(init_cols, Q)
    norms = torch.linalg.vector_norm(proj, dim=0)
    keep = torch.nonzero(norms > 0.5).flatten()[:p]
    if keep.numel() == 0:
        return None
    return proj[:, keep] / norms[keep]


def _rayleigh_ritz_phase(matvec, counter, Q, cols, v0, tol, scale_floor, limit, max_add):
    """Warm start that first checks whether ``init`` is still good.

    The first product is with ``v0`` (the normalised sum of the ``p``
    columns); the part of ``H v0`` outside their span is about the RMS of
    their residuals. If it is below ``tol``, the remaining ``p − 1`` products
    give the Rayleigh–Ritz pairs of the span with exact residuals, and a few
    Davidson expansions (the residual of the worst pair) finish any pair just
    above ``tol``: ``p`` products when the spikes barely moved. Otherwise
    (or if that does not converge) the start vector and its known product are
    handed to Lanczos, so the check costs nothing.

    Returns ``(result, None)`` or ``(None, (start, H start))``.
    """
    p = cols.shape[1]
    B, _ = torch.linalg.qr(torch.cat([v0[:, None], cols], dim=1))
    B = orthogonalize(B[:, :p], Q)
    cap = p + max(max_add, 0)
    V = torch.zeros((cap, B.shape[0]), dtype=B.dtype, device=B.device)
    W = torch.zeros_like(V)
    V[:p] = B.T
    W[0] = matvec(V[0])
    h = V[:p] @ W[0]
    outside = float(torch.linalg.vector_norm(W[0] - h @ V[:p]))
    if not outside <= _RR_FACTOR * tol * max(scale_floor, float(torch.linalg.vector_norm(W[0]))):
        return None, (V[0].clone(), W[0].clone())
    for i in range(1, p):
        W[i] = matvec(V[i])
    n, added = p, 0
    while True:
        T = (V[:n] @ W[:n].T).to(device="cpu", dtype=torch.float64)
        theta, S = torch.linalg.eigh(0.5 * (T + T.T))
        theta, S = theta.flip(0), S.flip(1)
        Sp = S[:, :p].to(device=V.device, dtype=V.dtype)
        Y = V[:n].T @ Sp
        R = W[:n].T @ Sp - Y * theta[:p].to(device=V.device, dtype=V.dtype)
        r_abs = torch.linalg.vector_norm(R, dim=0).to(device="cpu", dtype=torch.float64)
        scale = max(scale_floor, float(theta.abs().max()))
        bad = r_abs > tol * scale
        if not bool(bad.any()):
            if Q is not None:
                Y = orthogonalize(Y, Q)
            info = {"mode": "rayleigh_ritz", "n_added": added, "scale": scale,
                    "n_components": p}
            return (theta[:p].clone(), Y, r_abs, info), None
        if n >= cap or counter.count >= limit:
            break
        worst = int(torch.argmax(r_abs))
        new = orthogonalize(orthogonalize(R[:, worst], V[:n].T), Q)
        norm = float(torch.linalg.vector_norm(new))
        if not norm > 0.0:
            break
        V[n] = new / norm
        W[n] = matvec(V[n])
        n += 1
        added += 1
    # Not there: Lanczos from the sum of the current Ritz vectors, whose
    # product is already known.
    HY = W[:n].T @ Sp
    start, w = Y.sum(dim=1), HY.sum(dim=1)
    norm = torch.linalg.vector_norm(start)
    return None, (start / norm, w / norm)


def _lanczos_phase(matvec, counter, Q, n_eff, p, start, tol, scale_floor, max_basis, limit,
                   min_steps, gen):
    """Top ``p`` Ritz pairs of one (possibly deflated) operator.

    ``start`` is ``(v0, H v0 or None)``; the run stops when the wanted
    residuals are below ``tol`` (after ``min_steps`` steps), when
    ``counter.count`` reaches ``limit``, or when the space is exhausted.
    """
    v0, w0 = start
    dim, dtype, device = counter.dim, counter.dtype, counter.device
    kb = KrylovBasis(matvec, dim, dtype, device, max_basis)
    if not float(torch.linalg.vector_norm(v0)) > 0.0:
        v0, w0 = orthogonalize(random_vector(gen, dim, dtype, device), Q), None
    kb.start(v0)
    n_restarts, steps = 0, 0
    n_keep = min(max(p, p + (max_basis - p) // 2), max_basis - 2)
    while True:
        kb.step(w0)
        w0 = None
        steps += 1
        j = kb.j
        theta, S, r_abs = kb.ritz()
        scale = max(scale_floor, float(theta.abs().max()))
        if j >= p:
            done = bool((r_abs[:p] <= tol * scale).all()) and steps >= min_steps
            if done or counter.count >= limit or j >= n_eff:
                break
        if kb.broke_down(scale):
            if j >= n_eff:
                break
            fresh = orthogonalize(random_vector(gen, dim, dtype, device), Q)
            if not kb.inject(fresh):
                break
        if kb.j >= max_basis:
            kb.restart(theta, S, n_keep)
            n_restarts += 1
    Y = kb.vectors(S[:, :p])
    if Q is not None:
        # Rounding can leak a little of the deflated span back in.
        Y = orthogonalize(Y, Q)
    info = {"mode": "lanczos", "n_steps": steps, "n_restarts": n_restarts,
            "basis": max_basis, "scale": scale, "n_components": p}
    return theta[:p].clone(), Y, r_abs[:p].clone(), info
