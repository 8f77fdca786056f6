"""Worker for tests/test_distributed.py, started by
``python -m torch.distributed.run --nproc_per_node=2 tests/_distributed_worker.py OUT``.

Each rank builds a ``HessianOperator`` on its own shard (uneven sizes, a
DataLoader on rank 1), computes products, spectra and a short surgery with
the process group, and writes everything to ``OUT/rank{r}.pt`` together with
the same quantities from the full data in this one process (the reference).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hessrebal import SpectralSurgeon
from hessrebal.curvature import HessianOperator
from hessrebal.spectrum import LanczosSpectrum, PowerIterationSpectrum


def problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(61, 5, generator=g, dtype=torch.float64)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    return model, X, y


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    model, X, y = problem()
    # Uneven shards: rank 0 gets 40 samples as tensors, rank 1 the other 21 as a DataLoader.
    cut = 40
    if rank == 0:
        shard = dict(X=X[:cut], y=y[:cut])
    else:
        shard = dict(X=DataLoader(TensorDataset(X[cut:], y[cut:]), batch_size=6), y=None)
    g = torch.Generator().manual_seed(7)
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=g, dtype=torch.float64)
    V = torch.randn(v.shape[0], 3, generator=g, dtype=torch.float64)

    res = {"rank": rank, "world": world}
    for curvature in ("hessian", "ggn"):
        op = HessianOperator(model, shard["X"], shard["y"], curvature=curvature, batch_size=8,
                             process_group=group)
        full = HessianOperator(model, X, y, curvature=curvature, batch_size=8)
        res[curvature] = {"dist": op.matvec(v), "full": full.matvec(v),
                          "dist_block": op.matvec(V), "full_block": full.matvec(V)}
        res["n_samples"] = op.n_samples
    op = HessianOperator(model, shard["X"], shard["y"], process_group=group, cache_bytes=0)
    full = HessianOperator(model, X, y)
    res["uncached"] = op.matvec(v)
    res["gradient"] = (op.gradient(), full.gradient())
    res["loss"] = (op.loss(), full.loss())
    # Unseeded spectra: the seed is drawn on rank 0 and broadcast.
    res["lanczos"] = LanczosSpectrum(tol=1e-8).compute(op, 3)
    res["power"] = PowerIterationSpectrum(tol=1e-8, max_iter=500).compute(op, 2)
    res["lanczos_full"] = LanczosSpectrum(tol=1e-8, random_state=0).compute(full, 3)
    curv = (X[:cut], y[:cut]) if rank == 0 else DataLoader(TensorDataset(X[cut:], y[cut:]),
                                                            batch_size=6)
    surgeon = SpectralSurgeon(max_steps=2, budget=0.5, random_state=0).fit(
        model, X, y, curvature_data=curv, process_group=group)
    reference = SpectralSurgeon(max_steps=2, budget=0.5, random_state=0).fit(
        model, X, y, curvature_data=(X, y))
    res["surgeon"] = {"perturbation": surgeon.perturbation_, "eigenvalues": surgeon.eigenvalues_,
                      "n_hvp": surgeon.n_hvp_,
                      "accepted": [h["accepted"] for h in surgeon.history_]}
    res["surgeon_full"] = {"perturbation": reference.perturbation_,
                           "eigenvalues": reference.eigenvalues_,
                           "accepted": [h["accepted"] for h in reference.history_]}
    # Unseeded, with a selection split: rank 0's seed is broadcast for both.
    unseeded = SpectralSurgeon(max_steps=2, budget=0.5, selection_fraction=0.5).fit(
        model, X, y, curvature_data=curv, process_group=group)
    res["unseeded"] = {"perturbation": unseeded.perturbation_,
                       "accuracy_before": unseeded.per_class_accuracy_before_}
    torch.save(res, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
