"""SpectralSurgeonSearch workers that die: a worker SIGKILLed in the middle of a
trial on a shared journal file leaves its trial FAIL (not RUNNING for ever),
the other workers finish, its parameters are retried when asked, and a
restarted worker resumes the study."""

import multiprocessing as mp
import os
import signal
import socket
import time
from datetime import datetime
from pathlib import Path

import optuna
import pytest
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from torch import nn

from hessrebal import SpectralSurgeon
from hessrebal.tuning import (
    HEARTBEAT_ATTR,
    RETRY_ATTR,
    RETRY_OF_ATTR,
    WORKER_ATTR,
    SpectralSurgeonSearch,
    _resolve_storage,
    fail_dead_trials,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_torch_thread")]

SPACE = {"budget": FloatDistribution(0.01, 1.0, log=True)}
WAIT = 60  # seconds; generous for a loaded machine, never reached when things work


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(90, 4, generator=g, dtype=torch.float64)
    return model, X, torch.arange(90) % 3


def _search(journal, n_trials, seed, scoring="balanced_accuracy", **kw):
    return SpectralSurgeonSearch(SpectralSurgeon(max_steps=1, random_state=0), SPACE,
                                 n_trials=n_trials, storage=journal, study_name="shared",
                                 random_state=seed, scoring=scoring, **kw)


def _wait_for(path, proc=None):
    deadline = time.monotonic() + WAIT
    while not Path(path).exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        assert proc is None or proc.is_alive() or Path(path).exists(), "worker exited early"
        time.sleep(0.01)


def _victim(journal, marker, **kw):
    """Completes one trial, then hangs in its second until it is killed."""
    torch.set_num_threads(1)
    calls = []

    def scoring(est, model, X, y):
        calls.append(1)
        if len(calls) == 2:
            Path(marker).write_text(str(os.getpid()))
            time.sleep(10 * WAIT)
        return 0.5

    _search(journal, 3, 0, scoring, **kw).fit(*_problem())


def _worker(journal, n_trials, seed, **kw):
    torch.set_num_threads(1)
    _search(journal, n_trials, seed, **kw).fit(*_problem())


def _fork():
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("needs the fork start method")
    return mp.get_context("fork")


def _kill_victim(ctx, journal, tmp_path, **kw):
    marker = tmp_path / "victim_hangs"
    victim = ctx.Process(target=_victim, args=(journal, str(marker)), kwargs=kw)
    victim.start()
    try:
        _wait_for(marker, victim)
    finally:
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(WAIT)
    assert victim.exitcode == -signal.SIGKILL
    return victim.pid


def _study(journal):
    # A fresh storage object: everything below is read back from the file.
    return optuna.load_study(study_name="shared", storage=_resolve_storage(journal))


def _join(proc):
    proc.join(WAIT)
    if proc.is_alive():
        proc.kill()
        proc.join()
        pytest.fail("a worker stalled")
    assert proc.exitcode == 0


def test_restarted_worker_fails_the_dead_workers_trial_and_resumes(tmp_path):
    ctx = _fork()
    journal = str(tmp_path / "study.log")
    dead_pid = _kill_victim(ctx, journal, tmp_path)
    stale = _study(journal).trials
    assert [t.state for t in stale] == [TrialState.COMPLETE, TrialState.RUNNING]
    assert stale[1].user_attrs[WORKER_ATTR]["pid"] == dead_pid

    restarted = ctx.Process(target=_worker, args=(journal, 2, 1))
    restarted.start()
    _join(restarted)
    trials = _study(journal).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL,
                                         TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[1].user_attrs["error"] == (
        f"WorkerDied: worker {socket.gethostname()}:{dead_pid} no longer exists")
    assert trials[1].params == stale[1].params  # the record of what was tried is kept
    # Not asked to retry: the dead trial's parameters are not run again.
    assert all(RETRY_OF_ATTR not in t.user_attrs for t in trials)
    assert {t.user_attrs[WORKER_ATTR]["pid"] for t in trials[2:]} == {restarted.pid}


def test_other_worker_finishes_and_retries_the_dead_trial(tmp_path):
    """A second worker runs while the first dies: it is not held up, it fails
    the dead trial at its next trial and runs its parameters again."""
    ctx = _fork()
    journal = str(tmp_path / "study.log")
    b_started, killed = tmp_path / "b_started", tmp_path / "killed"

    def slow_first_trial(est, model, X, y):
        if not b_started.exists():
            b_started.write_text("")
            _wait_for(killed)  # the victim dies during this trial of B
        return 0.5

    def worker_b():
        torch.set_num_threads(1)
        _search(journal, 3, 1, slow_first_trial, retry_dead_trials=1).fit(*_problem())

    marker = tmp_path / "victim_hangs"
    victim = ctx.Process(target=_victim, args=(journal, str(marker)),
                         kwargs={"retry_dead_trials": 1})
    victim.start()
    b = None
    try:
        _wait_for(marker, victim)
        b = ctx.Process(target=worker_b)
        b.start()
        _wait_for(b_started, b)
    finally:
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(WAIT)
        killed.write_text("")
    _join(b)

    trials = _study(journal).trials
    states = [t.state for t in trials]
    assert states.count(TrialState.RUNNING) == 0 and states.count(TrialState.FAIL) == 1
    dead = next(t for t in trials if t.state == TrialState.FAIL)
    assert dead.user_attrs[WORKER_ATTR]["pid"] == victim.pid
    retried = [t for t in trials if t.user_attrs.get(RETRY_OF_ATTR) == dead.number]
    assert len(retried) == 1 and retried[0].user_attrs[RETRY_ATTR] == 1
    assert retried[0].params == dead.params and retried[0].state == TrialState.COMPLETE
    assert retried[0].user_attrs[WORKER_ATTR]["pid"] == b.pid
    assert sum(t.user_attrs[WORKER_ATTR]["pid"] == b.pid for t in trials) == 3

    # A worker restarted after all this resumes the study: it adds its trial,
    # and nothing is retried twice.
    _search(journal, 1, 2, retry_dead_trials=1).fit(*_problem())
    after = _study(journal).trials
    assert len(after) == len(trials) + 1 and after[-1].state == TrialState.COMPLETE
    assert sum(t.user_attrs.get(RETRY_OF_ATTR) == dead.number for t in after) == 1


def _running(study, info, started=None, **attrs):
    trial = optuna.trial.create_trial(
        state=TrialState.RUNNING, params={"budget": 0.1}, distributions=SPACE,
        user_attrs={WORKER_ATTR: info, **attrs})
    if started is not None:
        trial.datetime_start = started
    study.add_trial(trial)


def _info(**kw):
    from hessrebal.tuning import _boot_id, _process_state

    me = {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(),
          "start": _process_state(os.getpid())[1], "heartbeat_interval": None}
    return {**me, **kw}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_which_running_trials_count_as_dead():
    pid = os.fork()
    if pid == 0:  # a child that exits at once and stays a zombie until reaped
        os._exit(0)
    time.sleep(0.2)
    try:
        study = optuna.create_study(direction="maximize")
        old = datetime.fromtimestamp(time.time() - 100)
        _running(study, _info())                                   # 0: this process
        _running(study, _info(pid=pid))                            # 1: a zombie
        _running(study, _info(start=_info()["start"] + 1))         # 2: pid reused
        _running(study, _info(boot="an-earlier-boot"))             # 3: before a reboot
        _running(study, _info(host="elsewhere"))                   # 4: no heartbeat
        _running(study, _info(host="elsewhere", heartbeat_interval=60.0), old,
                 **{HEARTBEAT_ATTR: time.time() - 10})             # 5: beating
        _running(study, _info(host="elsewhere", heartbeat_interval=30.0), old,
                 **{HEARTBEAT_ATTR: time.time() - 70})             # 6: silent
        _running(study, _info(host="elsewhere", heartbeat_interval=30.0), old)  # 7
        _running(study, "not a dict")                              # 8: unknown
        assert fail_dead_trials(study, retries=1) == [1, 2, 3, 6, 7]
    finally:
        os.waitpid(pid, 0)
    errors = {t.number: t.user_attrs.get("error", "") for t in study.trials}
    assert "zombie" in errors[1] and "reused" in errors[2] and "restarted" in errors[3]
    assert "no heartbeat for 70 s (interval 30 s)" in errors[6]
    assert "no heartbeat for 100 s" in errors[7]
    states = [t.state for t in study.trials]
    assert states[:9] == [TrialState.RUNNING, *[TrialState.FAIL] * 3, TrialState.RUNNING,
                          TrialState.RUNNING, TrialState.FAIL, TrialState.FAIL,
                          TrialState.RUNNING]
    # Five retries enqueued; a second check fails nothing more.
    waiting = [t for t in study.trials if t.state == TrialState.WAITING]
    assert sorted(t.user_attrs[RETRY_OF_ATTR] for t in waiting) == [1, 2, 3, 6, 7]
    assert fail_dead_trials(study, retries=1) == []


def test_retries_stop_at_the_limit():
    study = optuna.create_study(direction="maximize")
    _running(study, _info(boot="an-earlier-boot"), **{RETRY_OF_ATTR: 4, RETRY_ATTR: 2})
    _running(study, _info(boot="an-earlier-boot"), **{RETRY_OF_ATTR: 4, RETRY_ATTR: 1})
    assert fail_dead_trials(study, retries=2) == [0, 1]
    waiting = [t for t in study.trials if t.state == TrialState.WAITING]
    assert [(t.user_attrs[RETRY_OF_ATTR], t.user_attrs[RETRY_ATTR]) for t in waiting] == [(4, 2)]


def test_own_heartbeat_is_written_while_a_trial_runs():
    def slow(est, model, X, y):
        time.sleep(0.35)
        return 0.5

    search = SpectralSurgeonSearch(SpectralSurgeon(max_steps=1, random_state=0), SPACE,
                                   n_trials=1, random_state=0, scoring=slow,
                                   heartbeat_interval=0.1).fit(*_problem())
    trial = search.study_.trials[0]
    assert trial.user_attrs[WORKER_ATTR]["heartbeat_interval"] == 0.1
    beat = trial.user_attrs[HEARTBEAT_ATTR]
    # The thread kept beating during the slow scoring, not only at the start.
    assert beat - trial.datetime_start.timestamp() > 0.2
    assert beat <= trial.datetime_complete.timestamp() + 1e-3


def test_database_storage_gets_optunas_heartbeat(tmp_path):
    storage = _resolve_storage(f"sqlite:///{tmp_path / 'db.sqlite'}", 0.5, 2)
    assert isinstance(storage, optuna.storages.RDBStorage)
    assert storage.heartbeat_interval == 1  # whole seconds, rounded up
    assert storage.heartbeat_stale_trial_callback is not None
    assert _resolve_storage("sqlite:///x.db") == "sqlite:///x.db"  # no heartbeat asked


@pytest.mark.parametrize("kwargs,match", [
    ({"retry_dead_trials": -1}, "retry_dead_trials must be a non-negative int"),
    ({"retry_dead_trials": 1.5}, "retry_dead_trials must be a non-negative int"),
    ({"heartbeat_interval": 0}, "heartbeat_interval must be a positive number"),
    ({"heartbeat_interval": float("inf")}, "heartbeat_interval must be a positive number"),
])
def test_invalid_worker_settings_raise_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpectralSurgeonSearch(n_trials=1, **kwargs).fit(*_problem())
