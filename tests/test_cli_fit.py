"""``hessrebal fit``: a saved model in, the changed model out in the same format,
with the same held-out per-class accuracy as the Python API at the same seed."""

import re
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hessrebal import SpectralSurgeon
from hessrebal.baselines import LastLayerRetraining, LogitAdjustment
from hessrebal.cli import main
from hessrebal.metrics import per_class_accuracy
from tests.conftest import import_source, save_three_ways, train_full_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FACTORY_SOURCE = textwrap.dedent("""
    import torch
    from torch import nn


    def make_net():
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
""")


def _blobs(g, counts):
    means = torch.tensor([[2.0, 0, 0, 0, 0, 0], [0, 2.0, 0, 0, 0, 0], [0, 0, 2.0, 0, 0, 0],
                          [0, 0, 0, 2.0, 1.0, 0]])
    X = torch.cat([means[c] + 1.2 * torch.randn(n, 6, generator=g) for c, n in
                   enumerate(counts)])
    return X, torch.arange(4).repeat_interleave(torch.tensor(counts))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A float32 net trained on long-tailed blobs, saved three ways, with
    validation, training and test data as .npz files."""
    d = tmp_path_factory.mktemp("fit")
    model = import_source(d, "fitnets", FACTORY_SOURCE).make_net()
    g = torch.Generator().manual_seed(0)
    X_tr, y_tr = _blobs(g, [200, 80, 30, 8])
    X_val, y_val = _blobs(g, [40, 40, 40, 40])
    X_te, y_te = _blobs(g, [100, 100, 100, 100])
    train_full_batch(model, X_tr, y_tr, 0.02, 150)
    model.eval()
    save_three_ways(model, d)
    for name, (X, y) in {"val": (X_val, y_val), "train": (X_tr, y_tr),
                         "test": (X_te, y_te)}.items():
        np.savez(d / f"{name}.npz", X=X.numpy(), y=y.numpy())
    return {"dir": d, "model": model, "val": (X_val, y_val), "train": (X_tr, y_tr),
            "test": (X_te, y_te)}


@pytest.fixture
def in_dir(files, monkeypatch):
    monkeypatch.chdir(files["dir"])
    n = torch.get_num_threads()
    yield files
    torch.set_num_threads(n)  # main() sets the thread count of this process


def _per_class(model, X, y):
    with torch.no_grad():
        return per_class_accuracy(y, model(X).argmax(1), 4)


def _fresh(files):
    import fitnets

    m = fitnets.make_net()
    m.load_state_dict(files["model"].state_dict())
    return m.eval()


def _run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_state_dict_round_trip_equals_the_python_api(in_dir, tmp_path, capsys):
    files = in_dir
    out = tmp_path / "out"
    code, text, err = _run(capsys, [
        "fit", "--model", "weights.pt", "--factory", "fitnets:make_net", "--val", "val.npz",
        "--curvature", "train.npz", "--test", "test.npz", "--output-dir", str(out),
        "--seed", "3", "--max-steps", "6", "--quiet"])
    assert code == 0, err
    # the output is a state dict for the same factory
    net = _fresh(files)
    net.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    X_val, y_val = files["val"]
    X_tr, y_tr = files["train"]
    X_te, y_te = files["test"]
    surgeon = SpectralSurgeon(max_steps=6, random_state=3).fit(
        files["model"], X_val, y_val, curvature_data=(X_tr, y_tr))
    expected = _per_class(surgeon.transform(files["model"]), X_te, y_te)
    np.testing.assert_array_equal(_per_class(net, X_te, y_te), expected)
    assert any(h["accepted"] for h in surgeon.history_), "the test needs a changed model"
    assert not np.array_equal(expected, _per_class(files["model"], X_te, y_te))
    # the saved surgeon is the same fit
    loaded = SpectralSurgeon.load(out / "surgeon.hrs")
    assert torch.equal(loaded.perturbation_, surgeon.perturbation_)
    # the report is about the test data and its numbers are these
    report = (out / "report.md").read_text()
    assert "measured on the **test data**" in report and "Summary (test data)" in report
    assert f"| balanced accuracy | {np.mean(_per_class(files['model'], X_te, y_te)):.3f} | " \
           f"{np.mean(expected):.3f} |" in report
    first = surgeon.history_[0]
    assert f"| 0 | {first['budget']:.4g} |" in report  # steps counted as history_["step"]
    for png in ("per_class_accuracy.png", "history.png", "sensitivity.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")
    assert re.search(r"balanced accuracy [\d.]+ -> [\d.]+", text)


def test_torchscript_in_torchscript_out(in_dir, tmp_path, capsys):
    files = in_dir
    out = tmp_path / "out"
    code, _, err = _run(capsys, ["fit", "--model", "scripted.pt", "--val", "val.npz",
                                 "--output-dir", str(out), "--max-steps", "4", "--quiet"])
    assert code == 0, err
    scripted = torch.jit.load(str(out / "model.pt"))
    X_val, y_val = files["val"]
    fixed = SpectralSurgeon(max_steps=4, random_state=0).fit_transform(
        files["model"], X_val, y_val)
    X_te, _ = files["test"]
    with torch.no_grad():
        torch.testing.assert_close(scripted(X_te), fixed(X_te), rtol=1e-5, atol=1e-5)
    # labelled as validation numbers when there is no --test
    report = (out / "report.md").read_text()
    assert "measured on the **validation data**" in report and "optimistic" in report
    assert "Summary (validation data)" in report


def test_safetensors_in_safetensors_out_for_last_layer_retraining(in_dir, tmp_path, capsys):
    files = in_dir
    out = tmp_path / "out"
    code, _, err = _run(capsys, [
        "fit", "--model", "weights.safetensors", "--factory", "fitnets:make_net",
        "--val", "val.npz", "--method", "last_layer_retraining", "--output-dir", str(out),
        "--quiet"])
    assert code == 0, err
    assert not (out / "model.pt").exists()
    net = _fresh(files)
    net.load_state_dict(load_file(str(out / "model.safetensors")))
    X_val, y_val = files["val"]
    want = LastLayerRetraining(random_state=0).fit_transform(files["model"], X_val, y_val)
    for (n, p), (_, q) in zip(net.named_parameters(), want.named_parameters()):
        assert torch.equal(p, q), n
    assert LastLayerRetraining.load(out / "last_layer_retraining.hrs").C_ is not None


def test_logit_adjustment_then_surgery_is_folded_into_the_state_dict(in_dir, tmp_path,
                                                                      capsys):
    files = in_dir
    out = tmp_path / "out"
    code, _, err = _run(capsys, [
        "fit", "--model", "weights.pt", "--factory", "fitnets:make_net", "--val", "val.npz",
        "--curvature", "train.npz", "--test", "test.npz", "--output-dir", str(out),
        "--method", "logit_adjustment+spectral_surgery", "--config",
        '{"amplitude__gamma": 0.5, "imbalance_alpha": null, '
        '"logit_adjustment": {"tau": 1.0}}', "--quiet"])
    assert code == 0, err
    net = _fresh(files)  # the factory's architecture: the offsets live in the last bias
    net.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    X_val, y_val = files["val"]
    X_tr, y_tr = files["train"]
    X_te, y_te = files["test"]
    prior = np.bincount(y_tr.numpy(), minlength=4) / len(y_tr)
    la = LogitAdjustment(class_prior=prior, tau=1.0).fit_transform(files["model"], X_val, y_val)
    surgeon = SpectralSurgeon(random_state=0, imbalance_alpha=None)
    surgeon.set_params(amplitude__gamma=0.5)
    both = surgeon.fit_transform(la, X_val, y_val, curvature_data=(X_tr, y_tr))
    assert any(h["accepted"] for h in surgeon.history_), "the test needs a surgery step"
    with torch.no_grad():
        torch.testing.assert_close(net(X_te), both(X_te), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(_per_class(net, X_te, y_te), _per_class(both, X_te, y_te))
    assert SpectralSurgeon.load(out / "surgeon.hrs").amplitude.gamma == 0.5
    assert LogitAdjustment.load(out / "logit_adjustment.hrs").tau_ == 1.0


def test_fit_as_a_fresh_process(in_dir, tmp_path):
    """The console entry point, as a user runs it (``python -m hessrebal``)."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "hessrebal", "fit", "--model", "weights.pt", "--factory",
         "fitnets:make_net", "--val", "val.npz", "--output-dir", str(out), "--max-steps", "2",
         "--threads", "1", "--quiet"],
        capture_output=True, text=True, timeout=300, cwd=in_dir["dir"])
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.pt").is_file() and (out / "surgeon.hrs").is_file()
    assert "report:" in proc.stdout


def test_fit_errors_are_one_line(in_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    base = ["fit", "--model", "weights.pt", "--factory", "fitnets:make_net", "--val",
            "val.npz", "--output-dir", str(tmp_path / "o"), "--quiet"]
    cases = [
        (["fit", "--model", "nope.pt", "--val", "val.npz", "--output-dir", str(tmp_path)],
         "does not exist"),
        (["fit", "--model", "weights.pt", "--val", "val.npz", "--output-dir", str(tmp_path)],
         "not a TorchScript file.*--factory"),
        ([*base[:-1], "--config", "{bad json"], "--config .* not valid JSON"),
        ([*base[:-1], "--config", '{"no_such": 1}'], "Invalid parameter 'no_such'"),
        ([*base[:-1], "--config", '{"spectrum": {"class": "os.system"}}'],
         "unknown strategy class"),
        ([*base[:-1], "--config", '[1, 2]'], "must be a JSON object"),
        ([*base[:-1], "--n-components", "0"], "--n-components must be a positive"),
        ([*base[:-1], "--max-steps", "-1"], "--max-steps must be a non-negative"),
        ([*base[:-1], "--test", "nothere.npz"], "does not exist"),
        (["fit", "--model", "weights.pt", "--factory", "fitnets:make_net", "--val", "val.npz",
          "--output-dir", str(tmp_path / "afile")], "not a directory"),
        ([*base[:-1], "--threads", "0"], "--threads must be a positive"),
    ]
    for argv, match in cases:
        code, _, err = _run(capsys, argv)
        assert code == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hessrebal fit: error: "), err
        assert re.search(match, lines[0]), lines[0]


def test_softmax_model_refuses_to_fold_logit_adjustment(tmp_path, capsys, monkeypatch):
    # Offsets on log-probabilities cannot become a bias: say so, in one line.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "softnets.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def make():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(6, 4), nn.Softmax(dim=1))
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        import softnets

        torch.save(softnets.make().state_dict(), tmp_path / "w.pt")
    finally:
        sys.path.remove(str(tmp_path))
    g = torch.Generator().manual_seed(0)
    X, y = _blobs(g, [10, 10, 10, 10])
    np.savez(tmp_path / "v.npz", X=X.numpy(), y=y.numpy())
    n = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            code, _, err = _run(capsys, ["fit", "--model", "w.pt", "--factory", "softnets:make",
                                         "--val", "v.npz", "--method", "logit_adjustment",
                                         "--output-dir", str(tmp_path / "o"), "--quiet"])
    finally:
        torch.set_num_threads(n)
    lines = err.strip().splitlines()
    assert code == 2 and [ln for ln in lines if ": error: " in ln] == lines[-1:]
    assert "cannot be folded" in lines[-1] and "softmax" in lines[-1]


@pytest.mark.parametrize("method", ["tau_normalization", "class_bias"])
def test_other_baselines_round_trip_as_state_dicts(in_dir, tmp_path, capsys, method):
    from hessrebal.baselines import ClassBiasTuning, TauNormalization

    files = in_dir
    out = tmp_path / "out"
    code, _, err = _run(capsys, ["fit", "--model", "weights.pt", "--factory",
                                 "fitnets:make_net", "--val", "val.npz", "--method", method,
                                 "--output-dir", str(out), "--quiet"])
    assert code == 0, err
    net = _fresh(files)
    net.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    X_val, y_val = files["val"]
    est = {"tau_normalization": TauNormalization, "class_bias": ClassBiasTuning}[method]()
    want = est.fit_transform(files["model"], X_val, y_val)
    X_te, _ = files["test"]
    with torch.no_grad():
        torch.testing.assert_close(net(X_te), want(X_te), rtol=1e-5, atol=1e-5)
    assert (out / f"{method}.hrs").is_file()
