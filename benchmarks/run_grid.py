"""Run the benchmark grid of docs/benchmarks.md: digits-lt and mnist-lt at
imbalance ratios 1, 10, 50 and 100, every method, 5 seeds each.

One JSON per cell in benchmarks/results/ (``<dataset>_r<ratio>.json``); a cell
whose file already holds every requested seed is skipped, so the script can be
stopped and rerun. Each cell is the command line ``hessrebal bench ...``
printed before it runs (one thread: measured 5x faster than two on a busy
2-core machine). ``python benchmarks/make_tables.py`` then writes the tables.

Usage::

    python benchmarks/run_grid.py [--seeds 5] [--datasets digits-lt mnist-lt]
                                  [--ratios 1 10 50 100]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def cell_path(dataset: str, ratio: float) -> Path:
    return RESULTS / f"{dataset}_r{ratio:g}.json"


def done_seeds(path: Path) -> set[int]:
    if not path.exists():
        return set()
    try:
        rows = json.loads(path.read_text())["rows"]
    except (ValueError, KeyError):
        return set()
    methods = {r["method"] for r in rows}
    return {s for s in {r["seed"] for r in rows}
            if sum(r["seed"] == s for r in rows) == len(methods)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--datasets", nargs="+", default=["digits-lt", "mnist-lt"])
    p.add_argument("--ratios", nargs="+", type=float, default=[1, 10, 50, 100])
    args = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for dataset in args.datasets:
        for ratio in args.ratios:
            path = cell_path(dataset, ratio)
            if done_seeds(path) >= set(range(args.seeds)):
                print(f"skip {path.name}: {args.seeds} seeds done", flush=True)
                continue
            cmd = [sys.executable, "-m", "hessrebal", "bench", "--dataset", dataset,
                   "--imbalance-ratio", f"{ratio:g}", "--seeds", str(args.seeds),
                   "--threads", "1", "--output", str(path.relative_to(Path.cwd())
                                                     if path.is_relative_to(Path.cwd())
                                                     else path)]
            print("$ " + shlex.join(["hessrebal", *cmd[3:]]), flush=True)
            t0 = time.time()
            rc = subprocess.call(cmd)
            print(f"  -> rc {rc} in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
