"""HessianOperator with a torch.distributed process group: two gloo processes on
the CPU, each with its own shard, against the full-data operator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_two_ranks

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("_distributed_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("dist")
    run_two_ranks(WORKER, out, timeout=300)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_matvec_equals_full_data_operator(ranks, curvature):
    for res in ranks:
        r = res[curvature]
        assert _rel(r["dist"], r["full"]) < 1e-5
        assert _rel(r["dist_block"], r["full_block"]) < 1e-5
        # float64 and a sum of two partial sums: far below the 1e-5 target
        assert _rel(r["dist"], r["full"]) < 1e-12
        assert res["n_samples"] == 61
    # every rank holds the same all-reduced product
    assert torch.equal(ranks[0][curvature]["dist"], ranks[1][curvature]["dist"])


def test_uncached_gradient_and_loss(ranks):
    for res in ranks:
        assert _rel(res["uncached"], res["hessian"]["full"]) < 1e-12
        g, g_full = res["gradient"]
        assert _rel(g, g_full) < 1e-12
        assert abs(res["loss"][0] - res["loss"][1]) < 1e-12


def test_spectra_identical_on_every_rank(ranks):
    a, b = ranks
    for name in ("lanczos", "power"):
        assert torch.equal(a[name].eigenvalues, b[name].eigenvalues)
        assert torch.equal(a[name].eigenvectors, b[name].eigenvectors)
        assert a[name].n_matvec == b[name].n_matvec
    # and equal to the single-process spectrum of the full data
    np.testing.assert_allclose(a["lanczos"].eigenvalues.numpy(),
                               a["lanczos_full"].eigenvalues.numpy(), rtol=1e-8)


def test_surgeon_identical_on_every_rank_and_equal_to_full_data(ranks):
    a, b = ranks
    assert torch.equal(a["surgeon"]["perturbation"], b["surgeon"]["perturbation"])
    assert a["surgeon"]["n_hvp"] == b["surgeon"]["n_hvp"] > 0
    assert a["surgeon"]["accepted"] == a["surgeon_full"]["accepted"]
    np.testing.assert_allclose(a["surgeon"]["eigenvalues"], a["surgeon_full"]["eigenvalues"],
                               rtol=1e-6)
    torch.testing.assert_close(a["surgeon"]["perturbation"], a["surgeon_full"]["perturbation"],
                               rtol=1e-6, atol=1e-9)


def test_unseeded_selection_split_is_the_same_on_every_rank(ranks):
    a, b = ranks
    np.testing.assert_array_equal(a["unseeded"]["accuracy_before"],
                                  b["unseeded"]["accuracy_before"])
    assert torch.equal(a["unseeded"]["perturbation"], b["unseeded"]["perturbation"])
