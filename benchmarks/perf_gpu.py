"""The GPU check, prepared to run as is on a CUDA machine in a few minutes:
a CIFAR-shaped ResNet-18 (``hessrebal.models.resnet18_cifar``), 10,000
validation samples, the HVP/gradient ratio on them and the time of a full
``SpectralSurgeon.fit``.

    python benchmarks/perf_gpu.py [--device cuda] [--n-val 10000] [--output FILE]
    python benchmarks/perf_gpu.py --device cpu --quick      # a dry run of the script

The data are synthetic (nothing is downloaded): 32×32×3 images whose class is
the argmax of a fixed random projection of a blurred copy, so that a short
training run (``--epochs``) gives a classifier with real structure; the
training set is long-tailed (ratio 10). Prints JSON: seconds of one gradient,
one kept-graph HVP and one uncached HVP over the validation data (same chunks),
their ratios, the fit's time, products and whether everything stayed on the
device.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from _perf import emit, setup

from hessrebal import SpectralSurgeon
from hessrebal.curvature import HessianOperator
from hessrebal.models import resnet18_cifar, train_model


def synthetic(n, n_classes, g, device, imbalance=1.0):
    proj = torch.randn(3 * 8 * 8, n_classes, generator=torch.Generator().manual_seed(123))
    X = torch.randn(n, 3, 32, 32, generator=g)
    feats = F.avg_pool2d(X, 4).flatten(1)
    y = (feats @ proj).argmax(1)
    if imbalance > 1:
        keep_p = imbalance ** (-y.float() / (n_classes - 1))
        keep = torch.rand(n, generator=g) < keep_p
        X, y = X[keep], y[keep]
    return X.to(device), y.to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure_products(model, X, y, batch_size, device, cache_bytes=None):
    """One gradient, one kept-graph HVP and one uncached HVP over ``X`` (same chunks)."""
    cached = HessianOperator(model, X, y, batch_size=batch_size, cache_bytes=cache_bytes)
    uncached = HessianOperator(model, X, y, batch_size=batch_size, cache_bytes=0)
    v = torch.randn(cached.shape[0], device=device)
    first = timed(lambda: cached.matvec(v), device, repeats=1)
    grad = timed(cached.gradient, device)
    hvp_cached = timed(lambda: cached.matvec(v), device)
    hvp_uncached = timed(lambda: uncached.matvec(v), device, repeats=2)
    return {"gradient_seconds": grad, "hvp_cached_seconds": hvp_cached,
            "hvp_uncached_seconds": hvp_uncached, "first_hvp_seconds": first,
            "ratio_cached": hvp_cached / grad, "ratio_uncached": hvp_uncached / grad,
            "cache_bytes": cached.cache_bytes, "cache_used": cached.cache_used,
            "cached_chunks": cached.n_cached_chunks,
            "n_chunks": -(-X.shape[0] // batch_size)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--n-val", type=int, default=10000)
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache-gib", type=float, default=None,
                        help="graph cache budget (default: the operator's)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a dry run")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.n_val, args.n_train, args.epochs, args.max_steps = 64, 128, 1, 1
        args.batch_size = min(args.batch_size, 32)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: run with --device cpu --quick for a dry run.")
    env = setup(args.threads or torch.get_num_threads())
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    g = torch.Generator().manual_seed(0)
    X_train, y_train = synthetic(args.n_train, 10, g, device, imbalance=10.0)
    X_val, y_val = synthetic(args.n_val, 10, g, device)
    model = resnet18_cifar(10).to(device)
    start = time.perf_counter()
    train_model(model, X_train, y_train, epochs=args.epochs, batch_size=256, lr=2e-3,
                random_state=0, device=device)
    train_seconds = time.perf_counter() - start
    model.eval()

    cache_bytes = None if args.cache_gib is None else int(args.cache_gib * 2**30)
    products = measure_products(model, X_val, y_val, args.batch_size, device, cache_bytes)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    sync(device)
    start = time.perf_counter()
    surgeon = SpectralSurgeon(random_state=0, max_steps=args.max_steps,
                              n_components=2 if args.quick else None,
                              batch_size=args.batch_size).fit(model, X_val, y_val)
    sync(device)
    fit_seconds = time.perf_counter() - start
    with torch.no_grad():
        acc = [(surgeon.transform(model)(X_val[i:i + 1000]).argmax(1) == y_val[i:i + 1000])
               .float().sum().item() for i in range(0, X_val.shape[0], 1000)]
    emit({
        "benchmark": "gpu", "environment": env, "device": str(device),
        "model": "resnet18_cifar", "n_parameters": sum(p.numel() for p in model.parameters()),
        "n_val": int(X_val.shape[0]), "n_train": int(X_train.shape[0]),
        "batch_size": args.batch_size, "train_seconds": train_seconds,
        **products,
        "fit_seconds": fit_seconds, "fit_n_hvp": surgeon.n_hvp_,
        "fit_eigenvalues": surgeon.eigenvalues_,
        "fit_accepted_steps": int(sum(h["accepted"] for h in surgeon.history_)),
        "eigenvectors_device": str(surgeon.eigenvectors_.device),
        "perturbation_device": str(surgeon.perturbation_.device),
        "val_accuracy_after": float(np.sum(acc) / X_val.shape[0]),
        "peak_gpu_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                                if device.type == "cuda" else None),
    }, args.output)


if __name__ == "__main__":
    main()
