import numpy as np
import pytest
import torch

from hessrebal._data import as_data
from hessrebal._model import FunctionalModel
from hessrebal.metrics import per_class_accuracy
from hessrebal.parameters import ParameterSpace
from hessrebal.sensitivity import FiniteDifferenceSensitivity, SoftmaxSurrogateSensitivity
from tests.conftest import tanh_mlp, tiny_cnn


def setup(make=tanh_mlp, n=60, k=2, shape=(5,)):
    model = make()
    g = torch.Generator().manual_seed(7)
    X = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = torch.arange(n) % 3
    space = ParameterSpace(model)
    fm = FunctionalModel(model, space)
    Q = torch.linalg.qr(torch.randn(space.dim, k, generator=g, dtype=torch.float64))[0]
    return model, fm, fm.initial_theta(), Q, as_data(X, y)


@pytest.mark.parametrize("kind", ["probability", "log_probability", "margin"])
@pytest.mark.parametrize("make,shape", [(tanh_mlp, (5,)), (tiny_cnn, (1, 5, 5))])
@pytest.mark.parametrize("k", [2, 5])  # k < C: JVPs; k > C: VJPs
def test_surrogate_matches_finite_differences_of_itself(kind, make, shape, k):
    _, fm, theta, Q, data = setup(make, k=k, shape=shape)
    est = SoftmaxSurrogateSensitivity(kind=kind, temperature=1.5)
    S = est.estimate(fm, theta, Q, data, 3, batch_size=16)
    h = 1e-6
    ref = np.stack([
        (est.class_scores(fm, theta + h * Q[:, i], data, 3, 7)
         - est.class_scores(fm, theta - h * Q[:, i], data, 3, 7)) / (2 * h)
        for i in range(k)], axis=1)
    assert S.shape == (3, k)
    np.testing.assert_allclose(S, ref, rtol=1e-6, atol=1e-8)
    assert np.abs(S).max() > 1e-4  # not trivially zero


def test_surrogate_chunking_invariant_and_absent_class_zero():
    _, fm, theta, Q, data = setup()
    est = SoftmaxSurrogateSensitivity()
    a = est.estimate(fm, theta, Q, data, 4, batch_size=60)  # class 3 absent
    b = est.estimate(fm, theta, Q, data, 4, batch_size=11)
    np.testing.assert_allclose(a, b, rtol=1e-12)
    assert np.all(a[3] == 0)


@pytest.mark.parametrize("scheme", ["central", "forward"])
def test_finite_difference_equals_explicit_loop(scheme):
    model, fm, theta, Q, data = setup()
    eps = 0.7
    S = FiniteDifferenceSensitivity(scheme=scheme).estimate(
        fm, theta, Q, data, 3, budget=eps, batch_size=13)

    def acc(th):  # an independent evaluation: a real module with the parameters loaded
        m = fm.space.apply(model, th - theta)
        with torch.no_grad():
            pred = m.eval()(data.X).argmax(1)
        return per_class_accuracy(data.y, pred, 3)

    for i in range(2):
        if scheme == "central":
            ref = (acc(theta + eps * Q[:, i]) - acc(theta - eps * Q[:, i])) / (2 * eps)
        else:
            ref = (acc(theta + eps * Q[:, i]) - acc(theta)) / eps
        np.testing.assert_allclose(S[:, i], ref, atol=1e-12)
    assert np.abs(S).max() > 0


def test_finite_difference_probe_tied_to_budget_unless_given():
    _, fm, theta, Q, data = setup()
    tied = FiniteDifferenceSensitivity().estimate(fm, theta, Q, data, 3, budget=0.9,
                                                  batch_size=64)
    fixed = FiniteDifferenceSensitivity(step=0.9).estimate(fm, theta, Q, data, 3, budget=0.01,
                                                           batch_size=64)
    np.testing.assert_array_equal(tied, fixed)
    with pytest.raises(ValueError, match="scheme"):
        FiniteDifferenceSensitivity(scheme="backward").estimate(
            fm, theta, Q, data, 3, budget=0.1, batch_size=64)
    with pytest.raises(ValueError, match="kind"):
        SoftmaxSurrogateSensitivity(kind="hinge").estimate(fm, theta, Q, data, 3, batch_size=64)


def test_surrogate_is_exact_when_threads_run_it_concurrently():
    # torch numbers forward-AD levels process-wide: two threads inside
    # torch.func.jvp at once can lose each other's tangents and return zeros
    # (seen in SpectralSurgeonSearch(n_jobs=2) before the surrogate took a lock).
    import copy
    import threading

    model, fm, theta, Q, data = setup(n=240)
    est = SoftmaxSurrogateSensitivity(kind="margin")
    ref = est.estimate(fm, theta, Q, data, 3, batch_size=16)
    results: list[list[np.ndarray]] = [[], []]

    def work(i):
        m = copy.deepcopy(model)
        own = FunctionalModel(m, ParameterSpace(m))
        for _ in range(10):
            results[i].append(est.estimate(own, theta, Q, data, 3, batch_size=16))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [len(r) for r in results] == [10, 10]
    for S in results[0] + results[1]:
        np.testing.assert_array_equal(S, ref)
