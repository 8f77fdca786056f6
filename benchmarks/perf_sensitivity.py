"""Cost of one sensitivity estimate (one amplitude step of the surgery) in
forward passes over the sensitivity data.

    python benchmarks/perf_sensitivity.py [--threads 1] [--k 9] [--output FILE]

The surrogate (``SoftmaxSurrogateSensitivity``) computes ``S = J_s Q`` with
``k`` forward-mode JVPs vectorised by ``vmap``: the target is about ``k + 1``
forward passes' worth of work (the primal plus ``k`` tangents). Finite
differences (``FiniteDifferenceSensitivity``) evaluate ``2k`` perturbed models;
``predictions_many`` batches them through ``vmap`` instead of ``2k`` separate
forward passes, which is compared here with the loop it replaces. Prints JSON.
"""

from __future__ import annotations

import argparse

import torch
from _perf import emit, interleaved, setup, trained_lt_mnist_mlp

from hessrebal._data import as_data
from hessrebal._model import FunctionalModel, predictions_many
from hessrebal.parameters import ParameterSpace
from hessrebal.sensitivity import FiniteDifferenceSensitivity, SoftmaxSurrogateSensitivity


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--k", type=int, default=9)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    env = setup(args.threads)
    model, splits = trained_lt_mnist_mlp()
    space = ParameterSpace(model)
    fmodel = FunctionalModel(model, space)
    theta = fmodel.initial_theta()
    data = as_data(splits.X_val.float(), splits.y_val)
    C, k, bs = splits.n_classes, args.k, args.batch_size
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(space.dim, k, generator=g))
    budget = 0.05
    thetas = torch.cat([theta[None] + budget * Q.T, theta[None] - budget * Q.T])

    def forward():
        with torch.no_grad():
            for x, _ in data.chunks(bs, fmodel.device, fmodel.dtype):
                fmodel.logits(theta, x)

    def fd_loop():
        with torch.no_grad():
            for x, _ in data.chunks(bs, fmodel.device, fmodel.dtype):
                for t in thetas:
                    fmodel.logits(t, x).argmax(1)

    surrogate = SoftmaxSurrogateSensitivity(kind="margin")
    fd = FiniteDifferenceSensitivity()
    fns = {
        "forward": forward,
        "surrogate": lambda: surrogate.estimate(fmodel, theta, Q, data, C, budget=budget,
                                                batch_size=bs),
        "finite_difference": lambda: fd.estimate(fmodel, theta, Q, data, C, budget=budget,
                                                 batch_size=bs),
        "fd_vmapped_forwards": lambda: predictions_many(fmodel, thetas, data, bs),
        "fd_loop_forwards": fd_loop,
    }
    for fn in fns.values():
        fn()  # warm-up
    times = interleaved(fns, args.rounds)
    best = {name: min(t) for name, t in times.items()}
    f = best["forward"]
    emit({
        "benchmark": "sensitivity", "environment": env, "k": k, "n_classes": C,
        "n_samples": data.n_samples, "batch_size": bs,
        "forward_seconds": f,
        "surrogate_seconds": best["surrogate"],
        "surrogate_in_forward_passes": best["surrogate"] / f,
        "surrogate_target_forward_passes": k + 1,
        "finite_difference_seconds": best["finite_difference"],
        "finite_difference_in_forward_passes": best["finite_difference"] / f,
        "finite_difference_models": 2 * k,
        "fd_forwards_vmapped_seconds": best["fd_vmapped_forwards"],
        "fd_forwards_loop_seconds": best["fd_loop_forwards"],
        "fd_vmap_speedup": best["fd_loop_forwards"] / best["fd_vmapped_forwards"],
    }, args.output)


if __name__ == "__main__":
    main()
