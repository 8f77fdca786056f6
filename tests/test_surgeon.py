import itertools

import numpy as np
import pytest
import torch
from sklearn.base import clone
from torch import nn

from hessrebal import SpectralSurgeon
from hessrebal.amplitude import AdamSNR, GammaDecay, GrowShrink
from hessrebal.sensitivity import FiniteDifferenceSensitivity, SoftmaxSurrogateSensitivity
from hessrebal.solvers import CvxpyQPSolver, ProjectedGradientSolver
from hessrebal.spectrum import DenseSpectrum, LanczosSpectrum, PowerIterationSpectrum, Spectrum
from hessrebal.surgeon import default_budget
from tests.conftest import assert_unchanged, snapshot, tiny_cnn, train_full_batch


def imbalanced_problem(seed=0, n_classes=3, d=4, hidden=8):
    """A small classifier trained on imbalanced Gaussian blobs: the rare class is weak."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n_classes, d, generator=g) * 1.2
    counts_train = [200, 60, 12][:n_classes]

    def sample(counts):
        X = torch.cat([means[c] + torch.randn(n, d, generator=g) for c, n in enumerate(counts)])
        y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
        return X, y

    Xtr, ytr = sample(counts_train)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, n_classes))
    train_full_batch(model, Xtr, ytr, 0.05, 150)
    model.eval()
    Xval, yval = sample([60] * n_classes)
    Xte, yte = sample([200] * n_classes)
    return model, (Xtr, ytr), (Xval, yval), (Xte, yte)


@pytest.fixture(scope="module")
def problem():
    return imbalanced_problem()


def test_fit_leaves_model_bitwise_unchanged_and_transform_moves_selection_only(problem):
    model, _, (Xv, yv), _ = problem
    model.train()  # the surgeon must evaluate in eval mode and restore this
    snap = snapshot(model)
    s = SpectralSurgeon(max_steps=3, params=["2"], random_state=0).fit(model, Xv, yv)
    assert_unchanged(model, snap)
    new = s.transform(model)
    assert_unchanged(model, snap)
    assert s.parameter_names_ == ["2.weight", "2.bias"]
    assert torch.equal(new[0].weight, model[0].weight) and torch.equal(new[0].bias, model[0].bias)
    moved = torch.cat([(new[2].weight - model[2].weight).reshape(-1),
                       new[2].bias - model[2].bias])
    torch.testing.assert_close(moved, s.perturbation_, rtol=0, atol=1e-6)
    in_place = s.transform(model, copy=False)
    assert in_place is model
    torch.testing.assert_close(model[2].weight, new[2].weight)
    model.eval()


def test_fitted_attributes_are_consistent(problem):
    model, _, (Xv, yv), _ = problem
    s = SpectralSurgeon(max_steps=4, random_state=0).fit(model, Xv, yv)
    D = sum(p.numel() for p in model.parameters())
    k = 2  # C − 1
    assert s.n_components_ == k and s.n_classes_ == 3
    assert s.eigenvectors_.shape == (D, k) and s.eigenvalues_.shape == (k,)
    assert np.all(np.diff(s.eigenvalues_) <= 0)
    Q = s.eigenvectors_
    torch.testing.assert_close(Q.T @ Q, torch.eye(k), atol=1e-4, rtol=0)
    assert s.sensitivity_.shape == (3, k)
    np.testing.assert_allclose(s.coef_, (Q.T @ s.perturbation_).numpy(), rtol=1e-6)
    assert s.predicted_loss_increase_ == pytest.approx(
        0.5 * np.sum(s.eigenvalues_ * s.coef_**2))
    assert len(s.history_) == 4 and s.n_hvp_ > 0
    # perturbation_ is the sum of the accepted steps
    accepted = [h for h in s.history_ if h["accepted"]]
    total = sum(np.linalg.norm(h["alpha"]) for h in accepted)
    assert float(s.perturbation_.norm()) <= total + 1e-5
    if not accepted:
        assert float(s.perturbation_.norm()) == 0
    # history's last state is the state after
    np.testing.assert_allclose(s.history_[-1]["per_class_accuracy"], s.per_class_accuracy_after_)
    assert s.initial_budget_ == pytest.approx(default_budget(s.eigenvalues_[0]))


def test_surgery_helps_the_rare_class_on_held_out_data(problem):
    model, _, (Xv, yv), (Xt, yt) = problem
    s = SpectralSurgeon(random_state=0).fit(model, Xv, yv)
    new = s.transform(model)
    before = SpectralSurgeon().set_params()  # scoring helper below

    def per_class(m):
        with torch.no_grad():
            pred = m(Xt).argmax(1)
        return np.array([(pred[yt == c] == c).float().mean().item() for c in range(3)])

    a0, a1 = per_class(model), per_class(new)
    assert a0.std() - a1.std() > 0.02, (a0, a1)
    assert a1.mean() > a0.mean()
    assert s.score(model, Xt, yt) == pytest.approx(a1.mean())
    del before


@pytest.mark.parametrize(
    "sensitivity,solver,amplitude",
    list(itertools.product(
        [FiniteDifferenceSensitivity(), FiniteDifferenceSensitivity(scheme="forward"),
         SoftmaxSurrogateSensitivity(), SoftmaxSurrogateSensitivity(kind="log_probability")],
        [CvxpyQPSolver(), ProjectedGradientSolver()],
        [GammaDecay(), AdamSNR(), GrowShrink()])),
)
def test_all_strategy_combinations_give_finite_perturbations(problem, sensitivity, solver,
                                                              amplitude):
    model, _, (Xv, yv), _ = problem
    s = SpectralSurgeon(sensitivity=sensitivity, solver=solver, amplitude=amplitude,
                        max_steps=2, refresh_spectrum=0, random_state=0).fit(model, Xv, yv)
    assert torch.isfinite(s.perturbation_).all()
    assert all(np.isfinite(h["budget"]) for h in s.history_)


@pytest.mark.parametrize("objective,shape", [("maxmin", "l2"), ("weighted", "box")])
def test_objectives_and_budget_shapes(problem, objective, shape):
    model, _, (Xv, yv), _ = problem
    s = SpectralSurgeon(objective=objective, budget_shape=shape, curvature_penalty=0.5,
                        max_steps=2, random_state=0).fit(model, Xv, yv)
    for h in s.history_:
        alpha = np.asarray(h["alpha"])
        if shape == "l2":
            assert np.linalg.norm(alpha) <= h["budget"] * (1 + 1e-6)
        else:
            assert np.all(np.abs(alpha) <= h["budget"] * (1 + 1e-6))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # power iteration
def test_spectrum_backends_agree_and_n_components(problem):
    model, _, (Xv, yv), _ = problem
    kw = dict(max_steps=0, random_state=0)
    dense = SpectralSurgeon(spectrum=DenseSpectrum(), n_components=3, **kw).fit(model, Xv, yv)
    lanczos = SpectralSurgeon(spectrum=LanczosSpectrum(tol=1e-6), n_components=3,
                              **kw).fit(model, Xv, yv)
    power = SpectralSurgeon(spectrum=PowerIterationSpectrum(tol=1e-6, max_iter=500),
                            n_components=3, **kw).fit(model, Xv, yv)
    np.testing.assert_allclose(lanczos.eigenvalues_, dense.eigenvalues_, rtol=1e-4)
    np.testing.assert_allclose(power.eigenvalues_, dense.eigenvalues_, rtol=1e-3)
    assert lanczos.n_hvp_ < power.n_hvp_
    auto = SpectralSurgeon(n_components="auto", **kw).fit(model, Xv, yv)
    assert 1 <= auto.n_components_ <= 6 and auto.eigenvectors_.shape[1] == auto.n_components_


def test_curvature_data_and_ggn(problem):
    model, (Xtr, ytr), (Xv, yv), _ = problem
    on_val = SpectralSurgeon(max_steps=0, spectrum=DenseSpectrum()).fit(model, Xv, yv)
    on_train = SpectralSurgeon(max_steps=0, spectrum=DenseSpectrum()).fit(
        model, Xv, yv, curvature_data=(Xtr, ytr))
    assert not np.allclose(on_val.eigenvalues_, on_train.eigenvalues_)
    # the spectrum is that of the training data's Hessian
    from hessrebal import HessianOperator

    ref = DenseSpectrum().compute(HessianOperator(model, Xtr, ytr), 2)
    np.testing.assert_allclose(on_train.eigenvalues_, ref.eigenvalues.numpy(), rtol=1e-5)
    ggn = SpectralSurgeon(max_steps=0, curvature="ggn", spectrum=DenseSpectrum()).fit(
        model, Xv, yv)
    assert np.all(ggn.eigenvalues_ > 0)


def test_clone_and_nested_params():
    s = SpectralSurgeon(amplitude=GammaDecay(gamma=0.5), solver=ProjectedGradientSolver())
    params = s.get_params(deep=True)
    assert params["amplitude__gamma"] == 0.5
    s.set_params(amplitude__gamma=0.9, solver__max_iter=10)
    assert s.amplitude.gamma == 0.9 and s.solver.max_iter == 10
    c = clone(s)
    assert c.amplitude is not s.amplitude and c.amplitude.gamma == 0.9


def test_user_strategy_instances_are_not_mutated(problem):
    model, _, (Xv, yv), _ = problem
    amp = AdamSNR()
    SpectralSurgeon(amplitude=amp, max_steps=2).fit(model, Xv, yv)
    assert not hasattr(amp, "t_") and not any(k.endswith("_") for k in vars(amp))


def test_cnn_with_batchnorm_and_dict_output():
    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_cnn()

        def forward(self, x):
            return {"logits": self.net(x)}

    model = DictOut()
    model.train()
    snap = snapshot(model)
    X = torch.randn(60, 1, 5, 5, dtype=torch.float64)
    y = torch.arange(60) % 3
    s = SpectralSurgeon(max_steps=2, random_state=0).fit(model, X, y)
    assert_unchanged(model, snap)
    assert torch.isfinite(s.perturbation_).all()
    custom = SpectralSurgeon(max_steps=1, random_state=0,
                             output_to_logits=lambda out: out["logits"]).fit(model, X, y)
    np.testing.assert_array_equal(custom.eigenvalues_, s.eigenvalues_)


def test_default_budget_rule():
    assert default_budget(830.0) == pytest.approx(np.sqrt(2 * 0.05 / 830))
    assert default_budget(8.0) > 10 * default_budget(830.0)
    assert default_budget(0.0) > 0  # degenerate curvature still gives a usable budget


def test_total_class_drop_cap_bounds_every_accepted_state(problem):
    model, _, (Xv, yv), _ = problem
    free = SpectralSurgeon(max_steps=6, random_state=0, max_class_drop=0.2).fit(model, Xv, yv)
    capped = SpectralSurgeon(max_steps=6, random_state=0, max_class_drop=0.2,
                             max_total_class_drop=0.0).fit(model, Xv, yv)
    start = capped.per_class_accuracy_before_
    for h in capped.history_:
        assert np.all(np.asarray(h["per_class_accuracy"]) >= start - 1e-12)
    # without the cap some accepted step lowers a class (the test is not vacuous)
    lowest = min(np.min(np.asarray(h["per_class_accuracy"]) - free.per_class_accuracy_before_)
                 for h in free.history_)
    assert lowest < 0
    assert any("in total" in h["reason"] for h in capped.history_)
    with pytest.raises(ValueError, match="max_total_class_drop"):
        SpectralSurgeon(max_total_class_drop=-1).fit(model, Xv, yv)


def test_balanced_accuracy_guard_never_lets_an_accepted_step_lower_it(problem):
    model, _, (Xv, yv), _ = problem
    paper = dict(acceptance="tolerance", max_total_class_drop=None, max_class_drop=0.3)
    free = SpectralSurgeon(max_steps=8, random_state=0, max_balanced_accuracy_drop=None,
                           **paper).fit(model, Xv, yv)
    guarded = SpectralSurgeon(max_steps=8, random_state=0, **paper).fit(model, Xv, yv)
    assert guarded.max_balanced_accuracy_drop == 0.0  # the default
    trace = [h["balanced_accuracy"] for h in guarded.history_]
    assert all(b >= a - 1e-12 for a, b in zip(trace, trace[1:]))
    # without the guard some accepted step trades balanced accuracy for σ here
    free_trace = [h["balanced_accuracy"] for h in free.history_]
    assert any(b < a - 1e-12 for a, b in zip(free_trace, free_trace[1:]))
    assert any(h["reason"].startswith("balanced accuracy fell") for h in guarded.history_)
    with pytest.raises(ValueError, match="max_balanced_accuracy_drop"):
        SpectralSurgeon(max_balanced_accuracy_drop=-0.1).fit(model, Xv, yv)


def test_paper_faithful_settings_are_one_call_away(problem):
    model, _, (Xv, yv), _ = problem
    s = SpectralSurgeon.paper_faithful(max_steps=2, random_state=0)
    assert isinstance(s.sensitivity, FiniteDifferenceSensitivity)
    assert isinstance(s.amplitude, GammaDecay) and s.amplitude.gamma == 0.7
    assert (s.weight_power, s.acceptance, s.max_total_class_drop,
            s.max_balanced_accuracy_drop) == ("auto", "tolerance", None, None)
    default = SpectralSurgeon()
    assert (default.acceptance, default.max_total_class_drop,
            default.max_balanced_accuracy_drop) == ("noise_aware", 0.1, 0.0)
    # It is a plain estimator: clonable, and it fits.
    assert clone(s).get_params()["weight_power"] == "auto"
    assert len(s.fit(model, Xv, yv).history_) == 2


class _SameSpanRefresh(DenseSpectrum):
    """At a refresh, the previous spikes rotated within their span, with other
    eigenvalues: what a refresh that only re-diagonalises the old span returns."""

    calls: list[str] = []

    def compute(self, operator, n_components, init=None):
        if init is None:
            type(self).calls.append("first")
            return super().compute(operator, n_components)
        type(self).calls.append("refresh")
        k = init.shape[1]
        g = torch.Generator().manual_seed(len(type(self).calls))
        R, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=init.dtype))
        values = torch.sort(1.0 + torch.rand(k, generator=g, dtype=init.dtype),
                            descending=True).values
        return Spectrum(eigenvalues=values, eigenvectors=init @ R, n_matvec=0,
                        residuals=np.zeros(k), converged=np.ones(k, dtype=bool))


def test_refreshes_follow_accepted_steps_and_a_same_span_refresh_changes_nothing(problem):
    # docs/performance.md: with the default l2 budget, no curvature penalty and
    # the (linear) surrogate, the step depends on the span of the spikes only.
    model, _, (Xv, yv), _ = problem
    kwargs = dict(max_steps=6, budget=0.5, random_state=0)
    kept = SpectralSurgeon(spectrum=DenseSpectrum(), refresh_spectrum=0, **kwargs).fit(
        model, Xv, yv)
    _SameSpanRefresh.calls = []
    rotated = SpectralSurgeon(spectrum=_SameSpanRefresh(), refresh_spectrum=1, **kwargs).fit(
        model, Xv, yv)
    accepted = [h["accepted"] for h in rotated.history_]
    # a refresh before every step that follows an accepted one, and only then
    assert _SameSpanRefresh.calls.count("first") == 1
    assert _SameSpanRefresh.calls.count("refresh") == sum(accepted[:-1]) >= 1
    assert accepted == [h["accepted"] for h in kept.history_]
    torch.testing.assert_close(rotated.perturbation_, kept.perturbation_, rtol=1e-5, atol=1e-7)


def test_imbalance_pvalue_is_the_chi_square_test_of_homogeneity():
    from scipy.stats import chi2

    from hessrebal.metrics import imbalance_pvalue

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    correct = rng.random(300) < np.array([0.9, 0.8, 0.6, 0.95])[y]
    right = np.bincount(y, weights=correct, minlength=4)
    n = np.bincount(y, minlength=4)
    observed = np.stack([right, n - right], 1)
    expected = n[:, None] * observed.sum(0)[None, :] / n.sum()
    stat = float(((observed - expected) ** 2 / expected).sum())
    assert imbalance_pvalue(y, correct, 4) == pytest.approx(chi2.sf(stat, 3), rel=1e-10)
    # an absent class is left out; no error at all leaves nothing to test
    assert imbalance_pvalue(y, correct, 6) == pytest.approx(chi2.sf(stat, 3), rel=1e-10)
    assert imbalance_pvalue(y, np.ones(300, bool), 4) == 1.0


def test_no_step_without_evidence_of_an_imbalance():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).to(torch.float64)
    y = torch.arange(300) % 3
    X = torch.randn(300, 4, dtype=torch.float64) + 2.0 * nn.functional.one_hot(y, 4).double()
    train_full_batch(model, X, y, 0.05, 100)  # balanced data: all classes alike
    Xv = torch.randn(90, 4, dtype=torch.float64) + 2.0 * nn.functional.one_hot(
        torch.arange(90) % 3, 4).double()
    yv = torch.arange(90) % 3
    with pytest.warns(UserWarning, match="sampling noise"):
        s = SpectralSurgeon(max_steps=4, random_state=0).fit(model, Xv, yv)
    assert s.imbalance_pvalue_ > 0.05 and s.history_ == []
    assert float(s.perturbation_.abs().max()) == 0.0
    # imbalance_alpha=None runs the loop as the paper does
    s = SpectralSurgeon(max_steps=4, random_state=0, imbalance_alpha=None).fit(model, Xv, yv)
    assert len(s.history_) == 4
    for bad in (0, 1.5, "0.05", True):
        with pytest.raises(ValueError, match="imbalance_alpha"):
            SpectralSurgeon(imbalance_alpha=bad).fit(model, Xv, yv)


def test_an_imbalanced_model_passes_the_test(problem):
    model, _, (Xv, yv), _ = problem
    s = SpectralSurgeon(max_steps=2, random_state=0).fit(model, Xv, yv)
    assert s.imbalance_pvalue_ < 0.05 and len(s.history_) == 2
