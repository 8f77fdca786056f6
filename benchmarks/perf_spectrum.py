"""Top C−1 Hessian eigenpairs of a trained long-tailed MNIST MLP: matvecs of
Lanczos against power iteration, wall time against the tools users would
pick instead, and the cost of warm-started refreshes inside a surgery.

    python benchmarks/perf_spectrum.py [--threads 1] [--output FILE]

Peers (installed for the benchmark only, skipped when absent; they are not
dependencies of hessrebal): PyHessian's ``hessian.eigenvalues`` (power
iteration with deflation; ``pip install pyhessian``) in both of its modes —
a list of chunks (``dataloader=``, products rebuilt every time) and one batch
(``data=``, its graph kept) — and curvlinops' ``HessianLinearOperator``
(``pip install curvlinops-for-pytorch``) under ``scipy.sparse.linalg.eigsh``.
Only the eigensolver is timed for the peers (their setup and curvlinops'
determinism check are left out); hessrebal's time includes building the
operator and its graph cache.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from _perf import emit, setup, trained_lt_mnist_mlp

from hessrebal import SpectralSurgeon
from hessrebal.curvature import HessianOperator
from hessrebal.spectrum import LanczosSpectrum, PowerIterationSpectrum

TOL = 1e-3


def rel_err(values, reference):
    values, reference = np.sort(np.asarray(values))[::-1], np.asarray(reference)
    return float(np.max(np.abs(values[: len(reference)] - reference) / np.abs(reference)))


def matvec_counts(model, X, y, k, reference):
    op = HessianOperator(model, X, y)
    lanczos = LanczosSpectrum(tol=TOL, random_state=0).compute(op, k)
    power = PowerIterationSpectrum(tol=TOL, max_iter=100, random_state=0).compute(op, k)
    return {
        "k": k, "tol": TOL,
        "lanczos_matvecs": lanczos.n_matvec, "power_matvecs": power.n_matvec,
        "ratio": lanczos.n_matvec / power.n_matvec, "target_ratio": 0.2,
        "lanczos_eigenvalue_rel_err": rel_err(lanczos.eigenvalues.numpy(), reference),
        "power_eigenvalue_rel_err": rel_err(power.eigenvalues.numpy(), reference),
        "lanczos_max_residual": float(lanczos.residuals.max()),
    }


def time_hessrebal(model, X, y, k):
    start = time.perf_counter()
    op = HessianOperator(model, X, y)
    spec = LanczosSpectrum(tol=TOL, random_state=0).compute(op, k)
    return time.perf_counter() - start, spec.eigenvalues.numpy(), spec.n_matvec


def time_pyhessian(model, X, y, k, batch_size, single_batch):
    from pyhessian import hessian

    model = copy.deepcopy(model).eval()
    criterion = torch.nn.CrossEntropyLoss()
    torch.manual_seed(0)
    start = time.perf_counter()
    if single_batch:
        h = hessian(model, criterion, data=(X, y), cuda=False)
    else:
        chunks = [(X[i:i + batch_size], y[i:i + batch_size])
                  for i in range(0, X.shape[0], batch_size)]
        h = hessian(model, criterion, dataloader=chunks, cuda=False)
    values, _ = h.eigenvalues(maxIter=100, tol=TOL, top_n=k)
    return time.perf_counter() - start, np.asarray(values)


def time_curvlinops(model, X, y, k, batch_size):
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import eigsh

    model = copy.deepcopy(model).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    chunks = [(X[i:i + batch_size], y[i:i + batch_size]) for i in range(0, X.shape[0], batch_size)]
    op = HessianLinearOperator(model, torch.nn.CrossEntropyLoss(), params, chunks,
                               check_deterministic=False)
    lin = op.to_scipy()
    count = {"n": 0}
    mv = lin.matvec

    def counted(v):
        count["n"] += 1
        return mv(v)

    from scipy.sparse.linalg import LinearOperator

    counted_op = LinearOperator(lin.shape, matvec=counted, dtype=lin.dtype)
    v0 = np.random.default_rng(0).standard_normal(lin.shape[0])
    start = time.perf_counter()
    values = eigsh(counted_op, k=k, which="LA", tol=TOL, v0=v0, return_eigenvectors=False)
    return time.perf_counter() - start, np.sort(values)[::-1], count["n"]


def peers(model, X, y, k, reference, ours_seconds):
    out = {}
    batch_size = HessianOperator(model, X[:2], y[:2]).batch_size
    try:
        import pyhessian  # noqa: F401
    except ImportError:
        out["pyhessian"] = "not installed (pip install pyhessian)"
    else:
        for mode, single in (("pyhessian_chunks", False), ("pyhessian_one_batch", True)):
            seconds, values = time_pyhessian(model, X, y, k, batch_size, single)
            out[mode] = {"seconds": seconds, "eigenvalue_rel_err": rel_err(values, reference)}
    try:
        import curvlinops  # noqa: F401
    except ImportError:
        out["curvlinops"] = "not installed (pip install curvlinops-for-pytorch)"
    else:
        seconds, values, n = time_curvlinops(model, X, y, k, batch_size)
        out["curvlinops_eigsh"] = {"seconds": seconds, "matvecs": n,
                                   "eigenvalue_rel_err": rel_err(values, reference)}
    timed = {name: r["seconds"] for name, r in out.items() if isinstance(r, dict)}
    if timed:
        best = min(timed, key=timed.get)
        out["best_peer"] = best
        out["time_ratio_vs_best_peer"] = ours_seconds / timed[best]
        out["target_time_ratio"] = 0.35
    return out


def warm_refreshes(model, splits, k, random_state=0):
    """A surgery with the Hessian on the training data; every refresh is
    replayed cold (fresh random start) at the same θ for comparison."""
    seen = []

    class Recording(LanczosSpectrum):
        def compute(self, operator, n_components, init=None):
            spec = super().compute(operator, n_components, init=init)
            seen.append((operator.theta.clone(), init is not None, spec.n_matvec,
                         spec.eigenvectors.clone(), spec.eigenvalues.clone()))
            return spec

    surgeon = SpectralSurgeon(spectrum=Recording(tol=TOL), random_state=random_state)
    surgeon.fit(model, splits.X_val, splits.y_val,
                curvature_data=(splits.X_train, splits.y_train))
    refreshes = []
    previous = None
    for theta, warm, n, vectors, values in seen:
        if warm:
            op = HessianOperator(model, splits.X_train, splits.y_train, theta=theta)
            cold = LanczosSpectrum(tol=TOL, random_state=random_state + 1).compute(op, k)
            refreshes.append({"warm_matvecs": n, "cold_matvecs": cold.n_matvec,
                              "ratio": n / cold.n_matvec,
                              # the warm start found the same spikes as a cold one
                              "warm_vs_cold_eigenvalue_rel_diff": rel_err(
                                  values.numpy(), cold.eigenvalues.numpy()),
                              "cold_matvecs_without_guard": unguarded_cold(
                                  op, k, TOL, random_state + 1, cold.n_matvec),
                              "other_tols": other_tols(op, k, previous, random_state + 1),
                              **previous_span_quality(op, previous)})
        previous = vectors
    return refreshes, seen, surgeon


def other_tols(op, k, previous, random_state):
    """The same refresh, warm and cold, at tolerances either side of TOL."""
    out = {}
    for tol in (1e-2, 1e-4):
        warm = LanczosSpectrum(tol=tol, random_state=random_state).compute(op, k, init=previous)
        cold = LanczosSpectrum(tol=tol, random_state=random_state).compute(op, k)
        out[f"{tol:g}"] = {"warm_matvecs": warm.n_matvec, "cold_matvecs": cold.n_matvec,
                           "ratio": warm.n_matvec / cold.n_matvec}
    return out


def unguarded_cold(op, k, tol, random_state, guarded):
    """Products after which a cold start's pairs first all meet ``tol``, had it
    no ``2k`` guard: runs capped at m = k, k+1, ... products are prefixes of
    the same seeded run, so the first converged cap is that count (a
    diagnostic of what the guard costs; these products are not counted)."""
    import warnings

    for m in range(k, guarded + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec = LanczosSpectrum(tol=tol, max_iter=m, random_state=random_state).compute(op, k)
        if bool(spec.converged.all()):
            return m
    return guarded


def previous_span_quality(op, Q):
    """How far the previous spikes are from the new ones: residuals (÷ λ₁) of the
    Rayleigh–Ritz pairs of span(Q) at the new θ, and the singular values of their
    residual block (diagnostics; these products are not counted anywhere)."""
    Q, _ = torch.linalg.qr(Q)
    HQ = torch.stack([op.matvec(Q[:, i]) for i in range(Q.shape[1])], dim=1)
    T = (Q.T @ HQ).double()
    theta, S = torch.linalg.eigh(0.5 * (T + T.T))
    theta, S = theta.flip(0), S.flip(1).to(Q.dtype)
    R = HQ @ S - (Q @ S) * theta.to(Q.dtype)
    lam1 = float(theta.abs().max())
    return {"previous_span_rr_residuals": (torch.linalg.vector_norm(R, dim=0) / lam1).tolist(),
            "previous_span_residual_singular_values": (torch.linalg.svdvals(R) / lam1).tolist()}


def warm_summary(refreshes, seen, surgeon, k):
    first = seen[0][2]
    return {
        "k": k, "tol": TOL, "steps": len(surgeon.history_),
        "accepted_steps": int(sum(h["accepted"] for h in surgeon.history_)),
        "first_spectrum_matvecs": first,
        "refreshes": refreshes,
        "mean_refresh_ratio": (float(np.mean([r["ratio"] for r in refreshes]))
                               if refreshes else None),
        "target_refresh_ratio": 0.5,
        "fit_n_hvp": surgeon.n_hvp_,
        "fit_n_hvp_if_cold": first + sum(r["cold_matvecs"] for r in refreshes),
        "fit_n_hvp_without_refreshes": first,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--counts-only", action="store_true",
                        help="only Lanczos against power iteration (products and errors)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    env = setup(args.threads)
    model, splits = trained_lt_mnist_mlp()
    X, y = splits.X_train.float(), splits.y_train
    k = splits.n_classes - 1
    ref = LanczosSpectrum(tol=1e-8, random_state=1).compute(HessianOperator(model, X, y), k + 3)
    reference = ref.eigenvalues.numpy()[:k]
    if args.counts_only:
        emit({"benchmark": "spectrum matvec counts", "environment": env,
              "matvecs": matvec_counts(model, X, y, k, reference),
              "reference_eigenvalues": reference.tolist()}, args.output)
        return
    ours_seconds, _, n = time_hessrebal(model, X, y, k)  # warm-up of autograd
    ours_seconds, ours_values, n = time_hessrebal(model, X, y, k)
    result = {
        "benchmark": "spectrum", "environment": env,
        "problem": {"model": "MLP 784-128-64-10, trained on mnist-lt (ratio 100)",
                    "hessian_on": "training split", "n_samples": int(X.shape[0]),
                    "n_parameters": sum(p.numel() for p in model.parameters()),
                    "top_eigenvalues": ref.eigenvalues.numpy().tolist()},
        "matvecs": matvec_counts(model, X, y, k, reference),
        "hessrebal_lanczos": {"seconds": ours_seconds, "matvecs": n,
                              "eigenvalue_rel_err": rel_err(ours_values, reference)},
    }
    if not args.skip_peers:
        result["peers"] = peers(model, X, y, k, reference, ours_seconds)
    result["warm_start"] = warm_summary(*warm_refreshes(model, splits, k), k)
    emit(result, args.output)


if __name__ == "__main__":
    main()
