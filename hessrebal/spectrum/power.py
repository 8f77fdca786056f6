"""Power iteration with deflation, the way PyHessian computes top eigenpairs.

It is the reference the Lanczos backend is measured against. PyHessian stops
a pair when its eigenvalue estimate changes by less than ``tol`` (relative)
between two products; the eigenvalue then is accurate to about ``tol`` while
the eigenvector can still be far off (cosine 0.9 on a planted 9-spike
operator). This backend stops on the residual instead, the same test its
``converged`` flags use, so that a pair is flagged exactly when it ran out of
``max_iter`` and raising ``max_iter`` (or loosening ``tol``) is the remedy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import (
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

__all__ = ["PowerIterationSpectrum"]


class PowerIterationSpectrum(SpectrumBackend):
    """Top eigenpairs by power iteration, one pair at a time, deflated.

    For pair ``i``: start from a random vector (or ``init[:, i]``), and
    repeat ``v ← orth(v, Q)/‖·‖, w = H v, λ = vᵀw, v ← w`` until the
    residual ``‖w − λ v‖ ≤ tol·s`` or ``max_iter`` products, ``Q`` the pairs
    already found and ``s`` the largest ``|λ|`` found so far.

    Parameters
    ----------
    tol : float, default=1e-3
        Relative residual that stops a pair. The ``converged`` flags use the
        same test against the final ``|λ₁|`` (never smaller than ``s``), so a
        pair that stopped is flagged converged, and a flagged pair is one that
        used all ``max_iter`` products. (PyHessian's rule, a relative
        eigenvalue change below ``tol``, stopped long before the vectors
        settled: 9 of 9 pairs unconverged, whatever ``max_iter``.)
    max_iter : int, default=100
        Most products per pair. Power iteration converges at the rate
        ``λᵢ₊₁/λᵢ``, so close spikes need many: raise it when pairs are
        reported unconverged.
    random_state : int, RandomState instance or None, default=None
        Seeds the start vectors.

    Notes
    -----
    Power iteration converges to the eigenvalue of largest *magnitude* of the
    deflated operator, so a strongly negative eigenvalue is returned before a
    small positive one; results are sorted in descending order. Its rate is
    the ratio of consecutive eigenvalues, which is why it needs several times
    the products of Lanczos.

    Examples
    --------
    >>> import torch
    >>> from hessrebal.spectrum import PowerIterationSpectrum, MatrixOperator
    >>> A = torch.diag(torch.tensor([10.0, 5.0, 1.0, 0.5], dtype=torch.float64))
    >>> spec = PowerIterationSpectrum(tol=1e-12, max_iter=500, random_state=0)
    >>> [round(x, 6) for x in spec.compute(MatrixOperator(A), 2).eigenvalues.tolist()]
    [10.0, 5.0]
    """

    def __init__(self, tol: float = 1e-3, max_iter: int = 100, random_state: Any = None) -> None:
        self.tol = tol
        self.max_iter = max_iter
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
            Start vectors: column ``i`` starts pair ``i`` (random beyond ``m``).

        Returns
        -------
        Spectrum
            ``info["n_iter"]`` lists the products per pair; ``info["scale"]``
            is the ``|λ₁|`` the residuals are relative to.
        """
        dim, k, dtype, device = check_compute_args(operator, n_components)
        tol = check_positive(self.tol, "tol")
        max_iter = check_positive(self.max_iter, "max_iter", integer=True)
        init, counter = counted_operator(operator, init, dim, dtype, device)
        gen = torch_generator(self.random_state, operator)

        Q = torch.zeros((dim, 0), dtype=dtype, device=device)
        values, r_abs, n_iter = [], [], []
        for i in range(k):
            v = random_vector(gen, dim, dtype, device)
            if init is not None and i < init.shape[1]:
                v = init[:, i].clone()
            scale = max((abs(x) for x in values), default=0.0)
            for it in range(1, max_iter + 1):
                v = orthogonalize(v, Q)
                norm = torch.linalg.vector_norm(v)
                if not float(norm) > 0.0:
                    # The start lies in the span found so far: draw another.
                    v = orthogonalize(random_vector(gen, dim, dtype, device), Q)
                    norm = torch.linalg.vector_norm(v)
                v = v / norm
                w = counter(v)
                lam = float(v @ w)
                residual = float(torch.linalg.vector_norm(w - lam * v))
                # Two tests. The full residual against max|λ| is the one the
                # flags below use, so stopping implies converged. Alone it let
                # a random start in a large bulk (‖Hv‖ ≪ λ₁) stop on its first
                # product and return a bulk value; so the deflated operator's
                # residual must also be small against this pair's own |λ|.
                deflated = float(torch.linalg.vector_norm(orthogonalize(w, Q) - lam * v))
                if residual <= tol * max(scale, abs(lam)) and deflated <= tol * abs(lam):
                    break
                if it < max_iter:
                    v = w
            # v is the vector whose product we know, so its residual is exact.
            Q = torch.cat([Q, v[:, None]], dim=1)
            values.append(lam)
            r_abs.append(residual)
            n_iter.append(it)

        vals = torch.tensor(values, dtype=torch.float64)
        order = torch.argsort(vals, descending=True)
        scale = float(vals.abs().max())
        residuals = relative(np.asarray(r_abs)[order.numpy()], scale)
        converged = residuals <= tol
        warn_not_converged(
            "PowerIterationSpectrum", converged, residuals, tol,
            f"They used all max_iter={max_iter} products: raise max_iter (power "
            "iteration converges at the rate λᵢ₊₁/λᵢ), loosen tol, or use LanczosSpectrum.")
        return Spectrum(
            eigenvalues=vals[order].to(device=device, dtype=dtype),
            eigenvectors=Q[:, order.to(device)],
            n_matvec=counter.count,
            residuals=residuals,
            converged=converged,
            info={"n_iter": [n_iter[j] for j in order.tolist()], "scale": scale},
        )
