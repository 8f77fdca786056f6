"""SpectralSurgeon.save/load: safetensors + JSON, no pickle; a loaded surgeon
has equal settings and fitted state and transforms a model bitwise like the
original; anything else in the file is refused with ValueError."""

import io
import json
import pickle
import struct
import warnings

import numpy as np
import pytest
import torch
from sklearn.base import BaseEstimator, clone

from hessrebal import SpectralSurgeon
from hessrebal.amplitude import AdamSNR, GrowShrink
from hessrebal.baselines import LogitAdjustment
from hessrebal.sensitivity import FiniteDifferenceSensitivity
from hessrebal.solvers import ProjectedGradientSolver
from hessrebal.spectrum import LanczosSpectrum
from tests.conftest import tiny_cnn, trained_blobs_mlp

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def trained(dtype=torch.float64):
    """A 3-class MLP trained on imbalanced blobs, so that steps get accepted."""
    model, Xv, yv = trained_blobs_mlp(7, [30, 30, 30])
    return model.to(dtype), Xv.to(dtype), yv


def fitted_attributes(s):
    return {k: v for k, v in vars(s).items() if k.endswith("_") and not k.startswith("_")}


def assert_same_params(a, b):
    pa, pb = a.get_params(deep=False), b.get_params(deep=False)
    assert pa.keys() == pb.keys()
    for k in pa:
        if hasattr(pa[k], "get_params"):
            assert type(pa[k]) is type(pb[k]), k
            assert pa[k].get_params(deep=False) == pb[k].get_params(deep=False), k
        else:
            assert pa[k] == pb[k] and type(pa[k]) is type(pb[k]), k
    da = {k: v for k, v in a.get_params(deep=True).items() if not hasattr(v, "get_params")}
    db = {k: v for k, v in b.get_params(deep=True).items() if not hasattr(v, "get_params")}
    assert da == db


def assert_same_fitted(a, b):
    fa, fb = fitted_attributes(a), fitted_attributes(b)
    assert fa.keys() == fb.keys()
    for k, va in fa.items():
        vb = fb[k]
        assert type(va) is type(vb), k
        if isinstance(va, torch.Tensor):
            assert va.dtype == vb.dtype and torch.equal(va.cpu(), vb), k
        elif isinstance(va, np.ndarray):
            assert va.dtype == vb.dtype and va.shape == vb.shape, k
            assert va.tobytes() == vb.tobytes(), k  # bitwise, NaN included
        else:
            # repr-exact JSON compares floats bitwise and NaN equal to NaN
            assert json.dumps(va) == json.dumps(vb), k


def assert_same_model(m1, m2):
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert s1[k].dtype == s2[k].dtype and torch.equal(s1[k], s2[k]), k


@pytest.fixture(scope="module")
def problem():
    return trained()


@pytest.fixture(scope="module")
def surgeon(problem):
    model, X, y = problem
    s = SpectralSurgeon(
        sensitivity=FiniteDifferenceSensitivity(scheme="forward"),
        solver=ProjectedGradientSolver(max_iter=300),
        amplitude=AdamSNR(min_fraction=0.25),
        spectrum=LanczosSpectrum(tol=1e-4, max_iter=200),
        params=("0", "2.weight"), device=torch.device("cpu"), weight_power="auto",
        max_steps=3, budget=0.3, class_shrinkage=2.5, random_state=3,
    ).fit(model, X, y)
    assert any(h["accepted"] for h in s.history_)
    return s


def test_round_trip_restores_settings_state_and_transform(tmp_path, problem, surgeon):
    model, X, y = problem
    path = surgeon.save(tmp_path / "surgeon.safetensors")
    loaded = SpectralSurgeon.load(path)
    assert_same_params(surgeon, loaded)
    assert isinstance(loaded.params, tuple) and isinstance(loaded.device, torch.device)
    assert_same_fitted(surgeon, loaded)
    assert_same_model(surgeon.transform(model), loaded.transform(model))
    assert loaded.score(model, X, y) == surgeon.score(model, X, y)
    # a loaded surgeon is an ordinary estimator again
    assert_same_params(clone(loaded), surgeon)


def test_round_trip_with_absent_class_float32_and_zero_steps(tmp_path):
    model, X, y = trained(torch.float32)
    keep = y != 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        s = SpectralSurgeon(max_steps=2, random_state=0).fit(model, X[keep], y[keep])
    assert np.isnan(s.per_class_accuracy_before_[1]) and s.perturbation_.dtype == torch.float32
    assert np.isnan(s.history_[0]["per_class_accuracy"][1])
    loaded = SpectralSurgeon.load(s.save(tmp_path / "a.safetensors"))
    assert_same_fitted(s, loaded)
    assert_same_model(s.transform(model), loaded.transform(model))

    none = SpectralSurgeon(max_steps=0, amplitude=GrowShrink(grow=2.0)).fit(model, X, y)
    assert none.sensitivity_ is None and none.history_ == []
    loaded = SpectralSurgeon.load(none.save(tmp_path / "b.safetensors"))
    assert_same_fitted(none, loaded)
    assert_same_params(none, loaded)


def test_round_trip_of_a_cnn_keeps_buffers_out_of_it(tmp_path):
    model = tiny_cnn()
    X, y = torch.randn(24, 1, 5, 5, dtype=torch.float64), torch.arange(24) % 3
    s = SpectralSurgeon(max_steps=1, random_state=0).fit(model, X, y)
    loaded = SpectralSurgeon.load(s.save(tmp_path / "cnn.safetensors"))
    a, b = s.transform(model), loaded.transform(model)
    assert_same_model(a, b)
    assert torch.equal(a.bn.running_var, model.bn.running_var)
    assert b.training == model.training


def test_no_pickle_is_used_to_save_or_load(tmp_path, monkeypatch, surgeon):
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used")

    for name in ("dump", "dumps", "load", "loads", "Pickler", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch, "save", forbidden)
    path = surgeon.save(tmp_path / "s.safetensors")
    loaded = SpectralSurgeon.load(path)
    assert torch.equal(loaded.perturbation_, surgeon.perturbation_)
    # the file is a safetensors file: 8-byte length, then a JSON header
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert set(header) - {"__metadata__"} == {"perturbation_", "eigenvectors_", "eigenvalues_",
                                             "sensitivity_", "coef_", "classes_",
                                             "per_class_accuracy_before_",
                                             "per_class_accuracy_after_"}
    meta = json.loads(header["__metadata__"]["meta"])
    solver = meta["params"]["solver"]
    assert solver["__hessrebal__"] == "strategy" and solver["class"] == "ProjectedGradientSolver"
    assert solver["params"] == ProjectedGradientSolver(max_iter=300).get_params()
    assert meta["params"]["params"] == {"__hessrebal__": "tuple", "items": ["0", "2.weight"]}
    assert meta["fitted"]["parameter_names_"] == ["0.weight", "0.bias", "2.weight"]
    assert set(meta["versions"]) == {"hessrebal", "torch", "numpy", "python"}


# ----------------------------------------------------------- refusals
def _rewrite_meta(src, dst, change):
    """Copy a saved file with its JSON metadata changed by ``change(meta)``."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = json.loads(header["__metadata__"]["meta"])
    change(meta)
    header["__metadata__"]["meta"] = json.dumps(meta)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    dst.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    return dst


@pytest.fixture(scope="module")
def saved(tmp_path_factory, surgeon):
    return surgeon.save(tmp_path_factory.mktemp("saved") / "ok.safetensors")


def test_load_refuses_pickles_and_other_files(tmp_path, surgeon, saved):
    pkl = tmp_path / "surgeon.pkl"
    pkl.write_bytes(pickle.dumps(surgeon))
    with pytest.raises(ValueError, match="looks like a pickle"):
        SpectralSurgeon.load(pkl)
    buf = io.BytesIO()
    torch.save({"perturbation_": surgeon.perturbation_}, buf)
    zipped = tmp_path / "surgeon.pt"
    zipped.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="zip archive"):
        SpectralSurgeon.load(zipped)
    for name, content in [("empty", b""), ("noise", np.random.default_rng(0).bytes(4096)),
                          ("json", b'{"perturbation_": [0.0]}'),
                          ("truncated", saved.read_bytes()[:200]),
                          ("cut tensors", saved.read_bytes()[:-16])]:
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(ValueError):
            SpectralSurgeon.load(bad)
    with pytest.raises(FileNotFoundError):
        SpectralSurgeon.load(tmp_path / "missing.safetensors")


def test_load_detects_flipped_tensor_bytes(tmp_path, saved):
    raw = bytearray(saved.read_bytes())
    raw[-3] ^= 0x10  # inside the last tensor's data
    bad = tmp_path / "flipped"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        SpectralSurgeon.load(bad)


def test_load_refuses_another_kind_of_object(tmp_path):
    model, X, y = trained()
    la = LogitAdjustment().fit(model, X, y)
    path = la.save(tmp_path / "la.safetensors")
    with pytest.raises(ValueError, match="holds a 'LogitAdjustment', not a 'SpectralSurgeon'"):
        SpectralSurgeon.load(path)


@pytest.mark.parametrize("change,match", [
    (lambda m: m["params"]["solver"].update({"class": "os.system"}),
     "'os.system' is not a hessrebal strategy class"),
    (lambda m: m["params"]["solver"].update({"class": "Popen"}), "not a hessrebal strategy"),
    (lambda m: m["params"]["solver"]["params"].update({"evil": 1}), "unexpected keyword"),
    (lambda m: m["params"].update({"exec": "print(1)"}), "unexpected keyword"),
    (lambda m: m["fitted"].update({"fit": 1}), "invalid fitted attribute name 'fit'"),
    (lambda m: m["fitted"].update({"__class__": 1}), "invalid fitted attribute name"),
    (lambda m: m["fitted"].update({"history_": {"__hessrebal__": "pickle", "v": "x"}}),
     "unknown tag 'pickle'"),
    (lambda m: m["fitted"].update({"n_hvp_": {"__hessrebal__": "ndarray", "dtype": "|O",
                                              "shape": [1], "items": [1]}}),
     "refusing an array of dtype object"),
    (lambda m: m["fitted"].update({"parameter_shapes_": [[6, 5]]}), "inconsistent"),
    (lambda m: m["sha256"].update({"coef_": "0" * 64}), "'coef_' is corrupt"),
    (lambda m: m["tensors"].pop("coef_"), "do not match"),
    (lambda m: m.pop("params"), "missing settings"),
], ids=["os.system", "Popen", "extra strategy param", "extra param", "method name",
        "dunder", "unknown tag", "object array", "shapes", "checksum", "tensor list",
        "no params"])
def test_load_refuses_tampered_metadata(tmp_path, saved, change, match):
    bad = _rewrite_meta(saved, tmp_path / "tampered", change)
    with pytest.raises(ValueError, match=match):
        SpectralSurgeon.load(bad)


def test_untampered_rewrite_still_loads(tmp_path, saved, surgeon):
    # the tampering helper itself keeps a valid file valid
    ok = SpectralSurgeon.load(_rewrite_meta(saved, tmp_path / "same", lambda m: None))
    assert torch.equal(ok.perturbation_, surgeon.perturbation_)


# ------------------------------------------------------ save refusals
class MyAmplitude(BaseEstimator):
    def __init__(self, factor=0.5):
        self.factor = factor

    def initial(self, budget, max_steps):
        self.b = budget
        return budget

    def update(self, accepted, signal):
        self.b *= 1 if accepted else self.factor
        return self.b


def test_callable_params_cannot_be_saved_but_their_names_can(tmp_path, problem):
    model, X, y = problem
    s = SpectralSurgeon(params=lambda n, p: n.startswith("2"), max_steps=1,
                        random_state=0).fit(model, X, y)
    with pytest.raises(ValueError, match=r"Cannot save params=.*callable.*"
                                         r"set_params\(params=surgeon.parameter_names_\)"):
        s.save(tmp_path / "x.safetensors")
    s.set_params(params=s.parameter_names_)
    loaded = SpectralSurgeon.load(s.save(tmp_path / "x.safetensors"))
    assert loaded.params == ["2.weight", "2.bias"]
    assert_same_model(s.transform(model), loaded.transform(model))


def test_output_to_logits_and_user_strategies_cannot_be_saved(tmp_path, problem):
    model, X, y = problem
    s = SpectralSurgeon(output_to_logits=lambda out: out, max_steps=1).fit(model, X, y)
    with pytest.raises(ValueError, match=r"Cannot save output_to_logits=.*output_to_logits=None"):
        s.save(tmp_path / "x.safetensors")
    s = SpectralSurgeon(amplitude=MyAmplitude(), max_steps=1).fit(model, X, y)
    with pytest.raises(ValueError, match="not one of hessrebal's classes"):
        s.save(tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
