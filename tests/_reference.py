"""Independent dense references (float64) for tests."""

import torch
import torch.nn.functional as F
from torch.func import functional_call


def flat_params(model, names=None):
    named = dict(model.named_parameters())
    names = names or [n for n, p in model.named_parameters() if p.requires_grad]
    return names, torch.cat([named[n].detach().reshape(-1) for n in names])


def _unflat(model, names, flat):
    named = dict(model.named_parameters())
    out, i = {}, 0
    for n in names:
        k = named[n].numel()
        out[n] = flat[i : i + k].view_as(named[n])
        i += k
    return out


def dense_hessian(model, X, y, names=None):
    """Dense Hessian of the mean cross-entropy in eval mode, by torch.autograd.functional."""
    names, theta = flat_params(model, names)
    was = [m.training for m in model.modules()]
    model.eval()
    try:
        def loss(flat):
            out = functional_call(model, _unflat(model, names, flat), (X,))
            return F.cross_entropy(out, y)

        return torch.autograd.functional.hessian(loss, theta)
    finally:
        for m, t in zip(model.modules(), was):
            m.training = t
