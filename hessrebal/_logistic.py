"""Class-weighted multinomial logistic regression on fixed features.

The solver behind :class:`hessrebal.baselines.LastLayerRetraining`. It
minimises scikit-learn's objective for ``LogisticRegression(penalty="l2")``,

    C · Σ_i s_i · CE(W f_i + b, y_i) + ½ ‖W − W_0‖²,

with ``s_i`` the sample weights (``n / (K · n_{y_i})`` for class-balanced
weights) and the intercept ``b`` not penalised; ``W_0 = 0`` is scikit-learn's
(and DFR's) problem, a given ``W_0`` shrinks toward the trained head instead.
It is solved in float64 with L-BFGS on the exact gradient, so it agrees with
scikit-learn to the solvers' tolerance (tested in tests/test_last_layer.py).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp


def balanced_sample_weight(y: np.ndarray, n_classes: int) -> np.ndarray:
    """``n / (K · n_c)`` per sample, K the classes present (scikit-learn's
    ``class_weight="balanced"``), so every class weighs the same in total."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = y.size / (present.sum() * counts[present])
    return weights[y]


def fit_multinomial(features: np.ndarray, y: np.ndarray, n_classes: int, C: float, *,
                    sample_weight: np.ndarray | None = None,
                    center: np.ndarray | None = None, init: np.ndarray | None = None,
                    tol: float = 1e-8, max_iter: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Weights ``(K, d)`` and intercept ``(K,)`` minimising the objective above.

    Parameters
    ----------
    features : ndarray (n, d)
    y : ndarray (n,) of int in ``[0, n_classes)``
    n_classes : int
    C : float > 0
        Inverse L2 strength, as in scikit-learn.
    sample_weight : ndarray (n,), optional
        Default: ones.
    center : ndarray (K, d), optional
        ``W_0``, the point the penalty pulls toward (default zero).
    init : ndarray (K·d + K,), optional
        Warm start (weights then intercept, flattened).
    tol, max_iter
        L-BFGS stopping rule (projected-gradient tolerance and iterations).
    """
    F = np.asarray(features, dtype=np.float64)
    n, d = F.shape
    K = int(n_classes)
    s = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    W0 = np.zeros((K, d)) if center is None else np.asarray(center, dtype=np.float64)
    Y = np.zeros((n, K))
    Y[np.arange(n), y] = 1.0
    # Dividing by C·Σs leaves the minimiser unchanged and keeps the scale of
    # the objective near one, so L-BFGS's tolerances mean the same for any n.
    scale = 1.0 / (C * max(s.sum(), 1e-300))

    def value_and_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        W, b = x[:K * d].reshape(K, d), x[K * d:]
        Z = F @ W.T + b
        lse = logsumexp(Z, axis=1)
        loss = C * float(s @ (lse - (Z * Y).sum(1))) + 0.5 * float(np.sum((W - W0) ** 2))
        R = (np.exp(Z - lse[:, None]) - Y) * (C * s)[:, None]
        gW = R.T @ F + (W - W0)
        gb = R.sum(0)
        return loss * scale, np.concatenate([gW.ravel(), gb]) * scale

    x0 = (np.concatenate([W0.ravel(), np.zeros(K)]) if init is None
          else np.asarray(init, dtype=np.float64))
    res = minimize(value_and_grad, x0, jac=True, method="L-BFGS-B",
                   options={"maxiter": int(max_iter), "gtol": tol, "ftol": 1e-15})
    return res.x[:K * d].reshape(K, d).copy(), res.x[K * d:].copy()
