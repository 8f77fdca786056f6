"""SpectralSurgeonSearch: the Optuna study, its space, scoring, storage and failures."""

import json
import math
import multiprocessing as mp
import os
import warnings
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from sklearn.metrics import balanced_accuracy_score
from torch import nn
from torch.utils.data import TensorDataset

from hessrebal import SpectralSurgeon
from hessrebal.amplitude import GammaDecay
from hessrebal.models import train_model
from hessrebal.sensitivity import FiniteDifferenceSensitivity, SoftmaxSurrogateSensitivity
from hessrebal.surgeon import BUDGET_LOSS_INCREASE, default_strategies
from hessrebal.tuning import (
    SpectralSurgeonSearch,
    _resolve_storage,
    default_param_distributions,
)
from tests._reference import dense_hessian
from tests.conftest import assert_unchanged, snapshot

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_torch_thread")]


def _blobs(n_per_class, seed):
    """Three overlapping Gaussian classes in 5-D (float64)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[1.0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0], [0, 0, 1.0, 0, 0]],
                           dtype=torch.float64) * 1.5
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    X = centers[y] + torch.randn(len(y), 5, generator=g, dtype=torch.float64)
    return X, y


@pytest.fixture(scope="module")
def task():
    """A small tanh MLP trained on long-tailed blobs (class 2 rare) + balanced val/test."""
    X_tr, y_tr = _blobs([120, 40, 8], seed=0)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.float64)
    train_model(model, X_tr, y_tr, epochs=40, lr=2e-2, batch_size=64, random_state=0)
    X_val, y_val = _blobs([40, 40, 40], seed=1)
    X_te, y_te = _blobs([60, 60, 60], seed=2)
    return model, X_val, y_val, X_te, y_te


def _surgeon(**kw):
    kw.setdefault("max_steps", 2)
    return SpectralSurgeon(**kw)


def _balanced_accuracy_by_hand(surgeon, model, X, y):
    """Independent of hessrebal.metrics: the transformed module, sklearn's metric."""
    changed = surgeon.transform(model)
    with torch.no_grad():
        pred = changed(X).argmax(1)
    return balanced_accuracy_score(y.numpy(), pred.numpy())


def _per_class_by_hand(surgeon, model, X, y):
    changed = surgeon.transform(model)
    with torch.no_grad():
        pred = changed(X).argmax(1).numpy()
    y = y.numpy()
    return np.array([np.mean(pred[y == c] == c) for c in np.unique(y)])


def test_default_space_centres_budget_on_dense_top_eigenvalue(task):
    model, X, y, *_ = task
    search = SpectralSurgeonSearch(_surgeon(), n_trials=2, random_state=0).fit(model, X, y)
    lam1 = float(torch.linalg.eigvalsh(dense_hessian(model, X, y))[-1])
    expected = math.sqrt(2 * BUDGET_LOSS_INCREASE / lam1)
    assert search.reference_budget_ == pytest.approx(expected, rel=1e-4)
    budget = search.param_distributions_["budget"]
    assert budget.log and budget.low == pytest.approx(0.1 * expected, rel=1e-4)
    assert budget.high == pytest.approx(10 * expected, rel=1e-4)
    assert set(search.param_distributions_) == {
        "budget", "amplitude__gamma", "weight_power", "strong_threshold", "preserve_tolerance",
        "curvature_penalty", "objective", "sensitivity"}
    assert search.param_distributions_["weight_power"].choices == (0.0, 0.5, 1.0, 2.0)
    # Object choices travel as their repr and come back as objects.
    labels = search.param_distributions_["sensitivity"].choices
    assert labels == ("SoftmaxSurrogateSensitivity(kind='margin')",
                      "SoftmaxSurrogateSensitivity()", "FiniteDifferenceSensitivity()")
    assert not isinstance(search.best_params_["sensitivity"], str)
    assert repr(search.best_params_["sensitivity"]) == search.best_trial_.params["sensitivity"]


def test_default_space_respects_the_surgeons_own_strategies():
    from hessrebal.amplitude import AdamSNR

    space = default_param_distributions(
        SpectralSurgeon(amplitude=AdamSNR(), sensitivity=FiniteDifferenceSensitivity()))
    assert "amplitude__gamma" not in space and "sensitivity" not in space and "budget" not in space
    space = default_param_distributions(SpectralSurgeon(amplitude=GammaDecay(0.5)), 0.2)
    assert "amplitude__gamma" in space and space["budget"].low == pytest.approx(0.02)


def test_user_budget_is_the_reference(task):
    model, X, y, *_ = task
    search = SpectralSurgeonSearch(_surgeon(budget=0.3), n_trials=1, random_state=0)
    search.fit(model, X, y)
    assert search.reference_budget_ == 0.3


def test_seeded_search_gives_the_same_trials_and_best_params_twice(task):
    model, X, y, *_ = task

    def run(seed):
        s = SpectralSurgeonSearch(_surgeon(), n_trials=4, random_state=seed).fit(model, X, y)
        trials = [(repr(sorted(t.params.items())), t.value) for t in s.study_.trials]
        return s, trials

    a, trials_a = run(0)
    b, trials_b = run(0)
    c, trials_c = run(1)
    assert trials_a == trials_b
    assert repr(a.best_params_) == repr(b.best_params_) and a.best_score_ == b.best_score_
    assert torch.equal(a.best_estimator_.perturbation_, b.best_estimator_.perturbation_)
    assert [t[0] for t in trials_a] != [t[0] for t in trials_c]


def test_best_score_and_refit_match_an_independent_computation(task):
    model, X, y, *_ = task
    snap = snapshot(model)
    base = _surgeon(amplitude=GammaDecay(), random_state=4)
    search = SpectralSurgeonSearch(base, n_trials=3, random_state=0).fit(model, X, y)
    assert_unchanged(model, snap)
    assert base.get_params()["amplitude"].get_params() == {"gamma": 0.7}  # not mutated

    (fit_idx, score_idx), = search.splits_
    assert np.intersect1d(fit_idx, score_idx).size == 0
    assert np.array_equal(np.sort(np.concatenate([fit_idx, score_idx])), np.arange(len(y)))
    assert np.array_equal(np.bincount(y[score_idx].numpy()), [20, 20, 20])  # stratified halves

    manual = SpectralSurgeon(**{**base.get_params(deep=False), "amplitude": GammaDecay()})
    manual.set_params(**search.best_params_)
    manual.fit(model, X[fit_idx], y[fit_idx])
    assert search.best_score_ == pytest.approx(
        _balanced_accuracy_by_hand(manual, model, X[score_idx], y[score_idx]), abs=1e-12)

    refit = manual.fit(model, X, y)
    assert torch.allclose(search.best_estimator_.perturbation_, refit.perturbation_)
    assert search.best_estimator_.random_state == 4  # the surgeon's own seed wins
    changed = search.transform(model)
    assert torch.equal(changed[0].weight, search.best_estimator_.transform(model)[0].weight)


@pytest.mark.parametrize("scoring", ["balanced_accuracy", "balanced_accuracy_minus_std",
                                     "worst_class", "callable"])
def test_scoring_variants_match_hand_computation(task, scoring):
    model, X, y, X_te, y_te = task
    space = {"budget": [0.05], "objective": ["maxmin"]}
    seen = []

    def custom(surgeon, model_, X_, y_):
        seen.append((type(X_), len(y_)))
        return -float(surgeon.predicted_loss_increase_)

    search = SpectralSurgeonSearch(
        _surgeon(), space, n_trials=1, random_state=0, std_penalty=0.5,
        scoring=custom if scoring == "callable" else scoring).fit(model, X, y)
    (fit_idx, score_idx), = search.splits_
    fitted = _surgeon(budget=0.05, objective="maxmin", random_state=0).fit(
        model, X[fit_idx], y[fit_idx])
    acc = _per_class_by_hand(fitted, model, X[score_idx], y[score_idx])
    expected = {"balanced_accuracy": acc.mean(),
                "balanced_accuracy_minus_std": acc.mean() - 0.5 * acc.std(),
                "worst_class": acc.min(),
                "callable": -fitted.predicted_loss_increase_}[scoring]
    assert search.best_score_ == pytest.approx(expected, abs=1e-12)
    if scoring == "callable":
        assert seen[0] == (torch.Tensor, len(score_idx))
    else:
        attrs = search.best_trial_.user_attrs
        assert attrs["class_std"] == pytest.approx(acc.std(), abs=1e-12)
        assert attrs["worst_class_accuracy"] == pytest.approx(acc.min(), abs=1e-12)
        # score() applies the same scoring to the refitted surgeon on new data.
        acc_te = _per_class_by_hand(search.best_estimator_, model, X_te, y_te)
        expected_te = {"balanced_accuracy": acc_te.mean(),
                       "balanced_accuracy_minus_std": acc_te.mean() - 0.5 * acc_te.std(),
                       "worst_class": acc_te.min()}[scoring]
        assert search.score(model, X_te, y_te) == pytest.approx(expected_te, abs=1e-12)


def test_failed_trials_are_recorded_and_not_fatal(task):
    model, X, y, *_ = task
    space = {"objective": CategoricalDistribution(["weighted", "bogus"])}
    sampler = optuna.samplers.GridSampler({"objective": ["weighted", "bogus"]}, seed=0)
    search = SpectralSurgeonSearch(_surgeon(), space, n_trials=2, sampler=sampler,
                                   random_state=0).fit(model, X, y)
    states = {t.params["objective"]: t for t in search.study_.trials}
    assert states["bogus"].state == TrialState.FAIL
    assert "objective" in states["bogus"].user_attrs["error"]
    assert states["weighted"].state == TrialState.COMPLETE
    assert search.best_params_ == {"objective": "weighted"}

    all_bad = SpectralSurgeonSearch(_surgeon(), {"objective": ["bogus"]}, n_trials=2)
    with pytest.raises(ValueError, match="All 2 trials .* failed.*objective"):
        all_bad.fit(model, X, y)


def test_custom_distributions_nested_names_and_object_choices(task):
    model, X, y, *_ = task
    base = _surgeon()
    params_before = repr(base.get_params(deep=True))
    fd, margin = FiniteDifferenceSensitivity(), SoftmaxSurrogateSensitivity(kind="margin")
    space = {"budget": FloatDistribution(1e-3, 1e-1, log=True),
             "amplitude__gamma": FloatDistribution(0.3, 0.9),
             "sensitivity": [fd, margin],
             "max_steps": IntDistribution(1, 2)}
    search = SpectralSurgeonSearch(base, space, n_trials=5, random_state=0).fit(model, X, y)
    assert len(search.study_.trials) == 5
    for t in search.study_.trials:
        assert 1e-3 <= t.params["budget"] <= 1e-1 and 0.3 <= t.params["amplitude__gamma"] <= 0.9
        assert t.params["max_steps"] in (1, 2)
    best = search.best_params_
    est = search.best_estimator_
    assert isinstance(est.amplitude, GammaDecay) and est.amplitude.gamma == best["amplitude__gamma"]
    assert est.budget == best["budget"] and est.max_steps == best["max_steps"]
    assert repr(est.sensitivity) == repr(best["sensitivity"])
    assert est.sensitivity is not fd and est.sensitivity is not margin  # cloned, never shared
    assert repr(base.get_params(deep=True)) == params_before and base.amplitude is None


def test_default_strategies_are_those_the_surgeon_uses(task):
    model, X, y, *_ = task
    a = SpectralSurgeon(max_steps=2, random_state=0).fit(model, X, y)
    b = SpectralSurgeon(max_steps=2, random_state=0, **default_strategies()).fit(model, X, y)
    assert torch.equal(a.perturbation_, b.perturbation_)
    assert [h["budget"] for h in a.history_] == [h["budget"] for h in b.history_]


def test_cross_validation_averages_folds_and_accepts_a_dataset(task):
    model, X, y, *_ = task
    space = {"budget": FloatDistribution(0.01, 0.2, log=True)}
    search = SpectralSurgeonSearch(_surgeon(), space, n_trials=2, cv=3, random_state=0)
    search.fit(model, TensorDataset(X, y), None)
    assert len(search.splits_) == 3
    for t in search.study_.trials:
        assert len(t.user_attrs["fold_scores"]) == 3
        assert t.value == pytest.approx(np.mean(t.user_attrs["fold_scores"]))
    score_parts = np.sort(np.concatenate([s for _, s in search.splits_]))
    assert np.array_equal(score_parts, np.arange(len(y)))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"n_trials": 0}, ValueError, "n_trials"),
    ({"n_trials": None}, ValueError, "timeout"),
    ({"scoring": "accuracy"}, ValueError, "scoring"),
    ({"std_penalty": -1.0, "scoring": "balanced_accuracy_minus_std"}, ValueError, "std_penalty"),
    ({"validation_fraction": 1.0}, ValueError, "validation_fraction"),
    ({"n_jobs": 0}, ValueError, "n_jobs"),
    ({"param_distributions": {"no_such": [1]}}, ValueError, "no_such"),
    ({"param_distributions": {"budget": 0.1}}, TypeError, "budget"),
    ({"param_distributions": {"budget": []}}, ValueError, "budget"),
    ({"storage": "study.txt"}, ValueError, "journal"),
    ({"storage": 3}, TypeError, "storage"),
    ({"sampler": "tpe"}, TypeError, "sampler"),
    ({"surgeon": "surgeon"}, TypeError, "surgeon"),
])
def test_invalid_arguments_raise_naming_them(task, kwargs, error, match):
    model, X, y, *_ = task
    kwargs = {"surgeon": _surgeon(), "n_trials": 1, **kwargs}
    with pytest.raises(error, match=match):
        SpectralSurgeonSearch(**kwargs).fit(model, X, y)


def test_storage_forms(tmp_path):
    from optuna.storages import JournalStorage

    assert _resolve_storage(None) is None
    url = "postgresql://user:secret@db.example.org:5432/optuna"
    assert _resolve_storage(url) == url  # handed to Optuna untouched
    assert isinstance(_resolve_storage(str(tmp_path / "s.log")), JournalStorage)
    assert isinstance(_resolve_storage(tmp_path / "s.journal"), JournalStorage)
    given = JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "o.log")))
    assert _resolve_storage(given) is given


def _worker(journal, seed, out):
    """One worker: its own search on the shared study, its report in a file."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(90, 4, generator=g, dtype=torch.float64)
    y = torch.arange(90) % 3
    search = SpectralSurgeonSearch(
        SpectralSurgeon(max_steps=1, random_state=0),
        {"budget": FloatDistribution(0.01, 1.0, log=True)},
        n_trials=3, storage=journal, study_name="shared", random_state=seed)
    search.fit(model, X, y)
    Path(out).write_text(json.dumps({"ran": search.n_trials_,
                                     "seen": len(search.study_.trials), "pid": os.getpid()}))


def test_two_worker_processes_share_one_journal_study(tmp_path):
    # Forked processes skip the interpreter start and imports (seconds each
    # on a loaded machine); they are still separate processes that meet only
    # in the journal file and its lock.
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("needs the fork start method")
    ctx = mp.get_context("fork")
    journal = str(tmp_path / "study.log")
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    procs = [ctx.Process(target=_worker, args=(journal, i, str(outs[i]))) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.terminate()
        assert p.exitcode == 0
    reports = [json.loads(o.read_text()) for o in outs]
    assert len({r["pid"] for r in reports} | {os.getpid()}) == 3
    assert [r["ran"] for r in reports] == [3, 3]
    assert max(r["seen"] for r in reports) == 6  # the later finisher sees both workers' trials

    study = optuna.load_study(study_name="shared", storage=_resolve_storage(journal))
    assert len(study.trials) == 6
    assert sorted(t.number for t in study.trials) == list(range(6))
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert len({t.params["budget"] for t in study.trials}) == 6

    # A third worker in this process joins the same study and adds its trial.
    SpectralSurgeonSearch(SpectralSurgeon(max_steps=1, random_state=0),
                          {"budget": FloatDistribution(0.01, 1.0, log=True)}, n_trials=1,
                          storage=journal, study_name="shared", random_state=2).fit(
        nn.Sequential(nn.Linear(4, 3)).double(), torch.randn(30, 4, dtype=torch.float64),
        torch.arange(30) % 3)
    assert len(optuna.load_study(study_name="shared",
                                 storage=_resolve_storage(journal)).trials) == 7


def test_parallel_threads_run_all_trials(task):
    model, X, y, *_ = task
    filters = list(warnings.filters)
    search = SpectralSurgeonSearch(_surgeon(), {"budget": FloatDistribution(0.01, 0.2, log=True)},
                                   n_trials=4, n_jobs=2, random_state=0).fit(model, X, y)
    assert warnings.filters == filters  # interleaved catch_warnings would leave them changed
    assert search.n_trials_ == 4
    assert all(t.state == TrialState.COMPLETE for t in search.study_.trials)
    assert search.best_score_ == max(t.value for t in search.study_.trials)
    # Threads never share a module (functional_call swaps its parameters):
    # every trial's value is what a sequential fit gives.
    (fit_idx, score_idx), = search.splits_
    for t in search.study_.trials:
        s = _surgeon(budget=t.params["budget"], random_state=0).fit(model, X[fit_idx],
                                                                   y[fit_idx])
        assert t.value == pytest.approx(
            _balanced_accuracy_by_hand(s, model, X[score_idx], y[score_idx]), abs=1e-12)
