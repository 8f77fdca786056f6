import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hessrebal import ParameterSpace
from tests.conftest import tanh_mlp, tiny_cnn


def test_default_selection_follows_named_parameters_and_requires_grad():
    model = tiny_cnn()
    model.bn.weight.requires_grad_(False)
    space = ParameterSpace(model)
    expected = [n for n, p in model.named_parameters() if p.requires_grad]
    assert space.names == expected and "bn.weight" not in space
    assert space.dim == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_selection_by_prefix_name_and_callable():
    model = tiny_cnn()
    assert ParameterSpace(model, "fc").names == ["fc.weight", "fc.bias"]
    assert ParameterSpace(model, ["conv.bias", "fc"]).names == ["conv.bias", "fc.weight", "fc.bias"]
    assert ParameterSpace(model, lambda n, p: n.endswith("bias")).names == [
        "conv.bias", "bn.bias", "fc.bias"]
    with pytest.raises(ValueError, match="unknown parameter name or prefix 'f'"):
        ParameterSpace(model, ["f"])  # a prefix must end at a module boundary
    with pytest.raises(TypeError, match="params"):
        ParameterSpace(model, 3)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(1, 4), min_size=1, max_size=3), min_size=1, max_size=5))
def test_flatten_unflatten_roundtrip(shapes):
    module = nn.Module()
    for i, s in enumerate(shapes):
        module.register_parameter(f"p{i}", nn.Parameter(torch.randn(*s, dtype=torch.float64)))
    space = ParameterSpace(module)
    flat = space.gather(module)
    assert flat.shape == (sum(torch.Size(s).numel() for s in shapes),)
    back = space.unflatten(flat)
    for n, p in module.named_parameters():
        assert torch.equal(back[n], p.detach())
    assert torch.equal(space.flatten(back), flat)
    # unflatten returns views: writing through them writes the flat vector
    next(iter(back.values())).view(-1)[0] = 123.0
    assert flat[0] == 123.0


def test_apply_copy_and_in_place():
    model = tanh_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    space = ParameterSpace(model, "2")
    delta = torch.arange(space.dim, dtype=torch.float64)
    new = space.apply(model, delta)
    assert new is not model
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert torch.equal(new[0].weight, model[0].weight)  # unselected: unchanged
    torch.testing.assert_close(space.gather(new), space.gather(model) + delta)
    same = space.apply(model, delta, copy=False)
    assert same is model
    torch.testing.assert_close(space.gather(model), space.gather(new))


def test_check_compatible_names_first_mismatch():
    space = ParameterSpace(tanh_mlp())
    with pytest.raises(ValueError, match="2.weight"):
        space.check_compatible(tanh_mlp(n_classes=4))
    with pytest.raises(ValueError, match="no parameter '0.weight'"):
        space.check_compatible(nn.Sequential(nn.Identity(), nn.Linear(1, 1)))


def test_skorch_like_wrapper_is_unwrapped():
    class FakeNet:  # what skorch exposes: a fitted .module_
        def __init__(self, module):
            self.module_ = module

    net = FakeNet(tanh_mlp())
    space = ParameterSpace(net)
    out = space.apply(net, torch.ones(space.dim, dtype=torch.float64))
    assert isinstance(out, FakeNet) and out is not net
    torch.testing.assert_close(space.gather(out.module_), space.gather(net.module_) + 1)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(1, 4), min_size=0, max_size=3), st.booleans()),
                min_size=1, max_size=6).filter(lambda ps: any(sel for _, sel in ps)),
       st.sampled_from([torch.float32, torch.float64]), st.integers(0, 2**31 - 1))
def test_selection_flatten_unflatten_and_apply_on_random_models(params, dtype, seed):
    """A random subset of random-shaped parameters (scalars included): the flat
    order is named_parameters() order, unflatten inverts flatten for any
    vector, and apply adds exactly its slice to each selected tensor and
    nothing elsewhere."""
    g = torch.Generator().manual_seed(seed)
    module = nn.Module()
    for i, (shape, _) in enumerate(params):
        module.register_parameter(f"p{i}", nn.Parameter(torch.randn(tuple(shape), generator=g,
                                                                    dtype=dtype)))
    chosen = [f"p{i}" for i, (_, sel) in enumerate(params) if sel]
    space = ParameterSpace(module, chosen)
    assert space.names == chosen and space.dtype == dtype
    assert space.dim == sum(torch.Size(s).numel() for s, sel in params if sel)
    v = torch.randn(space.dim, generator=g, dtype=dtype)
    parts = space.unflatten(v)
    assert torch.equal(space.flatten(parts), v)
    assert torch.equal(space.flatten([parts[n] for n in chosen]), v)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    new = space.apply(module, v)
    offset = 0
    for name, p in new.named_parameters():
        if name in chosen:
            n = p.numel()
            expected = before[name] + v[offset:offset + n].view(before[name].shape)
            assert torch.equal(p.detach(), expected)
            offset += n
        else:
            assert torch.equal(p.detach(), before[name])
    for name, p in module.named_parameters():  # the original is untouched
        assert torch.equal(p.detach(), before[name])
