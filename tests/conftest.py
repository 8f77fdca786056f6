import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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
