"""Displays: each draws from a fitted surgeon (Agg), with the right artists and numbers."""

import subprocess
import sys

import matplotlib
import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError
from torch import nn

from hessrebal import SpectralSurgeon
from hessrebal.plotting import (
    HistoryDisplay,
    PerClassAccuracyDisplay,
    SensitivityDisplay,
    SpectrumDisplay,
    spectrum_summary,
)
from hessrebal.spectrum import MatrixOperator, count_spikes
from tests._reference import dense_hessian
from tests.conftest import train_full_batch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

C = 4


COUNTS = np.array([60, 30, 12, 5])  # training counts: class 0 head ... class 3 tail


def _blobs(n_per_class, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 2.0]],
                           dtype=torch.float64)
    X = torch.cat([centers[c] + 1.2 * torch.randn(n, 4, generator=g, dtype=torch.float64)
                   for c, n in enumerate(n_per_class)])
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    return X, y


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, C)).to(torch.float64)
    Xtr, ytr = _blobs(COUNTS, 0)
    train_full_batch(model, Xtr, ytr, 0.05, 150)
    model.eval()
    Xv, yv = _blobs([30] * C, 1)
    Xt, yt = _blobs([40] * C, 2)
    surgeon = SpectralSurgeon(max_steps=4, random_state=0).fit(model, Xv, yv)
    yield model, surgeon, (Xv, yv), (Xt, yt)
    plt.close("all")


def _per_class(model, X, y):
    with torch.no_grad():
        pred = model(X).argmax(1).numpy()
    y = y.numpy()
    return np.array([(pred[y == c] == c).mean() for c in range(C)])


# ------------------------------------------------------------------ spectrum
def test_spectrum_from_surgeon_without_data(fitted):
    _, s, _, _ = fitted
    disp = SpectrumDisplay.from_surgeon(s)
    assert disp.figure_ is disp.ax_.figure and len(disp.axes_) == 1
    # every eigenvalue the surgeon used is a spike, drawn filled
    np.testing.assert_allclose(disp.spike_line_.get_ydata(), np.sort(s.eigenvalues_)[::-1])
    assert len(disp.spike_line_.get_xdata()) == s.n_components_
    assert disp.class_line_.get_xdata()[0] == pytest.approx(C - 0.5)
    assert disp.bulk_line_ is None and disp.bulk_edge_ is None
    assert disp.ax_.get_yscale() == "log"
    assert disp.ax_.get_xlabel() == "index i" and "eigenvalue" in disp.ax_.get_ylabel()
    assert disp.figure_._suptitle.get_text() == "Hessian spectrum"
    labels = [t.get_text() for t in disp.ax_.get_legend().get_texts()]
    assert f"C − 1 = {C - 1}" in labels


def test_spectrum_from_surgeon_with_data_matches_dense_hessian(fitted):
    model, s, (Xv, yv), _ = fitted
    disp = SpectrumDisplay.from_surgeon(s, model, Xv, yv, n_components=2 * C, n_probes=2,
                                        n_steps=20)
    H = dense_hessian(model, Xv, yv)
    ref = np.sort(np.linalg.eigvalsh(H.numpy()))[::-1][: 2 * C]
    np.testing.assert_allclose(disp.summary_["eigenvalues"], ref, rtol=1e-4,
                               atol=1e-6 * ref[0])
    assert len(disp.axes_) == 2
    dens_ax = disp.axes_[1]
    assert dens_ax.get_yscale() == "log" and "density" in dens_ax.get_ylabel()
    assert "stochastic Lanczos" in dens_ax.get_title()
    n = disp.n_spikes_
    assert n == count_spikes(ref)
    if n < 2 * C:
        assert disp.bulk_edge_ == pytest.approx(ref[n], rel=1e-4)
    # the density line is the SLQ estimate on the grid (finite, non-negative, positive mass)
    x, p = disp.density_line_.get_data()
    assert np.all(np.isfinite(p)) and np.all(p > 0)
    assert disp.summary_["n_matvec"] >= 2 * 20


def test_spectrum_display_from_arrays_spikes_and_bulk_edge():
    lam = [40.0, 25.0, 12.0, 3.0, 2.9, 2.8]
    disp = SpectrumDisplay.from_spectrum(lam, n_classes=4)
    assert disp.n_spikes_ == 3 and disp.bulk_edge_ == 3.0
    assert len(disp.spike_line_.get_xdata()) == 3
    assert disp.bulk_line_.get_ydata()[0] == 3.0
    disp = SpectrumDisplay(lam, n_spikes=2, bulk_edge=10.0).plot()
    assert disp.bulk_line_.get_ydata()[0] == 10.0 and disp.class_line_ is None
    # no spike stands out: no bulk edge either (it would sit on λ₁)
    disp = SpectrumDisplay([3.1, 3.0, 2.9]).plot()
    assert disp.n_spikes_ == 0 and disp.bulk_edge_ is None and disp.spike_line_ is None
    # negative eigenvalues cannot sit on a log axis: symlog instead
    disp = SpectrumDisplay([5.0, 1.0, -0.5]).plot()
    assert disp.ax_.get_yscale() == "symlog"
    plt.close("all")


def test_spectrum_display_on_given_axes_and_errors():
    fig, (a, b) = plt.subplots(1, 2)
    grid = np.linspace(0, 10, 50)
    disp = SpectrumDisplay([9.0, 1.0], density_grid=grid, density=np.exp(-grid)).plot(ax=[a, b])
    assert disp.figure_ is fig and disp.axes_ == [a, b] and b.get_lines()
    fig2, c = plt.subplots()
    disp = SpectrumDisplay([9.0, 1.0], density_grid=grid, density=np.exp(-grid)).plot(ax=c)
    assert disp.axes_ == [c] and disp.density_line_ is None
    with pytest.raises(ValueError, match="together"):
        SpectrumDisplay([1.0], density=[1.0]).plot()
    with pytest.raises(ValueError, match="eigenvalues"):
        SpectrumDisplay([np.nan, 1.0]).plot()
    with pytest.raises(TypeError, match="Axes"):
        SpectrumDisplay([1.0]).plot(ax="left")
    with pytest.raises(ValueError, match="n_spikes"):
        SpectrumDisplay([2.0, 1.0], n_spikes=3).plot()
    plt.close("all")


def test_spectrum_summary_counts_products_of_a_planted_operator():
    lam = np.r_[[50.0, 20.0, 8.0], np.linspace(0.1, 1.0, 57)]
    op = MatrixOperator(torch.diag(torch.as_tensor(lam)))
    out = spectrum_summary(op, 6, tol=1e-10, n_probes=3, n_steps=15, random_state=0)
    np.testing.assert_allclose(out["eigenvalues"], np.sort(lam)[::-1][:6], rtol=1e-6)
    assert out["n_spikes"] == 3
    # grid and density integrate to one (SLQ weights sum to 1)
    assert np.trapezoid(out["density"], out["density_grid"]) == pytest.approx(1.0, abs=1e-3)
    lanczos_only = spectrum_summary(op, 6, tol=1e-10, density=False, random_state=0)
    assert out["n_matvec"] == lanczos_only["n_matvec"] + 3 * 15
    assert lanczos_only["density"] is None


# ---------------------------------------------------------- per-class accuracy
def test_per_class_from_surgeon_on_held_out_data(fitted):
    model, s, _, (Xt, yt) = fitted
    from hessrebal.baselines import LogitAdjustment

    la = LogitAdjustment(class_prior=COUNTS / COUNTS.sum()).fit(model, *fitted[2])
    disp = PerClassAccuracyDisplay.from_surgeon(
        s, model, Xt, yt, baselines={"logit adjustment": la.transform(model)},
        class_counts=COUNTS[::-1].copy(), class_names=list("abcd"))
    # counts reversed: class 3 is the most frequent, so the order is 3, 2, 1, 0
    assert disp.order_.tolist() == [3, 2, 1, 0]
    assert len(disp.ax_.patches) == 3 * C
    expected = {
        "before": _per_class(model, Xt, yt),
        "spectral surgery": _per_class(s.transform(model), Xt, yt),
        "logit adjustment": _per_class(la.transform(model), Xt, yt),
    }
    for name, acc in expected.items():
        heights = [p.get_height() for p in disp.bars_[name]]
        np.testing.assert_allclose(heights, acc[disp.order_])
    legend = [t.get_text() for t in disp.ax_.get_legend().get_texts()]
    assert legend[0].startswith("before (bal. acc. ")
    assert f"{np.mean(expected['spectral surgery']):.3f}" in legend[1]
    assert f"σ {np.std(expected['logit adjustment']):.3f}" in legend[2]
    ticks = [t.get_text() for t in disp.ax_.get_xticklabels()]
    assert ticks == ["d\nn=60", "c\nn=30", "b\nn=12", "a\nn=5"]
    assert disp.ax_.get_title() == "Per-class accuracy" and disp.ax_.get_ylabel() == "accuracy"


def test_per_class_from_surgeon_selection_data(fitted):
    _, s, _, _ = fitted
    disp = PerClassAccuracyDisplay.from_surgeon(s, class_counts=COUNTS)
    assert disp.order_.tolist() == [0, 1, 2, 3] and len(disp.ax_.patches) == 2 * C
    np.testing.assert_allclose([p.get_height() for p in disp.bars_["before"]],
                               s.per_class_accuracy_before_)
    np.testing.assert_allclose([p.get_height() for p in disp.bars_["spectral surgery"]],
                               s.per_class_accuracy_after_)
    with pytest.raises(ValueError, match="classes"):
        PerClassAccuracyDisplay([0.5, 0.5], [0.5, 0.5, 0.5]).plot()
    with pytest.raises(ValueError, match="class_counts"):
        PerClassAccuracyDisplay([0.5, 0.5], [0.5, 0.5], class_counts=[1, 2, 3]).plot()
    with pytest.raises(ValueError, match="pass X"):
        PerClassAccuracyDisplay.from_surgeon(s, baselines={"m": nn.Linear(4, C)})
    plt.close("all")


# --------------------------------------------------------------- sensitivity
def test_sensitivity_heat_map_is_centred_and_ordered(fitted):
    _, s, _, _ = fitted
    disp = SensitivityDisplay.from_surgeon(s, class_counts=COUNTS[::-1].copy())
    S = s.sensitivity_
    order = [3, 2, 1, 0]
    np.testing.assert_allclose(disp.im_.get_array(), S[order])
    vmax = np.abs(S).max()
    assert disp.im_.norm.vmin == pytest.approx(-vmax) and disp.im_.norm.vmax == pytest.approx(vmax)
    assert disp.im_.get_cmap().name == "RdBu"
    assert "sensitivity" in disp.colorbar_.ax.get_ylabel()
    assert disp.text_.shape == S.shape
    assert disp.text_[0, 0].get_text() == f"{S[3, 0]:.2g}"
    xt = [t.get_text() for t in disp.ax_.get_xticklabels()]
    assert xt[0] == f"q1\n{s.eigenvalues_[0]:.3g}" and len(xt) == S.shape[1]
    assert [t.get_text() for t in disp.ax_.get_yticklabels()][0] == "3 (n=60)"
    assert disp.ax_.get_title() == "Spike–class sensitivity"
    # all-zero sensitivity still gives a centred, valid norm
    disp = SensitivityDisplay(np.zeros((2, 2))).plot(colorbar=False, annotate=False)
    assert (disp.im_.norm.vmin, disp.im_.norm.vmax) == (-1.0, 1.0) and disp.text_ is None
    with pytest.raises(ValueError, match="2-D"):
        SensitivityDisplay([1.0, 2.0]).plot()
    plt.close("all")


# ------------------------------------------------------------------- history
def test_history_marks_accepted_and_rolled_back_steps(fitted):
    _, s, _, _ = fitted
    disp = HistoryDisplay.from_surgeon(s)
    h = s.history_
    acc = np.array([e["accepted"] for e in h])
    steps = np.array([e["step"] for e in h])  # one numbering: history_["step"], from 0
    assert steps[0] == 0
    np.testing.assert_array_equal(disp.accepted_markers_.get_xdata(), steps[acc])
    np.testing.assert_array_equal(disp.rejected_markers_.get_xdata(), steps[~acc])
    np.testing.assert_allclose(disp.accepted_markers_.get_ydata(),
                               [e["budget"] for e in h if e["accepted"]])
    budget_ax, score_ax = disp.axes_
    assert budget_ax.get_title() == "Amplitude control"
    assert budget_ax.get_ylabel() == "budget α_max" and score_ax.get_xlabel() == "step"
    sigma_line = score_ax.get_lines()[0]
    np.testing.assert_allclose(sigma_line.get_ydata(),
                               [np.std(s.per_class_accuracy_before_)]
                               + [e["class_std"] for e in h])
    np.testing.assert_array_equal(sigma_line.get_xdata(), np.r_[-1, steps])
    assert score_ax.get_xticklabels()[0].get_text() == "before"
    assert [t.get_text() for t in score_ax.get_xticklabels()][1:3] == ["0", "1"]
    legend = [t.get_text() for t in budget_ax.get_legend().get_texts()]
    assert f"accepted ({acc.sum()})" in legend and f"rolled back ({(~acc).sum()})" in legend


def test_history_display_from_arrays_and_errors():
    disp = HistoryDisplay([0.1, 0.1, 0.07], [0.3, 0.3, 0.25], [False, False, True],
                          candidate_class_std=[0.4, np.nan, 0.25]).plot()
    assert len(disp.accepted_markers_.get_xdata()) == 1
    assert len(disp.rejected_markers_.get_xdata()) == 2
    fig, ax = plt.subplots()
    disp = HistoryDisplay([0.1], [0.3], [True]).plot(ax=ax)
    assert disp.axes_ == [ax] and ax.get_xlabel() == "step"
    with pytest.raises(ValueError, match="accepted"):
        HistoryDisplay([0.1, 0.2], [0.3, 0.3], [True]).plot()
    plt.close("all")


def test_unfitted_surgeon_is_refused():
    for display in (SpectrumDisplay, PerClassAccuracyDisplay, SensitivityDisplay,
                    HistoryDisplay):
        with pytest.raises(NotFittedError):
            display.from_surgeon(SpectralSurgeon())


def test_matplotlib_is_imported_lazily():
    code = ("import sys, hessrebal.plotting, hessrebal.report, hessrebal.cli; "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
