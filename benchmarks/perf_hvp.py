"""One Hessian-vector product over a data set against one full gradient over
the same data and chunks, on the reference MLP and SmallCNN.

Prints JSON: per model, the HVP/gradient ratio (``best``: fastest HVP over
fastest gradient; ``median``: median of the per-round ratios, the robust one
on a shared machine) with the operator's defaults
(first-order graphs kept: ``cached``), beyond the cache budget
(``cache_bytes=0``: ``uncached``), the cost of the first product (which builds
the graphs), the uncached product written with ``torch.func`` (jvp of grad:
``ratio_jvp_of_grad``), the time per sample of a kept product across chunk
sizes, and, for the SmallCNN, the kept product with its graphs built with
autograd's generic BatchNorm, with BatchNorm as an affine map, and folded
(the operator's way; ``ratio_cached_batchnorm``).

    python benchmarks/perf_hvp.py [--threads 1] [--rounds 5] [--runs 1] [--output FILE]

With ``--runs N`` the whole measurement is repeated N times in the process
(fresh models, same seeds): ``results`` holds the first run, ``runs`` every
run's ratios and chunk-size timings, and ``spread`` the ratios' minimum and
maximum, so that a verdict against a target can be read with the run-to-run
variation beside it.

The gradient is the cheaper of ``HessianOperator.gradient()`` and a plain
``model(x)`` / ``loss.backward()`` loop over the same chunks, so the ratio is
against the fastest gradient a user would write.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _perf import emit, interleaved, ratio, setup, timed
from torch.overrides import TorchFunctionMode

from hessrebal import curvature
from hessrebal.curvature import HessianOperator
from hessrebal.datasets import load_long_tailed
from hessrebal.models import MLP, SmallCNN


def plain_gradient(model, X, y, batch_size):
    model.zero_grad(set_to_none=True)
    for start in range(0, X.shape[0], batch_size):
        x, t = X[start:start + batch_size], y[start:start + batch_size]
        F.cross_entropy(model(x), t, reduction="sum").backward()
    return [p.grad for p in model.parameters()]


def jvp_of_grad(model, X, y, batch_size):
    """The uncached product written with ``torch.func``: forward mode over
    reverse mode, chunk by chunk, as a function of the flat vector ``v``."""
    from torch.func import functional_call, grad, jvp

    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p, x, t):
        return F.cross_entropy(functional_call(model, {**p, **buffers}, (x,)), t,
                               reduction="sum")

    def hvp(v):
        parts = torch.split(v, [p.numel() for p in params.values()])
        tangent = {n: t.view_as(p) for (n, p), t in zip(params.items(), parts)}
        out = None
        for start in range(0, X.shape[0], batch_size):
            x, t = X[start:start + batch_size], y[start:start + batch_size]
            _, hv = jvp(lambda p, x=x, t=t: grad(loss)(p, x, t), (params,), (tangent,))
            out = hv if out is None else {k: out[k] + hv[k] for k in out}
        return out

    return hvp


class _GenericBatchNorm(TorchFunctionMode):
    """Leaves every call alone: autograd's own BatchNorm formulas."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _AffineBatchNorm(curvature._FoldEvalBatchNorm):
    """Eval-mode BatchNorm as ``x·s + t``, never folded into the layer before it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in curvature._CONVS or func is F.linear:
            return func(*args, **(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs)


def batchnorm_variants(model, X, y, batch_size, rounds, v):
    """Kept-graph HVP / gradient with the graphs built three ways: autograd's
    generic BatchNorm, BatchNorm as an affine map, and folded (the operator's)."""
    original = curvature._FoldEvalBatchNorm
    ops = {}
    try:
        for name, mode in (("generic", _GenericBatchNorm), ("affine", _AffineBatchNorm),
                           ("folded", original)):
            curvature._FoldEvalBatchNorm = mode
            ops[name] = HessianOperator(model, X, y, batch_size=batch_size)
            ops[name].matvec(v)  # builds and keeps every chunk's graph in this mode
    finally:
        curvature._FoldEvalBatchNorm = original
    fns = {"gradient": lambda: plain_gradient(model, X, y, batch_size)}
    fns.update({name: (lambda op=op: op.matvec(v)) for name, op in ops.items()})
    times = interleaved(fns, rounds)
    return {name: ratio(times, name, "gradient") for name in ops}


def measure(name, model, X, y, batch_size, rounds, chunk_sizes):
    model.eval()
    # The first double backward of a process pays a one-time set-up: not a product's cost.
    warm = HessianOperator(model, X[:8], y[:8], cache_bytes=0)
    warm.matvec(torch.ones(warm.shape[0]))
    cached = HessianOperator(model, X, y, batch_size=batch_size)
    uncached = HessianOperator(model, X, y, batch_size=batch_size, cache_bytes=0)
    v = torch.randn(cached.shape[0], generator=torch.Generator().manual_seed(0))
    first = timed(lambda: cached.matvec(v))  # builds and keeps every chunk's graph
    uncached.matvec(v)  # warm-up
    functorch_hvp = jvp_of_grad(model, X, y, batch_size)
    functorch_hvp(v)  # warm-up
    times = interleaved({
        "gradient_operator": cached.gradient,
        "gradient_plain": lambda: plain_gradient(model, X, y, batch_size),
        "hvp_cached": lambda: cached.matvec(v),
        "hvp_uncached": lambda: uncached.matvec(v),
        "hvp_jvp_of_grad": lambda: functorch_hvp(v),
    }, rounds)
    best_grad = ("gradient_plain" if min(times["gradient_plain"]) < min(times["gradient_operator"])
                 else "gradient_operator")
    times["gradient"] = times[best_grad]
    out = {
        "model": name,
        "n_samples": int(X.shape[0]),
        "n_parameters": cached.shape[0],
        "batch_size": batch_size,
        "n_chunks": -(-X.shape[0] // batch_size),
        "cache_bytes_used": cached.cache_used,
        "cached_chunks": cached.n_cached_chunks,
        "gradient_seconds": min(times["gradient"]),
        "gradient_reference": best_grad,
        "hvp_cached_seconds": min(times["hvp_cached"]),
        "hvp_uncached_seconds": min(times["hvp_uncached"]),
        "ratio_cached": ratio(times, "hvp_cached", "gradient"),
        "ratio_uncached": ratio(times, "hvp_uncached", "gradient"),
        "ratio_first_product": first / min(times["gradient"]),
        "ratio_jvp_of_grad": ratio(times, "hvp_jvp_of_grad", "gradient"),
    }
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        out["ratio_cached_batchnorm"] = batchnorm_variants(model, X, y, batch_size, rounds, v)
    per_sample = {}
    for bs in chunk_sizes:
        op = HessianOperator(model, X, y, batch_size=bs)
        op.matvec(v)
        per_sample[str(bs)] = {
            "cached_us_per_sample": 1e6 * min(timed(lambda op=op: op.matvec(v))
                                              for _ in range(max(2, rounds // 2))) / X.shape[0]}
    out["chunk_sizes"] = per_sample
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n-mlp", type=int, default=2400)
    parser.add_argument("--n-cnn", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    env = setup(args.threads)
    splits = load_long_tailed("mnist", random_state=0)
    X = torch.cat([splits.X_train, splits.X_val, splits.X_test]).float()
    y = torch.cat([splits.y_train, splits.y_val, splits.y_test])
    runs = []
    for _ in range(args.runs):
        torch.manual_seed(0)
        runs.append([
            measure("MLP(784-256-128-10)", MLP(784, (256, 128), 10), X[:args.n_mlp],
                    y[:args.n_mlp], args.batch_size, args.rounds, (128, 256, 512, 1024)),
            measure("SmallCNN(1x28x28, width 16)", SmallCNN(1, 28, 10),
                    X[:args.n_cnn].reshape(-1, 1, 28, 28), y[:args.n_cnn],
                    args.batch_size, args.rounds, (64, 128, 256, 512)),
        ])
    out = {"benchmark": "hvp_vs_gradient", "environment": env,
           "targets": {"ratio_cached": 1.5, "ratio_uncached": 2.5}, "results": runs[0]}
    if args.runs > 1:
        keys = ("ratio_cached", "ratio_uncached", "ratio_jvp_of_grad")
        out["runs"] = [{r["model"]: {**{k: r[k] for k in (*keys, "ratio_first_product")},
                                     "ratio_cached_batchnorm": r.get("ratio_cached_batchnorm"),
                                     "chunk_us_per_sample": {
                                         bs: c["cached_us_per_sample"]
                                         for bs, c in r["chunk_sizes"].items()}}
                        for r in run} for run in runs]
        out["spread"] = {
            r["model"]: {k: {stat: [min(run[i][k][stat] for run in runs),
                                    max(run[i][k][stat] for run in runs)]
                             for stat in ("median", "best")} for k in keys}
            for i, r in enumerate(runs[0])}
    emit(out, args.output)


if __name__ == "__main__":
    main()
