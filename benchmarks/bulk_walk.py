"""The paper's bulk walk: does moving through the Hessian's bulk change anything?

The paper walked 20 steps of length 0.1 along random directions projected off
the spikes of a ResNet-50 (budget 0.02) and saw loss and per-class accuracy
unchanged: "class information lives in the spikes". Step lengths do not
transfer between models, so here the step is ``0.1 · (budget scale)`` with
budget scale ``α₀ / 0.02``, ``α₀`` the surgeon's data-driven default budget
(``default_budget(λ₁)``): the same step-to-budget ratio (5×) as the paper.

For each seed the benchmark's model is trained, the top ``C`` eigenpairs of
the Hessian on the training sample are found (the ``C − 1`` spikes and the
borderline ``C``-th), and two walks of ``--steps`` steps are taken from θ₀:

- bulk walk: each step a fresh random unit direction projected off all ``C``;
- spike walk: each step a fresh random unit direction inside the span of the
  ``C − 1`` spikes (the same length).

Loss (training sample, validation, test) and per-class accuracy (validation,
test) are recorded after every step. Writes
``benchmarks/results/bulk_walk.json``, ``bulk_walk.md`` and
``docs/images/bulk_walk.png``.

Usage::

    python benchmarks/bulk_walk.py [--dataset mnist-lt] [--ratio 10] [--seeds 3]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _common import (
    IMAGES,
    command_line,
    log,
    mean_std,
    pyplot,
    reference_checkpoint,
    save_figure,
    setup,
    write_json,
    write_text,
)

from hessrebal._data import as_data
from hessrebal._model import FunctionalModel, predict_logits
from hessrebal.curvature import HessianOperator
from hessrebal.datasets import load_long_tailed
from hessrebal.metrics import summarize
from hessrebal.parameters import ParameterSpace
from hessrebal.spectrum import LanczosSpectrum
from hessrebal.surgeon import default_budget

PAPER_BUDGET = 0.02
PAPER_STEP = 0.1


def state(fmodel, theta, sets, C):
    out = {}
    for name, data in sets.items():
        z, y = predict_logits(fmodel, theta, data, 1024)
        s = summarize(y, z, C)
        out[name] = {"nll": s["nll"], "per_class_accuracy": s["per_class_accuracy"],
                     "class_std": s["class_std"], "balanced_accuracy": s["balanced_accuracy"]}
    return out


def walk(fmodel, theta0, direction, h, steps, sets, C, gen):
    theta = theta0.clone()
    records = [state(fmodel, theta, sets, C)]
    for _ in range(steps):
        u = direction(gen)
        theta = theta + h * u / torch.linalg.vector_norm(u)
        records.append(state(fmodel, theta, sets, C))
    return records, float(torch.linalg.vector_norm(theta - theta0))


def run_seed(dataset, ratio, seed, steps, step_scale):
    splits = load_long_tailed(dataset, imbalance_ratio=ratio, random_state=seed)
    C = splits.n_classes
    model, curv = reference_checkpoint(dataset, splits, seed)
    op = HessianOperator(model, *curv)
    spec = LanczosSpectrum(tol=1e-4, random_state=seed).compute(op, C)
    lam = spec.eigenvalues.detach().cpu().double().numpy()
    Q_all = spec.eigenvectors.detach()
    Q_spk = Q_all[:, : C - 1]
    budget = default_budget(lam[0])
    h = step_scale * budget / PAPER_BUDGET
    space = ParameterSpace(model)
    fmodel = FunctionalModel(model, space)
    theta0 = fmodel.initial_theta()
    sets = {"train_sample": as_data(*curv), "val": as_data(*splits.data("val")),
            "test": as_data(*splits.data("test"))}
    D = theta0.numel()

    def bulk(gen):
        g = torch.randn(D, generator=gen, dtype=torch.float64).to(theta0.dtype)
        for _ in range(2):
            g = g - Q_all @ (Q_all.T @ g)
        return g

    def spikes(gen):
        g = torch.randn(C - 1, generator=gen, dtype=torch.float64).to(theta0.dtype)
        return Q_spk @ g

    out = {"seed": seed, "eigenvalues": lam.tolist(), "budget": budget, "step": h, "D": D}
    for name, fn in (("bulk", bulk), ("spikes", spikes)):
        gen = torch.Generator().manual_seed(1000 + seed)
        records, dist = walk(fmodel, theta0, fn, h, steps, sets, C, gen)
        out[name] = {"records": records, "distance": dist}
        # Curvature actually met: Rayleigh quotient of the first direction.
        u = fn(torch.Generator().manual_seed(5))
        u = u / torch.linalg.vector_norm(u)
        out[name]["rayleigh_quotient"] = float(u @ op.matvec(u))
    return out


def summarize_runs(runs, steps):
    lines = ["| Walk | Δ loss (train sample) | Δ loss (val) | Δ loss (test) | "
             "largest class-accuracy change (test) | Δσ (test) | Δ bal. acc. (test) | "
             "distance / budget | qᵀHq / λ₁ |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("bulk", "spikes"):
        d_tr, d_va, d_te, d_pc, d_s, d_b, dist, rq = [], [], [], [], [], [], [], []
        for r in runs:
            rec = r[name]["records"]
            first, last = rec[0], rec[steps]
            d_tr.append(last["train_sample"]["nll"] - first["train_sample"]["nll"])
            d_va.append(last["val"]["nll"] - first["val"]["nll"])
            d_te.append(last["test"]["nll"] - first["test"]["nll"])
            d_pc.append(np.max(np.abs(np.subtract(last["test"]["per_class_accuracy"],
                                                  first["test"]["per_class_accuracy"]))))
            d_s.append(last["test"]["class_std"] - first["test"]["class_std"])
            d_b.append(last["test"]["balanced_accuracy"] - first["test"]["balanced_accuracy"])
            dist.append(r[name]["distance"] / r["budget"])
            rq.append(r[name]["rayleigh_quotient"] / r["eigenvalues"][0])
        lines.append(
            f"| {name} | {mean_std(d_tr, 1, 3, True)} | {mean_std(d_va, 1, 3, True)} | "
            f"{mean_std(d_te, 1, 3, True)} | {mean_std(d_pc)} pt | {mean_std(d_s, signed=True)}"
            f" pt | {mean_std(d_b, signed=True)} pt | {mean_std(dist, 1, 1)} | "
            f"{mean_std(rq, 1, 4)} |")
    return "\n".join(lines)


def plot(runs, steps, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    colors = {"bulk": "tab:blue", "spikes": "tab:red"}
    for r in runs:
        for name in ("bulk", "spikes"):
            rec = r[name]["records"]
            axes[0].plot(range(steps + 1), [x["train_sample"]["nll"] for x in rec],
                         color=colors[name], alpha=0.7,
                         label=f"{name} walk" if r is runs[0] else None)
            axes[1].plot(range(steps + 1), [100 * x["test"]["class_std"] for x in rec],
                         color=colors[name], alpha=0.7)
    axes[0].set(xlabel="step", ylabel="loss on the training sample", title="loss")
    axes[1].set(xlabel="step", ylabel="σ of per-class accuracy (test, %)", title="σ")
    axes[0].legend()
    save_figure(fig, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist-lt")
    p.add_argument("--ratio", type=float, default=10.0)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--step-scale", type=float, default=PAPER_STEP)
    p.add_argument("--name", default="bulk_walk")
    args = p.parse_args(argv)
    setup()
    runs = []
    for seed in range(args.seeds):
        log(f"bulk walk {args.dataset} r={args.ratio:g} seed {seed}")
        runs.append(run_seed(args.dataset, args.ratio, seed, args.steps, args.step_scale))
    table = summarize_runs(runs, args.steps)
    cmd = command_line("bulk_walk.py", argv)
    md = (f"Bulk walk on {args.dataset} (imbalance ratio {args.ratio:g}), {args.seeds} seeds, "
          f"{args.steps} steps of {args.step_scale:g}·(α₀/0.02) = "
          f"{mean_std([r['step'] / r['budget'] for r in runs], 1, 1)}·α₀; change after the "
          f"last step (mean ± std over seeds).\n\n{table}\n\nCommand: `{cmd}`\n")
    write_json(args.name, {"settings": vars(args), "runs": runs})
    write_text(f"{args.name}.md", md)
    plot(runs, args.steps, IMAGES / f"{args.name}.png")
    print(md)


if __name__ == "__main__":
    main()
