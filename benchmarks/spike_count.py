"""Spike count versus the number of classes C: is there a gap after C − 1?

For each digit set and C ∈ {3, 5, 7, 10}, a seeded choice of C classes is
kept (balanced training data, labels renumbered), the benchmark's MLP is
trained on them from scratch, and the top 2C + 2 eigenvalues of the loss
Hessian on the training sample are found by Lanczos (tol 1e-4). Reported:
the eigengap ``λ_{C−1}/λ_C`` (the paper's C − 1 spikes), the next one
``λ_C/λ_{C+1}`` (Papyan's C-th outlier), and ``count_spikes`` (deepest gap
≥ 1.5). Writes ``benchmarks/results/spike_count.json``, ``spike_count.md``
and ``docs/images/spike_count.png``.

Usage::

    python benchmarks/spike_count.py [--datasets mnist digits] [--classes 3 5 7 10]
                                     [--seeds 3]
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch
from _common import (
    IMAGES,
    log,
    mean_std,
    pyplot,
    reference_checkpoint,
    save_figure,
    setup,
    write_json,
    write_text,
)

from hessrebal.curvature import HessianOperator
from hessrebal.datasets import load_long_tailed
from hessrebal.spectrum import LanczosSpectrum, count_spikes


def class_subset(splits, C, seed):
    rng = np.random.default_rng(10_000 + seed)
    keep = np.sort(rng.permutation(splits.n_classes)[:C])
    remap = torch.full((splits.n_classes,), -1, dtype=torch.int64)
    remap[torch.as_tensor(keep)] = torch.arange(C)
    parts = {}
    for split in ("train", "val", "test"):
        X, y = splits.data(split)
        mask = remap[y] >= 0
        parts[f"X_{split}"], parts[f"y_{split}"] = X[mask], remap[y[mask]]
    return dataclasses.replace(
        splits, **parts, classes=[splits.classes[k] for k in keep],
        class_counts=np.asarray(splits.class_counts)[keep],
        tail_order=np.arange(C)), keep


def run_one(dataset, C, seed):
    full = load_long_tailed(dataset, imbalance_ratio=1.0, random_state=seed)
    splits, keep = class_subset(full, C, seed)
    model, curv = reference_checkpoint(dataset, splits, seed)
    op = HessianOperator(model, *curv)
    k = min(2 * C + 2, op.shape[0])
    spec = LanczosSpectrum(tol=1e-4, random_state=seed).compute(op, k)
    lam = spec.eigenvalues.detach().cpu().double().numpy()
    with torch.no_grad():
        X_te, y_te = splits.data("test")
        acc = float((model(X_te).argmax(1) == y_te).double().mean())
    return {"dataset": dataset, "C": C, "seed": seed, "classes": keep.tolist(),
            "eigenvalues": lam.tolist(), "gap_c_minus_1": float(lam[C - 2] / lam[C - 1]),
            "gap_c": float(lam[C - 1] / lam[C]), "count_spikes": count_spikes(lam),
            "largest_gap_index": int(np.argmax(lam[:-1] / np.maximum(lam[1:], 1e-12)) + 1),
            "test_accuracy": acc, "n_hvp": int(spec.n_matvec)}


def table(rows):
    lines = ["| Data | C | λ_{C−1}/λ_C | λ_C/λ_{C+1} | count_spikes | test acc. |",
             "|---|---:|---:|---:|---|---:|"]
    groups = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["C"]), []).append(r)
    for (dataset, C), rs in groups.items():
        counts = ", ".join(str(r["count_spikes"]) for r in rs)
        lines.append(f"| {dataset} | {C} | {mean_std([r['gap_c_minus_1'] for r in rs], 1, 2)} | "
                     f"{mean_std([r['gap_c'] for r in rs], 1, 2)} | {counts} | "
                     f"{mean_std([r['test_accuracy'] for r in rs])} |")
    return "\n".join(lines)


def plot(rows, datasets, classes, path):
    plt = pyplot()
    fig, axes = plt.subplots(2, len(datasets), figsize=(4.6 * len(datasets), 6.6),
                             squeeze=False)
    cmap = plt.get_cmap("viridis")
    for j, dataset in enumerate(datasets):
        ax = axes[0, j]
        for i, C in enumerate(classes):
            rs = [r for r in rows if r["dataset"] == dataset and r["C"] == C]
            if not rs:
                continue
            lam = np.asarray(rs[0]["eigenvalues"])
            ax.semilogy(np.arange(1, lam.size + 1), lam / lam[0], "o-", ms=3,
                        color=cmap(i / max(1, len(classes) - 1)), label=f"C = {C}")
            ax.axvline(C - 1 + 0.5, color=cmap(i / max(1, len(classes) - 1)), ls=":", lw=1)
        ax.set(title=f"{dataset}: top Hessian eigenvalues (seed 0)", xlabel="index i",
               ylabel=r"$\lambda_i / \lambda_1$")
        ax.legend(fontsize=8)
        ax = axes[1, j]
        for key, label, marker in (("gap_c_minus_1", r"$\lambda_{C-1}/\lambda_C$", "o"),
                                   ("gap_c", r"$\lambda_C/\lambda_{C+1}$", "s")):
            for C in classes:
                vals = [r[key] for r in rows if r["dataset"] == dataset and r["C"] == C]
                ax.scatter([C] * len(vals), vals, marker=marker, alpha=0.6,
                           color="tab:red" if key == "gap_c_minus_1" else "tab:blue",
                           label=label if C == classes[0] else None)
        ax.axhline(1.5, color="grey", ls="--", lw=1, label="count_spikes threshold")
        ax.set(title=f"{dataset}: eigengaps", xlabel="classes C", ylabel="ratio",
               xticks=list(classes))
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["mnist", "digits"])
    ap.add_argument("--classes", nargs="+", type=int, default=[3, 5, 7, 10])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--name", default="spike_count")
    ap.add_argument("--replot", action="store_true",
                    help="only redo the table and the figure from the saved JSON")
    args = ap.parse_args(argv)
    setup()
    if args.replot:
        import json

        from _common import RESULTS

        saved = json.loads((RESULTS / f"{args.name}.json").read_text())
        rows = saved["rows"]
        args = argparse.Namespace(**saved["settings"])
    else:
        rows = []
        for dataset in args.datasets:
            for C in args.classes:
                for seed in range(args.seeds):
                    log(f"spike count {dataset} C={C} seed {seed}")
                    rows.append(run_one(dataset, C, seed))
        write_json(args.name, {"settings": vars(args), "rows": rows})
    cmd = (f"python benchmarks/spike_count.py --datasets {' '.join(args.datasets)} "
           f"--classes {' '.join(map(str, args.classes))} --seeds {args.seeds}")
    md = (f"Spike count versus C (balanced training data, Hessian on the training sample, "
          f"mean ± std over {args.seeds} seeds; count_spikes per seed).\n\n{table(rows)}\n\n"
          f"Command: `{cmd}`\n")
    write_text(f"{args.name}.md", md)
    plot(rows, args.datasets, args.classes, IMAGES / f"{args.name}.png")
    print(md)


if __name__ == "__main__":
    main()
