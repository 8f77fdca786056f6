"""Collectives that cannot hang on a rank that failed.

Under ``torch.distributed`` every rank of ``SpectralSurgeon.fit`` runs the same
sequence of collectives (all-reductions of Hessian-vector products, a seed
broadcast). If one rank raises (bad data on its shard, out of memory, a
KeyboardInterrupt), it never joins the next collective, and the others would
wait in it until the backend's timeout (30 minutes by default), or for ever.

:func:`rank_failures` guards one ``fit``: a rank that raises inside it posts a
notice in the process group's key-value store (the rendezvous store every
process group has) before it re-raises. Collectives issued through
:func:`all_reduce` and :func:`broadcast` inside the guard run asynchronously,
and while one is pending the rank polls the store; when a notice is there it
raises :class:`RankFailedError` naming the failing rank. On leaving the guard
normally the ranks agree once more (one small all-reduce), so that no rank
returns a result while another has failed after the last product.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["RankFailedError", "all_reduce", "broadcast", "rank_failures"]

#: How long a pending collective waits before it first looks for a notice, and
#: then between looks (a look is one round trip to the store).
_FIRST_CHECK_S = 0.005
_CHECK_EVERY_S = 0.02


class RankFailedError(RuntimeError):
    """Another rank of the process group raised inside ``SpectralSurgeon.fit``.

    Attributes
    ----------
    rank : int
        The failing rank (its rank in the process group).
    message : str
        ``"<ExceptionType>: <message>"`` of the error raised there.
    """

    def __init__(self, rank: int, message: str, world_size: int) -> None:
        self.rank = rank
        self.message = message
        super().__init__(
            f"rank {rank} of {world_size} failed during SpectralSurgeon.fit ({message}); this "
            "rank stopped too. The process group may be left with an unfinished collective: "
            "destroy it (torch.distributed.destroy_process_group()) or end the process "
            "before using it again.")


class _Guard:
    """The failure notices of one guarded call on one process group."""

    def __init__(self, group: Any, store: Any, prefix: str) -> None:
        import torch.distributed as dist

        self.group = group
        self.store = store
        self.prefix = prefix
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def _key(self, rank: int) -> str:
        return f"{self.prefix}/rank{rank}"

    def post(self, exc: BaseException) -> None:
        first = str(exc).splitlines()[0] if str(exc) else ""
        message = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        # Best effort: the store may itself be gone (its host died); the
        # backend's timeout is then what ends the other ranks' wait.
        with contextlib.suppress(Exception):
            self.store.set(self._key(self.rank), message)

    def check(self) -> None:
        keys = [self._key(r) for r in range(self.world_size) if r != self.rank]
        try:
            if not self.store.check(keys):  # true when ANY key exists
                return
        except Exception:
            return  # an unreachable store cannot tell; keep waiting on the collective
        for r in range(self.world_size):
            if r != self.rank and self.store.check([self._key(r)]):
                raise RankFailedError(r, self.store.get(self._key(r)).decode("utf-8", "replace"),
                                      self.world_size)


_local = threading.local()
# How many guarded calls each group (by its ranks) has had in this process:
# part of the store keys, so that a notice from an earlier failed fit is never
# read by a later one. Ranks call fit in the same sequence, so they agree.
_counters: dict[tuple[int, ...], int] = {}
_counters_lock = threading.Lock()


def _store_of(group: Any) -> Any:
    # torch has no public accessor for a group's store; these have been
    # stable since torch 2.0. Without one the collectives simply block.
    from torch.distributed import distributed_c10d as c10d

    for getter in ("_get_process_group_store", "_get_default_store"):
        fn = getattr(c10d, getter, None)
        if fn is None:
            continue
        try:
            return fn(group) if getter == "_get_process_group_store" else fn()
        except Exception:
            continue
    return None


def _active(group: Any) -> _Guard | None:
    guard = getattr(_local, "guard", None)
    return guard if guard is not None and guard.group is group else None


def _make_guard(group: Any) -> _Guard | None:
    import torch.distributed as dist

    try:
        store = _store_of(group)
        if store is None:
            return None
        ranks = tuple(dist.get_process_group_ranks(group))
        with _counters_lock:
            _counters[ranks] = _counters.get(ranks, 0) + 1
            call = _counters[ranks]
        return _Guard(group, store, f"hessrebal/fit/{call}")
    except Exception:
        # Not a usable process group: no guard; the collectives themselves
        # report the problem where they are first used, as before.
        return None


def _agreement_device(group: Any) -> torch.device:
    import torch.distributed as dist

    # NCCL communicates GPU tensors only, on each rank's current device.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def rank_failures(group: Any) -> Iterator[None]:
    """Make every rank of ``group`` raise when one rank raises inside the block.

    The failing rank re-raises its own exception (with a note naming its
    rank); the others raise :class:`RankFailedError` naming it, from the
    collective they are waiting in, or from the final agreement when the block
    ends. ``group=None`` does nothing (not distributed).

    Parameters
    ----------
    group : torch.distributed ProcessGroup or None
    """
    guard = None if group is None else _make_guard(group)
    if guard is None:
        yield
        return
    outer = getattr(_local, "guard", None)
    _local.guard = guard
    try:
        yield
        # Nobody returns while another rank has failed since the last
        # collective: one more all-reduce that a failed rank never joins.
        all_reduce(torch.zeros(1, device=_agreement_device(group)), group)
    except RankFailedError:
        raise
    except BaseException as exc:
        guard.post(exc)
        if hasattr(exc, "add_note"):  # Python 3.11+
            exc.add_note(f"(raised on rank {guard.rank} of {guard.world_size} of the process "
                         "group; the other ranks raise RankFailedError)")
        raise
    finally:
        _local.guard = outer


def _wait(work: Any, guard: _Guard | None) -> None:
    if guard is not None:
        start = time.monotonic()
        next_check = start + _FIRST_CHECK_S
        pause = 1e-5
        while not work.is_completed():
            now = time.monotonic()
            if now >= next_check:
                guard.check()
                next_check = now + _CHECK_EVERY_S
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)
    # Completes the operation (for NCCL: orders the current stream after it)
    # and raises the backend's own error, e.g. its timeout for a dead peer.
    work.wait()


def all_reduce(t: torch.Tensor, group: Any) -> torch.Tensor:
    """In-place sum of ``t`` over ``group``, watched by the active guard."""
    import torch.distributed as dist

    guard = _active(group)
    work = dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group, async_op=True)
    _wait(work, guard)
    return t


def broadcast(t: torch.Tensor, src: int, group: Any) -> torch.Tensor:
    """``t`` from global rank ``src`` on every rank, watched by the active guard."""
    import torch.distributed as dist

    guard = _active(group)
    work = dist.broadcast(t, src=src, group=group, async_op=True)
    _wait(work, guard)
    return t
