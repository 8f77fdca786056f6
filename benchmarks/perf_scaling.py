"""Matvec time and peak memory as the data grows: N, 2N, 4N samples read from a
DataLoader (4N = 50,000 by default), each size in its own process so that its
peak RSS is its own.

    python benchmarks/perf_scaling.py [--n 12500] [--cache-mib 16] [--threads 1]

The graph cache budget is explicit (``cache_bytes``) and smaller than the
graphs of even the smallest N, so beyond the budget chunks are rebuilt at every
product and memory must stay flat. The samples are made on the fly from 1,000
MNIST digits (index modulo 1,000), so the data themselves take no memory
either and the RSS measures the operator. A control run at N with a budget
that keeps every graph shows that the probe sees the memory when it is used.
Prints JSON: seconds per matvec, seconds per sample, peak RSS and the
operator's own increment over the RSS before it was built.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from _perf import emit
from torch.utils.data import DataLoader, Dataset


class Cycled(Dataset):
    """``n`` samples cycling through a small base set (no memory grows with n)."""

    def __init__(self, X, y, n):
        self.X, self.y, self.n = X, y, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        j = i % self.X.shape[0]
        return self.X[j], self.y[j]


def rss_mib() -> float:
    """Peak RSS of this process (MiB) since the last :func:`reset_peak`."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux), so that the peak measured after
    it belongs to the operator and not to loading the data set."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def child(n: int, cache_bytes: int, threads: int, batch_size: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    from hessrebal.curvature import HessianOperator
    from hessrebal.datasets import load_long_tailed
    from hessrebal.models import MLP

    splits = load_long_tailed("mnist", random_state=0)
    base_X, base_y = splits.X_train[:1000].float(), splits.y_train[:1000]
    torch.manual_seed(0)
    model = MLP(784, (256, 128), 10).eval()
    loader = DataLoader(Cycled(base_X, base_y, n), batch_size=batch_size, shuffle=False)
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    # Warm up autograd's double backward on a tiny operator before the baseline.
    HessianOperator(model, base_X[:8], base_y[:8], cache_bytes=0).matvec(v)
    peak_reset = reset_peak()
    before = rss_mib()
    op = HessianOperator(model, loader, cache_bytes=cache_bytes)
    first = time.perf_counter()
    op.matvec(v)
    first = time.perf_counter() - first
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        op.matvec(v)
        times.append(time.perf_counter() - start)
    grad_start = time.perf_counter()
    op.gradient()
    grad = time.perf_counter() - grad_start
    peak = rss_mib()
    return {"n_samples": n, "seconds_per_matvec": min(times), "first_matvec_seconds": first,
            "seconds_per_sample": min(times) / n, "gradient_seconds": grad,
            "peak_rss_mib": peak, "rss_before_operator_mib": before,
            "operator_rss_increment_mib": peak - before,
            "peak_reset": peak_reset,
            "cache_bytes": cache_bytes, "cache_used": op.cache_used,
            "cached_chunks": op.n_cached_chunks, "n_chunks": len(loader)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12500)
    parser.add_argument("--cache-mib", type=float, default=16.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--control-mib", type=float, default=2048.0,
                        help="budget of a control run at N that keeps every graph (0: none)")
    parser.add_argument("--output", default=None)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cache_bytes = int(args.cache_mib * 2**20)
    if args.child is not None:
        print(json.dumps(child(args.child, cache_bytes, args.threads, args.batch_size,
                               args.repeats)))
        return
    rows = []
    for n in (args.n, 2 * args.n, 4 * args.n):
        cmd = [sys.executable, __file__, "--child", str(n), "--cache-mib", str(args.cache_mib),
               "--threads", str(args.threads), "--batch-size", str(args.batch_size),
               "--repeats", str(args.repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    control = None
    if args.control_mib > 0:
        # The probe must see memory when there is some: N once more, with a budget
        # large enough to keep every graph.
        cmd = [sys.executable, __file__, "--child", str(args.n), "--cache-mib",
               str(args.control_mib), "--threads", str(args.threads), "--batch-size",
               str(args.batch_size), "--repeats", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        control = json.loads(proc.stdout.strip().splitlines()[-1])
    t0, m0 = rows[0]["seconds_per_matvec"], rows[0]["peak_rss_mib"]
    result = {
        "benchmark": "scaling", "threads": args.threads, "batch_size": args.batch_size,
        "cache_bytes": cache_bytes, "model": "MLP 784-256-128-10", "data": "DataLoader",
        "rows": rows,
        "time_ratio_vs_n": [r["seconds_per_matvec"] / t0 for r in rows],
        "expected_time_ratio": [1, 2, 4],
        "peak_rss_ratio_vs_n": [r["peak_rss_mib"] / m0 for r in rows],
        "peak_rss_growth_mib": rows[-1]["peak_rss_mib"] - m0,
        "control_all_graphs_kept": control,
    }
    emit(result, args.output)


if __name__ == "__main__":
    main()
