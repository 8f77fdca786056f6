"""A rank that raises inside ``SpectralSurgeon.fit`` under torch.distributed
(gloo, two processes) makes every rank raise within a bounded time, with an
error naming the failing rank; no rank hangs in a collective."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_two_ranks

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("_distributed_failure_worker.py")
#: Far below the workers' backend timeout (30 s), which is what would end a
#: rank's wait without hessrebal's failure notices.
BOUND_S = 10.0


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("dist_fail")
    run_two_ranks(WORKER, out, timeout=240)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("scenario,failing,error,match", [
    ("bad_labels_on_rank1", 1, "ValueError", "y_val"),
    ("disk_error_on_rank1_mid_products", 1, "OSError", "Input/output error reading shard"),
    ("memory_error_on_rank0_late", 0, "MemoryError", "out of memory at step 1"),
])
def test_every_rank_raises_naming_the_failing_rank(ranks, scenario, failing, error, match):
    own = ranks[failing][scenario]
    other = ranks[1 - failing][scenario]
    # The failing rank raises its own error, with a note naming its rank.
    assert own["raised"] == error and match in own["message"]
    assert own["notes"] == [f"(raised on rank {failing} of 2 of the process group; the other "
                            "ranks raise RankFailedError)"]
    # The other rank raises RankFailedError naming it and its error, promptly.
    assert other["raised"] == "RankFailedError" and other["failed_rank"] == failing
    assert other["message"].startswith(
        f"rank {failing} of 2 failed during SpectralSurgeon.fit ({error}: ")
    assert match in other["message"]
    assert other["seconds"] < BOUND_S, other


def test_a_fit_where_nobody_fails_still_succeeds_after_failed_ones(ranks):
    for r in ranks:
        assert r["nobody_fails"]["raised"] is None
