"""Two fits with the same random_state give bitwise-identical results on the
CPU, whatever the global random state; only history_'s "seconds" differ."""

import json

import numpy as np
import pytest
import torch

from hessrebal import SpectralSurgeon
from hessrebal.amplitude import AdamSNR
from hessrebal.sensitivity import FiniteDifferenceSensitivity
from hessrebal.solvers import ProjectedGradientSolver
from tests.conftest import PAPER_RULES, tiny_cnn, trained_blobs_mlp

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TIMING = {"seconds"}


def trained():
    return trained_blobs_mlp(11, [40, 40, 40])


def comparable_history(s):
    """history_ without timings, as repr-exact JSON (floats bitwise, NaN == NaN)."""
    return json.dumps([{k: v for k, v in h.items() if k not in TIMING} for h in s.history_])


def assert_bitwise_equal(a, b):
    assert a.coef_.tobytes() == b.coef_.tobytes()
    assert a.eigenvalues_.tobytes() == b.eigenvalues_.tobytes()
    assert torch.equal(a.perturbation_, b.perturbation_)
    assert torch.equal(a.eigenvectors_, b.eigenvectors_)
    if a.sensitivity_ is not None:
        assert a.sensitivity_.tobytes() == b.sensitivity_.tobytes()
    assert a.n_hvp_ == b.n_hvp_ and a.n_components_ == b.n_components_
    assert comparable_history(a) == comparable_history(b)
    assert a.per_class_accuracy_after_.tobytes() == b.per_class_accuracy_after_.tobytes()


def two_fits(make, model, X, y):
    fits = []
    for global_seed in (1, 12345):
        # Unrelated global random state must not matter.
        torch.manual_seed(global_seed)
        np.random.seed(global_seed)  # noqa: NPY002 (the legacy global state is the point)
        fits.append(make().fit(model, X, y))
    return fits


CONFIGS = {
    "defaults": lambda: SpectralSurgeon(max_steps=3, random_state=0),
    "fd+selection+adam+pg+box+auto": lambda: SpectralSurgeon(
        sensitivity=FiniteDifferenceSensitivity(), solver=ProjectedGradientSolver(),
        amplitude=AdamSNR(), budget_shape="box", n_components="auto",
        selection_fraction=0.4, acceptance="noise_aware", max_steps=3, random_state=7),
}


@pytest.fixture(scope="module")
def problem():
    return trained()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_random_state_gives_bitwise_identical_fits(problem, name):
    a, b = two_fits(CONFIGS[name], *problem)
    assert_bitwise_equal(a, b)
    assert all(set(h) - set(h2) == set() for h, h2 in zip(a.history_, b.history_))
    if name == "defaults":
        assert any(h["accepted"] for h in a.history_), "nothing to compare: no step accepted"


def test_cnn_with_batchnorm_and_dropout_in_train_mode_is_deterministic():
    model = tiny_cnn()  # train mode: dropout would randomise any forward run in it
    X, y = torch.randn(30, 1, 5, 5, dtype=torch.float64), torch.arange(30) % 3
    a, b = two_fits(lambda: SpectralSurgeon(max_steps=2, budget=0.05, max_class_drop=1.0,
                                            max_std_increase=1.0, random_state=0,
                                            **PAPER_RULES), model, X, y)
    assert any(h["accepted"] for h in a.history_)
    assert_bitwise_equal(a, b)


def test_another_random_state_changes_the_start_vectors(problem):
    # The comparison above is sharp enough to see a different seed.
    model, X, y = problem
    a = SpectralSurgeon(max_steps=0, random_state=0).fit(model, X, y)
    c = SpectralSurgeon(max_steps=0, random_state=1).fit(model, X, y)
    assert not torch.equal(a.eigenvectors_, c.eigenvectors_)
    np.testing.assert_allclose(np.abs(a.eigenvalues_), np.abs(c.eigenvalues_), rtol=1e-2)


def test_only_the_timing_field_is_left_out(problem):
    a = CONFIGS["defaults"]().fit(*problem)
    keys = set(a.history_[0])
    assert TIMING <= keys
    assert {"alpha", "budget", "accepted", "reason", "class_std", "per_class_accuracy",
            "n_hvp", "solver_failed", "candidate_finite"} <= keys - TIMING


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fits_are_reproducible_with_deterministic_algorithms(problem):
    import os

    model, X, y = problem
    model = model.to("cuda")
    previous = torch.are_deterministic_algorithms_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        a, b = two_fits(CONFIGS["defaults"], model, X.cuda(), y.cuda())
    finally:
        torch.use_deterministic_algorithms(previous)
    assert_bitwise_equal(a, b)
