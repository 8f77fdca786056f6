"""Amplitude controllers against hand computations of docs/method.md §6."""

import math

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from hessrebal.amplitude import AdamSNR, GammaDecay, GrowShrink


def test_gamma_decay_reproduces_the_papers_run():
    c = GammaDecay(gamma=0.7)
    budgets = [c.initial(0.020, max_steps=10)]
    for accepted in (False, True, False, True, True, False):
        budget = c.update(accepted, 0.01 if accepted else -0.1)
        if budget != budgets[-1]:
            budgets.append(budget)
        else:
            assert accepted  # unchanged only on success
    # The paper reports 0.020 -> 0.014 -> 0.0098 -> 0.0069 (two significant digits).
    assert [float(f"{b:.2g}") for b in budgets] == [0.020, 0.014, 0.0098, 0.0069]
    np.testing.assert_allclose(budgets, 0.02 * 0.7 ** np.arange(4), rtol=1e-14)


def test_grow_shrink():
    c = GrowShrink(grow=1.5, shrink=0.5, max_factor=2.0)
    assert c.initial(0.1, max_steps=5) == 0.1
    got = [c.update(a, 0.0) for a in (True, True, True, False, True, False, False)]
    np.testing.assert_allclose(got, [0.15, 0.2, 0.2, 0.1, 0.15, 0.075, 0.0375])


def adam_snr_by_hand(budget0, signals, T, min_fraction=0.1, eps=1e-8):
    """Plain transcription of the formulas of docs/method.md §6."""
    b1 = 1 - 4 / T
    b2 = 1 - 1 / T
    lo = min_fraction * budget0
    m = v = 0.0
    out = []
    for t, g in enumerate(signals, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        snr = (m / (1 - b1**t)) / (math.sqrt(v / (1 - b2**t)) + eps)
        out.append(lo + 0.5 * (1 + math.tanh(5 * snr)) * (budget0 - lo))
    return out


@pytest.mark.parametrize("T", [5, 10, 40])
def test_adam_snr_matches_hand_computation(T):
    signals = [0.02, -0.07, 0.004, 0.01, -0.03, 0.0, 0.015, -0.001]
    accepted = [g >= 0 for g in signals]
    c = AdamSNR(min_fraction=0.2)
    assert c.initial(0.5, max_steps=T) == 0.5
    got = [c.update(a, g) for a, g in zip(accepted, signals)]
    np.testing.assert_allclose(got, adam_snr_by_hand(0.5, signals, T, min_fraction=0.2),
                               rtol=1e-12)
    assert all(0.1 <= b <= 0.5 for b in got)
    assert c.beta1_ == pytest.approx(1 - 4 / T) and c.beta2_ == pytest.approx(1 - 1 / T)


def test_adam_snr_first_steps_and_short_loops():
    c = AdamSNR(min_fraction=0.1)
    c.initial(1.0, max_steps=20)
    # One success: SNR = g/(|g|+eps) ~ 1, budget ~ the top; one rollback after a
    # fresh start: SNR ~ -1, budget ~ alpha_min.
    assert c.update(True, 0.01) == pytest.approx(0.1 + 0.5 * (1 + math.tanh(5)) * 0.9)
    c.initial(1.0, max_steps=20)
    assert c.update(False, -0.01) == pytest.approx(0.1 + 0.5 * (1 - math.tanh(5)) * 0.9)
    # T <= 4: beta1 = 1 - 4/T <= 0 is clamped to 0 (m_hat is the last signal).
    c.initial(1.0, max_steps=2)
    assert c.beta1_ == 0.0 and c.beta2_ == 0.5
    c.update(True, 0.03)
    b = c.update(False, -0.01)
    v_hat = (0.5 * 0.5 * 0.03**2 + 0.5 * 0.01**2) / (1 - 0.25)
    snr = -0.01 / (math.sqrt(v_hat) + 1e-8)
    assert b == pytest.approx(0.1 + 0.5 * (1 + math.tanh(5 * snr)) * 0.9, rel=1e-12)
    c.initial(1.0, max_steps=1)
    assert c.beta2_ == 0.0 and 0.1 <= c.update(True, 0.5) <= 1.0


@pytest.mark.parametrize("make", [GammaDecay, AdamSNR, GrowShrink])
def test_initial_resets_state(make):
    c = make()
    signals = [(True, 0.01), (False, -0.05), (True, 0.002)]
    c.initial(0.3, max_steps=6)
    first = [c.update(a, g) for a, g in signals]
    assert c.initial(0.3, max_steps=6) == 0.3 and c.n_updates_ == 0
    assert [c.update(a, g) for a, g in signals] == first


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: GammaDecay(gamma=1.0), "gamma"),
        (lambda: GammaDecay(gamma=0.0), "gamma"),
        (lambda: GammaDecay(gamma=float("nan")), "gamma"),
        (lambda: GrowShrink(grow=1.0), "grow"),
        (lambda: GrowShrink(shrink=1.0), "shrink"),
        (lambda: GrowShrink(shrink=0.0), "shrink"),
        (lambda: GrowShrink(max_factor=0.5), "max_factor"),
        (lambda: AdamSNR(min_fraction=0.0), "min_fraction"),
        (lambda: AdamSNR(min_fraction=1.5), "min_fraction"),
        (lambda: AdamSNR(eps=0.0), "eps"),
        (lambda: GammaDecay(gamma="0.5"), "gamma"),
    ],
)
def test_bad_parameters_raise_in_initial(make, name):
    c = make()  # __init__ only stores
    with pytest.raises((ValueError, TypeError), match=name):
        c.initial(0.1, max_steps=5)


@pytest.mark.parametrize("make", [GammaDecay, AdamSNR, GrowShrink])
def test_bad_arguments(make):
    c = make()
    for budget in (0.0, -0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="budget"):
            c.initial(budget, max_steps=5)
    with pytest.raises(ValueError, match="max_steps"):
        c.initial(0.1, max_steps=0)
    with pytest.raises(TypeError, match="max_steps"):
        c.initial(0.1, max_steps=2.5)
    with pytest.raises(NotFittedError):
        make().update(True, 0.1)
    c.initial(0.1, max_steps=5)
    with pytest.raises(ValueError, match="signal"):
        c.update(True, float("nan"))
    with pytest.raises(TypeError, match="accepted"):
        c.update("yes", 0.1)
    assert c.update(np.bool_(True), np.float32(0.01)) > 0


def test_controllers_are_estimators():
    c = AdamSNR(min_fraction=0.3, eps=1e-6)
    c.initial(0.1, max_steps=3)
    twin = clone(c)
    assert twin.get_params() == {"min_fraction": 0.3, "eps": 1e-6}
    assert not hasattr(twin, "budget_")
    assert GrowShrink(grow=2.0).get_params()["grow"] == 2.0
