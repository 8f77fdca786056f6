"""Worker for tests/test_distributed_failures.py, started by
``python -m torch.distributed.run --nproc_per_node=2 tests/_distributed_failure_worker.py OUT``.

Each scenario makes one rank raise inside ``SpectralSurgeon.fit`` at a
different point, on a fresh gloo group (the collective the failed rank left
unfinished poisons only that group), and records on every rank what was
raised and how long the fit took, in ``OUT/rank{r}.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hessrebal import SpectralSurgeon
from hessrebal.sensitivity import SoftmaxSurrogateSensitivity

#: The backend's own timeout: what ends the wait without hessrebal's notices.
BACKEND_TIMEOUT_S = 30


def problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 5, generator=g, dtype=torch.float64)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    return model, X, y


class FailingAfter(Dataset):
    """Raises OSError when item ``n`` is read the second time (a shard on a
    disk that fails after the labels were checked, during the products)."""

    def __init__(self, X, y, n):
        self.X, self.y, self.n = X, y, n
        self.reads = 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        if i == self.n:
            self.reads += 1
            if self.reads == 2:
                raise OSError(5, f"Input/output error reading shard item {i}")
        return self.X[i], self.y[i]


class FailingSensitivity(SoftmaxSurrogateSensitivity):
    """Raises MemoryError at its second estimate (step 1), after the spectrum."""

    def __init__(self, kind="margin", temperature=1.0):
        super().__init__(kind=kind, temperature=temperature)
        self.calls = 0

    def estimate(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 2:
            raise MemoryError("out of memory at step 1")
        return super().estimate(*args, **kwargs)


def run(name, rank, fit):
    group = dist.new_group(ranks=[0, 1], backend="gloo",
                           timeout=timedelta(seconds=BACKEND_TIMEOUT_S))
    start = time.monotonic()
    try:
        fit(group)
        out = {"raised": None}
    except BaseException as exc:  # noqa: BLE001 - recorded for the test
        out = {"raised": type(exc).__name__, "message": str(exc),
               "notes": list(getattr(exc, "__notes__", [])),
               "failed_rank": getattr(exc, "rank", None)}
    out["seconds"] = time.monotonic() - start
    return name, out


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=BACKEND_TIMEOUT_S))
    rank = dist.get_rank()
    model, X, y = problem()
    shard = (X[:30], y[:30]) if rank == 0 else (X[30:], y[30:])
    results = {}

    def bad_labels_on_rank1(group):
        # Rank 1's validation labels are out of range: it raises before the
        # first collective, while rank 0 goes on into the spectrum.
        yv = y.clone()
        if rank == 1:
            yv[3] = 7
        SpectralSurgeon(max_steps=2, random_state=0).fit(model, X, yv, curvature_data=shard,
                                                         process_group=group)

    def disk_error_on_rank1_mid_products(group):
        # Rank 1's shard fails while the Hessian products are under way.
        curv = shard if rank == 0 else DataLoader(FailingAfter(*shard, n=12), batch_size=4)
        SpectralSurgeon(max_steps=2, random_state=0, batch_size=4).fit(
            model, X, y, curvature_data=curv, process_group=group)

    def memory_error_on_rank0_late(group):
        # Rank 0 (which hosts the store) fails at step 1, after its last
        # collective; rank 1 must not return a result.
        sens = FailingSensitivity() if rank == 0 else SoftmaxSurrogateSensitivity()
        SpectralSurgeon(max_steps=2, random_state=0, sensitivity=sens, budget=0.5,
                        refresh_spectrum=0).fit(model, X, y, curvature_data=shard,
                                                process_group=group)

    def nobody_fails(group):
        SpectralSurgeon(max_steps=2, random_state=0).fit(model, X, y, curvature_data=shard,
                                                         process_group=group)

    for scenario in (bad_labels_on_rank1, disk_error_on_rank1_mid_products,
                     memory_error_on_rank0_late, nobody_fails):
        name, out = run(scenario.__name__, rank, scenario)
        results[name] = out

    (out_dir / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    # Both ranks are done before either leaves (rank 0 hosts the store); a
    # fresh group, since the others hold unfinished collectives.
    dist.barrier(group=dist.new_group(ranks=[0, 1], backend="gloo"))
    sys.stdout.flush()
    # Skip the teardown of groups with abandoned collectives.
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
