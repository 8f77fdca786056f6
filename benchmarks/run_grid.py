"""Run the benchmark grid of docs/benchmarks.md.

- MLP: digits-lt and mnist-lt at imbalance ratios 1, 10, 50 and 100, every
  method, 5 seeds, with 10, 20 and 40 validation images per class on
  digits-lt (40 is all its split holds) and 10, 20, 50 and 100 on mnist-lt.
  The validation sizes are nested subsets of one validation split, so every
  size of a seed uses the same trained checkpoint.
- SmallCNN (``--model cnn``) on mnist-lt at ratios 1 and 100, 20 and 50
  validation images per class, 3 seeds, the main post-hoc methods only, the
  surgeon's Hessian on 256 training images and ``refresh_spectrum=0`` (one
  spectrum per fit): a CNN surgery with the MLP's settings takes minutes per
  fit on this 2-core CPU.

One JSON per cell in benchmarks/results/ (``<dataset>[-cnn]_r<ratio>.json``);
a cell whose file already holds every requested seed is skipped, so the script
can be stopped and rerun. Each cell is the command line ``hessrebal bench ...``
printed before it runs (one thread each; ``--jobs 2`` runs two cells at once).
``python benchmarks/make_tables.py`` then writes the tables.

Usage::

    python benchmarks/run_grid.py [--jobs 2] [--only mlp|cnn]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {"digits-lt": [10, 20, 40], "mnist-lt": [10, 20, 50, 100]}
CNN_METHODS = ["baseline", "logit_adjustment", "class_bias", "last_layer_retraining",
               "spectral_surgery", "logit_adjustment+spectral_surgery"]


def cell_path(dataset: str, ratio: float, model: str = "mlp") -> Path:
    tag = "" if model == "mlp" else f"-{model}"
    return RESULTS / f"{dataset}{tag}_r{ratio:g}.json"


def done_seeds(path: Path) -> set[int]:
    if not path.exists():
        return set()
    try:
        rows = json.loads(path.read_text())["rows"]
    except (ValueError, KeyError):
        return set()
    per_seed = {(r["method"], r.get("val_per_class")) for r in rows}
    return {s for s in {r["seed"] for r in rows}
            if sum(r["seed"] == s for r in rows) == len(per_seed)}


def cells(only: str | None) -> list[tuple[list[str], Path, int]]:
    out = []
    if only in (None, "mlp"):
        for dataset in ("mnist-lt", "digits-lt"):
            for ratio in (100, 50, 10, 1):
                path = cell_path(dataset, ratio)
                args = ["--dataset", dataset, "--imbalance-ratio", f"{ratio:g}", "--seeds", "5",
                        "--validation-sizes", *map(str, SIZES[dataset])]
                out.append((args, path, 5))
    if only in (None, "cnn"):
        for ratio in (100, 1):
            path = cell_path("mnist-lt", ratio, "cnn")
            args = ["--dataset", "mnist-lt", "--imbalance-ratio", f"{ratio:g}", "--seeds", "3",
                    "--model", "cnn", "--curvature-samples", "256", "--refresh-spectrum", "0",
                    "--validation-sizes", "20", "50", "--methods", *CNN_METHODS]
            out.append((args, path, 3))
    return out


def run_cell(args: list[str], path: Path, seeds: int) -> int:
    if done_seeds(path) >= set(range(seeds)):
        print(f"skip {path.name}: {seeds} seeds done", flush=True)
        return 0
    rel = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
    cmd = [sys.executable, "-m", "hessrebal", "bench", *args, "--threads", "1", "--quiet",
           "--output", str(rel)]
    print("$ " + shlex.join(["hessrebal", *cmd[3:]]), flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd, stdout=subprocess.DEVNULL)
    print(f"  -> {path.name}: rc {rc} in {time.time() - t0:.0f} s", flush=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--only", choices=["mlp", "cnn"], default=None)
    args = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        codes = list(pool.map(lambda c: run_cell(*c), cells(args.only)))
    return max(codes, default=0)


if __name__ == "__main__":
    sys.exit(main())
