import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny models (restored afterwards).

    On a shared 2-core machine, two spinning OpenMP threads per process made
    such tests 3-5x slower in wall time. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


#: The paper's accept/rollback rule (per-step guards only). Tests about the
#: loop's mechanics use it with loose guards so that steps are accepted.
PAPER_RULES = dict(acceptance="tolerance", max_total_class_drop=None,
                   max_balanced_accuracy_drop=None, imbalance_alpha=None)


def train_full_batch(model, X, y, lr, n_steps):
    """``n_steps`` full-batch Adam steps on the mean cross-entropy (in place)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(n_steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model


def trained_blobs_mlp(seed, val_counts):
    """A 3-class ``tanh_mlp`` trained on imbalanced 5-D Gaussian blobs (120/40/10
    samples, drawn from a generator seeded ``seed``), so surgery steps get
    accepted; returns ``(model, X_val, y_val)`` with ``val_counts`` per class."""
    g = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(3, 5, generator=g, dtype=torch.float64)

    def sample(counts):
        X = torch.cat([means[c] + torch.randn(n, 5, generator=g, dtype=torch.float64)
                       for c, n in enumerate(counts)])
        return X, torch.arange(3).repeat_interleave(torch.tensor(counts))

    Xtr, ytr = sample([120, 40, 10])
    model = train_full_batch(tanh_mlp(), Xtr, ytr, 0.05, 60)
    return model, *sample(val_counts)


def tanh_mlp(d_in=5, hidden=6, n_classes=3, dtype=torch.float64):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, n_classes)).to(dtype)


class TinyCNN(nn.Module):
    """Conv + BatchNorm (with non-trivial running statistics) + linear head."""

    def __init__(self, n_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(2 * 3 * 3, n_classes)
        with torch.no_grad():
            self.bn.running_mean.copy_(torch.tensor([0.1, -0.2]))
            self.bn.running_var.copy_(torch.tensor([0.5, 2.0]))
            self.bn.weight.copy_(torch.tensor([1.3, 0.7]))

    def forward(self, x):
        h = torch.tanh(self.bn(self.conv(x)))
        return self.fc(self.drop(h.flatten(1)))


def tiny_cnn(n_classes=3, dtype=torch.float64):
    torch.manual_seed(2)
    m = TinyCNN(n_classes).to(dtype)
    m.train()  # the operator must still evaluate it in eval mode
    return m


def snapshot(model):
    """Bitwise copy of a model's state dict and every module's training flag."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()])


def assert_unchanged(model, snap):
    state, flags = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), f"{k} changed"
    assert [m.training for m in model.modules()] == flags


def run_two_ranks(worker: Path, out: Path, timeout: float) -> None:
    """Run ``worker out`` as two gloo ranks with ``torchrun`` on a free local
    port (one torch thread each); fails the test with the ranks' output."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(worker.parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={port}", str(worker), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def save_three_ways(model: nn.Module, directory: Path) -> None:
    """``model`` as the CLI reads it: a state dict (``weights.pt``), a
    safetensors file (``weights.safetensors``) and TorchScript (``scripted.pt``)."""
    import warnings

    from safetensors.torch import save_file

    torch.save(model.state_dict(), directory / "weights.pt")
    save_file(model.state_dict(), str(directory / "weights.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        torch.jit.save(torch.jit.script(model), str(directory / "scripted.pt"))


def import_source(directory: Path, name: str, source: str):
    """Write ``source`` as ``directory/name.py`` and import it (a user's model
    factory module, as the CLI's ``--factory`` imports one)."""
    (directory / f"{name}.py").write_text(source)
    sys.path.insert(0, str(directory))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(directory))
