"""Command line: the demo writes its report and figures, the spectrum of saved
models matches a dense Hessian, --help is complete, errors are one line."""

import json
import re
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from hessrebal.cli import build_parser, load_model, load_npz, main
from hessrebal.report import FIGURES
from tests._reference import dense_hessian
from tests.conftest import import_source, save_three_ways, train_full_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


FACTORY_SOURCE = textwrap.dedent("""
    import torch
    from torch import nn


    def make_net():
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(torch.float64)


    def not_a_module():
        return 42
""")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small trained float64 net saved three ways, its data as .npz, and its
    dense Hessian spectrum."""
    d = tmp_path_factory.mktemp("saved")
    model = import_source(d, "tinynets", FACTORY_SOURCE).make_net()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(90, 5, generator=g, dtype=torch.float64)
    y = torch.arange(90) % 3
    X = X + 1.5 * nn.functional.one_hot(y, 5).to(torch.float64)
    train_full_batch(model, X, y, 0.03, 100)
    model.eval()
    save_three_ways(model, d)
    np.savez(d / "data.npz", X=X.numpy(), y=y.numpy())
    lam = np.sort(np.linalg.eigvalsh(dense_hessian(model, X, y).numpy()))[::-1]
    return d, model, lam


def _run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------- demo
def test_demo_writes_report_and_figures(tmp_path, capsys):
    out_dir = tmp_path / "report"
    code, out, err = _run(capsys, ["demo", "--dataset", "digits-lt", "--epochs", "3",
                                   "--max-steps", "2", "--output-dir", str(out_dir),
                                   "--quiet"])
    assert code == 0, err
    assert err == ""  # --quiet: no progress bars
    # the terminal table: one row per class, then the summary rows
    assert "balanced accuracy" in out and "class std (σ)" in out and "logit adj" in out
    assert len(re.findall(r"^\s+\d\s+\d+\s+[01]\.\d{3}", out, flags=re.M)) == 10
    report = (out_dir / "report.md").read_text()
    for name in FIGURES.values():
        data = (out_dir / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
        assert f"]({name})" in report
    linked = set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report))
    assert linked == set(FIGURES.values())
    for heading in ("## Summary", "## Per-class accuracy (test split)", "## The surgery",
                    "### Steps", "## Settings", "## Timings"):
        assert heading in report
    assert "| balanced accuracy |" in report and "| class std σ |" in report
    assert "| worst class |" in report and "logit adjustment" in report
    # per-class table: one row per class, counts in decreasing order
    rows = re.findall(r"^\| (\d) \| (\d+) \| ([01]\.\d{3}) \| ([01]\.\d{3}) \|", report, re.M)
    assert len(rows) == 10
    counts = [int(r[1]) for r in rows]
    assert counts == sorted(counts, reverse=True)
    assert "| max_steps | `2` |" in report and "| spectrum |" in report
    import matplotlib.image

    img = matplotlib.image.imread(out_dir / FIGURES["spectrum"])
    assert img.shape[1] > 800  # two panels: eigenvalues and the SLQ density


def test_report_numbers_match_the_result(tmp_path):
    from hessrebal import SpectralSurgeon
    from hessrebal.demo import format_table, run_demo
    from hessrebal.report import render_report, write_report

    result = run_demo("digits-lt", epochs=2, surgeon=SpectralSurgeon(max_steps=1,
                                                                     random_state=0))
    assert result.spectrum is None and set(result.timings) == {
        "train", "surgery", "logit_adjustment", "last_layer_retraining"}
    text = render_report(result)
    for key in ("before", "after", "logit_adjustment", "last_layer_retraining"):
        m = getattr(result, key)
        assert f"{m['balanced_accuracy']:.3f}" in text
        assert f"{m['class_std']:.3f}" in text
    table = format_table(result)
    assert f"{result.after['balanced_accuracy']:.3f}" in table.splitlines()[-4]
    # the steps table counts as history_["step"] does, from 0
    steps = [h["step"] for h in result.surgeon.history_]
    assert steps == [0]
    assert re.search(r"^\| 0 \| [\d.e-]+ \| (accepted|rolled back) \|", text, re.M), text
    path = write_report(result, tmp_path / "a" / "b")  # nested, created
    assert path.name == "report.md" and all((path.parent / f).is_file()
                                            for f in FIGURES.values())


# ---------------------------------------------------------------- spectrum
@pytest.mark.parametrize("how", ["torchscript", "factory", "factory+safetensors",
                                 "factory+torchscript"])
def test_spectrum_of_saved_model_matches_dense_hessian(saved, tmp_path, capsys, monkeypatch,
                                                       how):
    d, _, lam = saved
    monkeypatch.chdir(d)  # the factory module sits in the working directory
    model_file = {"torchscript": "scripted.pt", "factory": "weights.pt",
                  "factory+safetensors": "weights.safetensors",
                  "factory+torchscript": "scripted.pt"}[how]
    argv = ["spectrum", "--model", str(d / model_file), "--data", str(d / "data.npz"),
            "--n-components", "6", "--tol", "1e-8", "--n-probes", "2", "--n-steps", "12",
            "--output-dir", str(tmp_path), "--quiet"]
    if how.startswith("factory"):
        argv += ["--factory", "tinynets:make_net"]
    code, out, err = _run(capsys, argv)
    assert code == 0, err
    record = json.loads((tmp_path / "spectrum.json").read_text())
    np.testing.assert_allclose(record["eigenvalues"], lam[:6], rtol=1e-6, atol=1e-9 * lam[0])
    assert record["n_classes"] == 3 and record["n_parameters"] == 5 * 7 + 7 + 7 * 3 + 3
    assert (tmp_path / "spectrum.png").read_bytes().startswith(PNG_MAGIC)
    # the printed table: one line per eigenvalue, the spike count line
    printed = [float(m) for m in re.findall(r"^\s+\d+\s+(\S+)\s+\S+", out, flags=re.M)]
    np.testing.assert_allclose(printed, lam[:6], rtol=1e-5)
    assert f"spikes: {record['n_spikes']} " in out and "C − 1 = 2" in out


def test_scripted_adapter_gives_the_eager_hessian(saved):
    d, model, _ = saved
    from hessrebal.curvature import HessianOperator

    scripted, kind = load_model(d / "scripted.pt")
    assert kind == "TorchScript"
    assert [n for n, _ in scripted.named_parameters()] == [n for n, _ in
                                                          model.named_parameters()]
    X, y = load_npz(d / "data.npz")
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    a = HessianOperator(scripted, torch.as_tensor(X), torch.as_tensor(y)).matvec(v)
    b = HessianOperator(model, torch.as_tensor(X), torch.as_tensor(y)).matvec(v)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the scripted module's own weights are back in place after each call
    x = torch.as_tensor(X[:4])
    torch.testing.assert_close(scripted.scripted(x), model(x))


def _one_line_error(capsys, argv, match):
    code, out, err = _run(capsys, argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"hessrebal {argv[0]}: error: ")
    assert "Traceback" not in err
    assert re.search(match, lines[0]), lines[0]


def test_spectrum_errors_are_one_line(saved, tmp_path, capsys, monkeypatch):
    d, _, _ = saved
    monkeypatch.chdir(d)
    data = str(d / "data.npz")
    sd = str(d / "weights.pt")
    np.savez(tmp_path / "noy.npz", X=np.zeros((3, 5)))
    np.savez(tmp_path / "badshape.npz", X=np.zeros((4, 9)), y=np.zeros(4, dtype=int))
    np.savez(tmp_path / "floaty.npz", X=np.zeros((4, 5)), y=np.full(4, 0.5))
    (tmp_path / "afile").write_text("x")
    cases = [
        (["--model", str(tmp_path / "missing.pt"), "--data", data], "does not exist"),
        (["--model", sd, "--data", data], "not a TorchScript file.*--factory"),
        (["--model", sd, "--data", data, "--factory", "tinynets"], "package.module:factory"),
        (["--model", sd, "--data", data, "--factory", "nosuchmod:f"], "cannot import"),
        (["--model", sd, "--data", data, "--factory", "tinynets:nope"], "no attribute"),
        (["--model", sd, "--data", data, "--factory", "tinynets:not_a_module"],
         "not a torch.nn.Module"),
        (["--model", data, "--data", data, "--factory", "tinynets:make_net"],
         "weights_only=True"),
        (["--model", sd, "--data", str(tmp_path / "noy.npz"), "--factory",
          "tinynets:make_net"], "no array 'y'"),
        (["--model", sd, "--data", str(tmp_path / "badshape.npz"), "--factory",
          "tinynets:make_net"], "cannot take X of shape"),
        (["--model", sd, "--data", str(tmp_path / "floaty.npz"), "--factory",
          "tinynets:make_net"], "integer class labels"),
        (["--model", sd, "--data", sd, "--factory", "tinynets:make_net"], "no array 'X'"),
        (["--model", sd, "--data", str(tmp_path / "afile"), "--factory", "tinynets:make_net"],
         "cannot read .* as an .npz file"),
        (["--model", sd, "--data", data, "--factory", "tinynets:make_net",
          "--n-components", "0"], "--n-components must be a positive"),
        (["--model", sd, "--data", data, "--factory", "tinynets:make_net",
          "--output-dir", str(tmp_path / "afile")], "not a directory"),
        (["--model", sd, "--data", data, "--factory", "tinynets:make_net", "--device",
          "nodevice"], "--device"),
    ]
    for args, match in cases:
        _one_line_error(capsys, ["spectrum", *args, "--quiet"], match)


def test_demo_error_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    _one_line_error(capsys, ["demo", "--output-dir", str(tmp_path / "afile")],
                    "not a directory")
    _one_line_error(capsys, ["demo", "--epochs", "0", "--dataset", "digits-lt"], "epochs")


# -------------------------------------------------------------------- help
@pytest.mark.parametrize("command, options", [
    ("demo", ["--output-dir", "--dataset", "--imbalance-ratio", "--epochs", "--max-steps",
              "--seed", "--threads", "--quiet"]),
    ("spectrum", ["--model", "--data", "--factory", "--output-dir", "--n-components",
                  "--curvature", "--max-samples", "--batch-size", "--tol", "--no-density",
                  "--n-probes", "--n-steps", "--device", "--seed", "--threads", "--quiet"]),
    ("fit", ["--model", "--factory", "--val", "--curvature", "--test", "--output-dir",
             "--method", "--n-components", "--max-steps", "--config", "--seed", "--device",
             "--threads", "--quiet"]),
])
def test_help_documents_every_option(command, options, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    declared = {o for a in sub._actions for o in a.option_strings if o.startswith("--")}
    assert declared - {"--help"} == set(options)
    for option in options:
        assert option in text
    for action in sub._actions:
        assert action.help, f"{command} {action.option_strings} has no help text"
    assert "example" in text


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("demo", "fit", "spectrum", "bench"):
        assert command in text


# ------------------------------------------------------------------ docs/api
def test_api_reference_is_current():
    """docs/api.md is generated from the docstrings; regenerate it after a change."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "docs" / "_make_api.py"
    spec = importlib.util.spec_from_file_location("_make_api", path)
    make_api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_api)
    text = make_api.render()
    assert "class `SpectralSurgeon(" in text and "`write_report(result, output_dir)`" in text
    assert make_api.OUT.read_text(encoding="utf-8") == text, (
        "docs/api.md is out of date: run `python docs/_make_api.py`.")
