"""Helpers shared by the side-experiment scripts in benchmarks/ (not part of the library)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
IMAGES = HERE.parent / "docs" / "images"


def setup(threads: int = 1) -> None:
    """One thread: small models run faster on it, and the CPU is shared."""
    torch.set_num_threads(threads)
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def reference_checkpoint(dataset: str, splits: Any, seed: int) -> tuple[torch.nn.Module, Any]:
    """The benchmark's model for ``splits``, trained from scratch with
    ``hessrebal bench``'s settings for ``dataset``, and the seeded training
    sample where its Hessian is taken: ``(model, curvature_data)``."""
    from hessrebal.bench import curvature_sample, default_settings, train_reference_model

    settings = default_settings(dataset)
    model, _ = train_reference_model(splits, seed, settings)
    return model, curvature_sample(splits, settings.curvature_samples, seed)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _safe(value: Any) -> Any:
    from hessrebal.bench import json_safe

    return json_safe(value)


def _cpu_model() -> str | None:
    """The CPU's name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    import platform

    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _benchmarks_dirty() -> bool | None:
    """Whether ``git status`` reports changes to the scripts in benchmarks/."""
    import subprocess

    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "*.py"], cwd=HERE,
                             capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip())


def provenance() -> dict[str, Any]:
    """Where and when a result was measured, for every JSON a benchmark writes.

    ``git_commit`` (``+dirty`` when the library under ``hessrebal/`` had
    uncommitted changes) and ``benchmarks_dirty`` (the same for the scripts
    in ``benchmarks/``), the UTC ``date``, the command line, the hessrebal,
    torch and Python versions, torch's thread count, the CPU and the load
    average (1, 5 and 15 minutes) at the time of the call.
    """
    import datetime
    import os
    import platform

    import hessrebal
    from hessrebal.bench import git_commit

    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {
        "git_commit": git_commit(),
        "benchmarks_dirty": _benchmarks_dirty(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "hessrebal": hessrebal.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "machine": platform.machine(),
        "load_average": load,
    }


def write_json(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    import hessrebal
    from hessrebal.bench import git_commit

    data = {**data, "hessrebal": {"path": str(Path(hessrebal.__file__).parent),
                                  "git_commit": git_commit(),
                                  "torch_threads": torch.get_num_threads()},
            "provenance": provenance()}
    path.write_text(json.dumps(_safe(data), indent=1, allow_nan=False) + "\n")
    return path


def run_cells(args: Any, label: str, run_cell: Any, key: str = "cells") -> list[dict[str, Any]]:
    """``run_cell(dataset, ratio, seed)`` over ``args.datasets × args.ratios × seeds``.

    The JSON (``{"settings": ..., key: [...]}``) is rewritten after every
    cell, so an interrupted run keeps what it measured.
    """
    cells: list[dict[str, Any]] = []
    for dataset in args.datasets:
        for ratio in args.ratios:
            for seed in range(args.seeds):
                log(f"{label} {dataset} r={ratio:g} seed {seed}")
                cells.append(run_cell(dataset, ratio, seed))
                write_json(args.name, {"settings": vars(args), key: cells})
    return cells


def variant_table(runs: list[dict[str, Any]], variants: Any, reference: str,
                  columns: Any, header: str) -> str:
    """Markdown rows, one per (dataset, ratio, validation size, variant).

    ``runs`` are per-seed results with ``dataset``, ``ratio`` and ``cells``
    (dicts with ``n_per_class``, ``variant`` and metric keys). Each row gives
    mean ± std over the seeds of every ``(key, signed)`` in ``columns``, then
    the seeds on which the variant's ``balanced_accuracy`` beat ``reference``'s
    (and the ties). ``header`` is the table's first two lines.
    """
    lines = [header]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["ratio"]), []).append(r)
    for (dataset, ratio), rs in groups.items():
        for n in sorted({c["n_per_class"] for r in rs for c in r["cells"]}):
            def col(variant, key, n=n, rs=rs):
                return [next(c[key] for c in r["cells"]
                             if c["n_per_class"] == n and c["variant"] == variant) for r in rs]
            ref = col(reference, "balanced_accuracy")
            for variant in variants:
                mine = col(variant, "balanced_accuracy")
                wins = sum(a > b + 1e-12 for a, b in zip(mine, ref))
                ties = sum(abs(a - b) <= 1e-12 for a, b in zip(mine, ref))
                cells = [mean_std(col(variant, key), signed=signed) for key, signed in columns]
                paired = "–" if variant == reference else f"{wins}/{len(rs)} ({ties} tied)"
                lines.append(f"| {dataset} r={ratio:g} | {n} | {variant} | "
                             + " | ".join(cells) + f" | {paired} |")
    return "\n".join(lines)


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reruns ``benchmarks/<script>`` with these arguments."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"benchmarks/{script}", *args])


def write_text(name: str, text: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(text)
    return path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (the scripts only write files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Lay out, write (dpi 110, creating the folder) and close ``fig``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mean_std(values: Any, scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
    """``mean ± std`` (sample std) of the finite values, scaled (percent by default)."""
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return "–"
    sign = "+" if signed else ""
    text = f"{a.mean() * scale:{sign}.{digits}f}"
    if a.size > 1:
        text += f" ± {a.std(ddof=1) * scale:.{digits}f}"
    return text
