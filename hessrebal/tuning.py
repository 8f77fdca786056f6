"""Hyperparameter search for :class:`~hessrebal.SpectralSurgeon` with Optuna.

:class:`SpectralSurgeonSearch` drives an Optuna study directly: the surgeon's
``fit(model, X_val, y_val)`` does not have the ``fit(X, y)`` shape that
``OptunaSearchCV`` or scikit-learn's search classes expect. Several processes
or machines can work on one study through Optuna's storages (a journal file
on one machine, a PostgreSQL/MySQL URL across machines).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import queue
import socket
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from numbers import Integral, Real
from typing import Any

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState
from sklearn.base import BaseEstimator, clone
from sklearn.model_selection import StratifiedKFold, check_cv
from sklearn.utils.validation import check_is_fitted

from ._data import LabelledData, as_data, stratified_holdout
from ._model import FunctionalModel, predict_logits
from .amplitude import GammaDecay
from .metrics import balanced_accuracy, class_std, per_class_accuracy
from .parameters import ParameterSpace, unwrap_model
from .sensitivity import FiniteDifferenceSensitivity, SoftmaxSurrogateSensitivity
from .surgeon import SpectralSurgeon, default_strategies

__all__ = ["SCORINGS", "SpectralSurgeonSearch", "default_param_distributions",
           "fail_dead_trials", "surgery_score"]

#: Names accepted by ``scoring``.
SCORINGS = ("balanced_accuracy", "balanced_accuracy_minus_std", "worst_class")

#: Journal-file suffixes that ``storage`` turns into a ``JournalStorage``.
_JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")

#: Range of the default budget search, as factors of the reference budget.
BUDGET_RANGE = (0.1, 10.0)

#: User attributes the search writes on its trials (besides the scores).
WORKER_ATTR = "hessrebal_worker"  # who runs the trial: host, boot, pid, process start
HEARTBEAT_ATTR = "hessrebal_heartbeat"  # last sign of life (Unix time), with heartbeat_interval
RETRY_OF_ATTR = "hessrebal_retry_of"  # the trial number a retried trial repeats
RETRY_ATTR = "hessrebal_retry"  # 1 for the first retry of a trial, 2 for the second, ...


def default_param_distributions(
    surgeon: SpectralSurgeon | None = None, reference_budget: float | None = None
) -> dict[str, Any]:
    """The search space :class:`SpectralSurgeonSearch` uses by default.

    Parameters
    ----------
    surgeon : SpectralSurgeon, optional
        The surgeon to be tuned; its strategies decide which entries apply.
    reference_budget : float, optional
        The centre of the budget range. ``None`` leaves ``budget`` out.

    Returns
    -------
    dict
        Parameter name to an ``optuna.distributions`` object, or to a list of
        choices (a categorical search; estimator objects are allowed there):

        - ``budget``: log-uniform on ``[0.1, 10] × reference_budget``;
        - ``amplitude__gamma``: uniform on ``[0.3, 0.95]`` (only when the
          surgeon's amplitude controller is ``None`` or a ``GammaDecay``);
        - ``weight_power``: ``{0, 0.5, 1, 2}``;
        - ``strong_threshold``: uniform on ``[0.5, 0.99]``;
        - ``preserve_tolerance``: log-uniform on ``[0.001, 0.1]``;
        - ``curvature_penalty``: ``{0, 0.1, 1, 10}``;
        - ``objective``: ``{"weighted", "maxmin"}``;
        - ``sensitivity``: the margin and probability surrogates and finite
          differences (only when the surgeon's estimator is ``None``).

    Examples
    --------
    >>> from hessrebal.tuning import default_param_distributions
    >>> sorted(default_param_distributions(reference_budget=0.1))[:3]
    ['amplitude__gamma', 'budget', 'curvature_penalty']
    """
    surgeon = SpectralSurgeon() if surgeon is None else surgeon
    space: dict[str, Any] = {}
    if reference_budget is not None:
        low, high = BUDGET_RANGE
        space["budget"] = FloatDistribution(low * reference_budget, high * reference_budget,
                                            log=True)
    if surgeon.amplitude is None or isinstance(surgeon.amplitude, GammaDecay):
        space["amplitude__gamma"] = FloatDistribution(0.3, 0.95)
    space["weight_power"] = [0.0, 0.5, 1.0, 2.0]
    space["strong_threshold"] = FloatDistribution(0.5, 0.99)
    space["preserve_tolerance"] = FloatDistribution(1e-3, 0.1, log=True)
    space["curvature_penalty"] = [0.0, 0.1, 1.0, 10.0]
    space["objective"] = ["weighted", "maxmin"]
    if surgeon.sensitivity is None:
        space["sensitivity"] = [SoftmaxSurrogateSensitivity(kind="margin"),
                                SoftmaxSurrogateSensitivity(kind="probability"),
                                FiniteDifferenceSensitivity()]
    return space


def surgery_score(
    surgeon: SpectralSurgeon,
    model: Any,
    X: Any,
    y: Any = None,
    scoring: str | Callable[..., float] = "balanced_accuracy",
    std_penalty: float = 1.0,
) -> float:
    """Score a fitted surgeon's changed model on ``(X, y)``.

    Parameters
    ----------
    surgeon : SpectralSurgeon
        Fitted.
    model : nn.Module or skorch net
        The model the surgeon was fitted on (it is not changed or copied).
    X, y : tensor, ndarray, mapping, Dataset or DataLoader
        Labelled data, as for ``SpectralSurgeon.fit``.
    scoring : str or callable, default="balanced_accuracy"
        ``"balanced_accuracy"``; ``"balanced_accuracy_minus_std"``, the
        balanced accuracy minus ``std_penalty`` times the standard deviation
        of the per-class accuracies; ``"worst_class"``, the lowest per-class
        accuracy; or ``callable(surgeon, model, X, y) -> float``. Classes
        without a sample in ``y`` are left out.
    std_penalty : float, default=1.0
        λ in ``"balanced_accuracy_minus_std"``.

    Returns
    -------
    float
        Larger is better.
    """
    if callable(scoring):
        return float(scoring(surgeon, model, X, y))
    _check_scoring(scoring, std_penalty)
    data = as_data(X, y)
    return _named_score(_changed_accuracy(surgeon, model, data), scoring, std_penalty)


class SpectralSurgeonSearch(BaseEstimator):
    """Tune a :class:`~hessrebal.SpectralSurgeon` with an Optuna study.

    Each trial clones the surgeon, sets the trial's parameters (nested names
    such as ``amplitude__gamma`` included), fits it on one stratified part of
    the validation data and scores the changed model on the other part (or
    averages over the folds of ``cv``). The best parameters are then refitted
    on all of the validation data.

    Parameters
    ----------
    surgeon : SpectralSurgeon, optional
        The estimator to tune; ``None`` means ``SpectralSurgeon()``. It is
        cloned, never changed.
    param_distributions : dict, optional
        Parameter name (as in ``surgeon.get_params(deep=True)``; a nested
        name on a ``None`` strategy refers to the default strategy, e.g.
        ``amplitude__gamma`` to ``GammaDecay``) to an
        ``optuna.distributions`` object or a list of choices. Choices may be
        objects such as sensitivity estimators; Optuna stores their ``repr``
        and ``best_params_`` gives the objects back. ``None`` uses
        :func:`default_param_distributions` with a budget range centred on
        the reference budget (see Notes).
    n_trials : int or None, default=20
        Trials run by this call of ``fit`` (each worker of a shared study
        adds its own). ``None`` runs until ``timeout``.
    scoring : str or callable, default="balanced_accuracy"
        ``"balanced_accuracy"``, ``"balanced_accuracy_minus_std"``
        (balanced accuracy − ``std_penalty`` · class σ), ``"worst_class"``,
        or ``callable(surgeon, model, X, y) -> float`` (larger is better; it
        receives the scoring part as tensors, or as a Dataset with
        ``y=None``, and the model, a private copy when ``n_jobs > 1``).
        See :func:`surgery_score`.
    std_penalty : float, default=1.0
        λ of ``"balanced_accuracy_minus_std"``.
    validation_fraction : float, default=0.5
        Stratified fraction of the validation data held out to score each
        trial (at least one sample of every class with two or more is held
        out, and one kept for fitting). Ignored when ``cv`` is given.
    cv : int, cross-validation splitter or iterable, optional
        Score each trial by its mean over these folds of the validation data
        instead (an int means a shuffled ``StratifiedKFold``).
    storage : str, path, or optuna storage, optional
        Where the study lives. ``None``: in memory. A path ending in
        ``.log``, ``.journal`` or ``.jsonl``: a ``JournalStorage`` on that
        file (parallel processes on one machine or a shared file system).
        Any other string is a database URL such as
        ``"postgresql://user:password@host/db"`` (clusters) or
        ``"sqlite:///study.db"`` (a single writer). An
        ``optuna.storages.BaseStorage`` is used as is.
    study_name : str, optional
        Workers share a study by giving the same ``storage`` and
        ``study_name``. ``None`` lets Optuna make up a unique name.
    load_if_exists : bool, default=True
        Join the study if it exists (needed for several workers).
    sampler : optuna sampler, optional
        A copy is used. ``None`` means a ``TPESampler`` with its settings
        given explicitly (``multivariate=True``, ``constant_liar=True``,
        ``n_startup_trials=10``) and ``seed=random_state``.
    random_state : int or None, default=None
        Seeds the sampler, the split of the validation data and the
        surgeon (when the surgeon's own ``random_state`` is None). With a
        fixed seed and ``n_jobs=1`` two searches give the same trials and the
        same ``best_params_``.
    timeout : float, optional
        Stop starting trials after this many seconds.
    n_jobs : int, default=1
        Parallel trials in threads of this process (``-1``: one per CPU);
        not reproducible. Each thread works on its own deep copy of the
        model (a forward pass through ``torch.func.functional_call`` swaps
        the module's parameters, so threads cannot share one module). Use
        several processes with a shared ``storage`` to scale further.
    retry_dead_trials : int, default=0
        How many times the parameters of a trial whose worker died (killed,
        out of memory, machine lost) are tried again. The dead trial is
        marked ``FAIL`` either way (see Notes); with a positive value its
        parameters are also enqueued, and the next trial of any worker runs
        them. A trial whose fit raised is not retried: it would fail again.
    heartbeat_interval : float or None, default=None
        Seconds between a running trial's signs of life. ``None``: a trial
        counts as dead only when its worker process is gone from this
        machine. A number also lets workers on other machines be declared
        dead when their trial has been silent for twice this long: a database
        URL ``storage`` gets Optuna's own heartbeat (``RDBStorage`` with
        ``heartbeat_interval``, rounded up to whole seconds), other storages
        a thread that writes the trial's ``hessrebal_heartbeat`` user
        attribute. Clocks of the machines must then agree to well within
        the interval.

    Attributes
    ----------
    best_params_ : dict
        The best trial's parameters (objects for object choices).
    best_score_ : float
        Its score on the held-out part (mean over folds with ``cv``).
    best_estimator_ : SpectralSurgeon
        A clone with ``best_params_``, fitted on all of the validation data.
    best_trial_ : optuna.trial.FrozenTrial
    study_ : optuna.study.Study
        All trials, including those of other workers of the same study.
        Failed trials have state ``FAIL`` and the error in
        ``user_attrs["error"]``.
    param_distributions_ : dict
        The space searched, as ``optuna.distributions`` objects (object
        choices replaced by their labels).
    reference_budget_ : float or None
        The centre of the default budget range (None with a custom space).
    splits_ : list of (ndarray, ndarray)
        ``(fit indices, score indices)`` into the validation data, one pair
        per fold.
    n_trials_ : int
        Trials run by this call of ``fit``.

    Notes
    -----
    The default budget range is ``[0.1, 10] ×`` a reference budget: the
    surgeon's ``budget`` when set, else the data-driven default
    ``default_budget(λ₁)`` of :class:`~hessrebal.SpectralSurgeon`, found
    once on all of the validation data (one spectrum, ``max_steps=0``) before
    the study. ``best_params_["budget"]`` is thus an absolute budget that
    ``surgeon.set_params(**best_params_)`` can use directly.

    Trials whose fit raises are recorded as failed and the search goes on;
    ``fit`` raises only when no trial of the study completed.

    **Workers that die.** A worker killed in the middle of a trial cannot
    finish it, and Optuna would leave it ``RUNNING`` for ever (the sampler
    keeps treating it as pending). Every trial therefore records its worker
    (host, boot, process id and start time) in ``user_attrs["hessrebal_worker"]``.
    At the start of ``fit`` and of every trial, the search marks ``FAIL``
    each running trial whose worker is known to be dead: a process of this
    machine that no longer exists (or is a zombie, or whose process id now
    belongs to a later process), a worker from an earlier boot of this
    machine, or, with ``heartbeat_interval``, a trial of another machine
    silent for more than twice its interval. Its ``user_attrs["error"]`` says why, and with
    ``retry_dead_trials`` its parameters are enqueued once per death (the
    retry carries ``hessrebal_retry_of`` and ``hessrebal_retry``). Other
    workers go on unaffected, and a restarted worker joins the study where it
    stands, running the enqueued retries first. The check needs no
    configuration on one machine; for workers on several machines, give
    ``heartbeat_interval``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from hessrebal import SpectralSurgeon
    >>> from hessrebal.tuning import SpectralSurgeonSearch
    >>> import optuna
    >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> X, y = torch.randn(120, 4), torch.arange(120) % 3
    >>> search = SpectralSurgeonSearch(SpectralSurgeon(max_steps=2), n_trials=3,
    ...                                random_state=0).fit(model, X, y)
    >>> len(search.study_.trials)
    3
    >>> new_model = search.transform(model)
    """

    def __init__(
        self,
        surgeon: SpectralSurgeon | None = None,
        param_distributions: Mapping[str, Any] | None = None,
        n_trials: int | None = 20,
        scoring: str | Callable[..., float] = "balanced_accuracy",
        std_penalty: float = 1.0,
        validation_fraction: float = 0.5,
        cv: Any = None,
        storage: Any = None,
        study_name: str | None = None,
        load_if_exists: bool = True,
        sampler: Any = None,
        random_state: int | None = None,
        timeout: float | None = None,
        n_jobs: int = 1,
        retry_dead_trials: int = 0,
        heartbeat_interval: float | None = None,
    ) -> None:
        self.surgeon = surgeon
        self.param_distributions = param_distributions
        self.n_trials = n_trials
        self.scoring = scoring
        self.std_penalty = std_penalty
        self.validation_fraction = validation_fraction
        self.cv = cv
        self.storage = storage
        self.study_name = study_name
        self.load_if_exists = load_if_exists
        self.sampler = sampler
        self.random_state = random_state
        self.timeout = timeout
        self.n_jobs = n_jobs
        self.retry_dead_trials = retry_dead_trials
        self.heartbeat_interval = heartbeat_interval

    # ------------------------------------------------------------------ fit
    def fit(self, model: Any, X_val: Any, y_val: Any = None,
            **fit_params: Any) -> SpectralSurgeonSearch:
        """Run the study, then refit the best parameters on all the data.

        Parameters
        ----------
        model : nn.Module or skorch net
            The trained classifier (never changed).
        X_val, y_val : tensor, ndarray, mapping, Dataset or DataLoader
            The validation data; split for each trial.
        **fit_params
            Passed to every ``SpectralSurgeon.fit`` (e.g. ``curvature_data``).

        Returns
        -------
        self
        """
        self._validate_params()
        surgeon = SpectralSurgeon() if self.surgeon is None else self.surgeon
        if not isinstance(surgeon, SpectralSurgeon):
            raise TypeError(
                f"surgeon must be a SpectralSurgeon; got {type(surgeon).__name__}.")
        val = as_data(X_val, y_val, name="X_val", y_name="y_val")
        labels = val.labels().numpy()
        self.splits_ = self._splits(labels)

        if self.param_distributions is None:
            self.reference_budget_ = self._reference_budget(surgeon, model, val, fit_params)
            raw_space = default_param_distributions(surgeon, self.reference_budget_)
        else:
            self.reference_budget_ = None
            raw_space = self.param_distributions
        space, decoders = _encode_space(raw_space)
        _check_space_names(surgeon, space)
        self.param_distributions_ = space
        self._decoders = decoders

        retries = int(self.retry_dead_trials)
        storage = _resolve_storage(self.storage, self.heartbeat_interval, retries)
        study = optuna.create_study(
            storage=storage, sampler=self._make_sampler(),
            study_name=self.study_name, direction="maximize",
            load_if_exists=self.load_if_exists)
        # Optuna's own heartbeat (database storages) fails stale trials by
        # itself; elsewhere this search writes its own.
        native = getattr(study._storage, "get_heartbeat_interval", None)
        own_heartbeat = self.heartbeat_interval is not None and not (
            callable(native) and native() is not None)
        # The start-up check: trials left RUNNING by workers that died.
        fail_dead_trials(study, retries)
        parts = [(val.subset(f), val.subset(s)) for f, s in self.splits_]
        models = self._model_pool(model)

        own: list[int] = []  # this call's trials; other workers add theirs to the study

        def objective(trial: optuna.Trial) -> float:
            own.append(trial.number)
            info = _worker_info(self.heartbeat_interval if own_heartbeat else None)
            trial.set_user_attr(WORKER_ATTR, info)
            fail_dead_trials(study, retries)
            params = {name: _suggest(trial, name, dist) for name, dist in space.items()}
            trial_model = models.get()
            beat = (_Heartbeat(study, trial._trial_id, float(self.heartbeat_interval))
                    if own_heartbeat else contextlib.nullcontext())
            try:
                with beat:
                    return self._evaluate(trial, surgeon, trial_model, parts,
                                          _decode(params, decoders), fit_params)
            except Exception as exc:
                trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
                raise
            finally:
                models.put(trial_model)

        study.optimize(objective, n_trials=self.n_trials, timeout=self.timeout,
                       n_jobs=self.n_jobs, catch=(Exception,))
        self.study_ = study
        self.n_trials_ = len(own)
        completed = [t for t in study.trials if t.state == TrialState.COMPLETE]
        if not completed:
            failed = [t for t in study.trials if t.state == TrialState.FAIL]
            first = failed[0].user_attrs.get("error", "no error recorded") if failed else "none"
            raise ValueError(
                f"All {len(study.trials)} trials of study '{study.study_name}' failed; "
                f"the first error: {first}")
        best = study.best_trial
        self.best_trial_ = best
        self.best_score_ = float(best.value)
        self.best_params_ = _decode(dict(best.params), decoders)
        self.best_estimator_ = self._configure(surgeon, self.best_params_).fit(
            model, val, None, **fit_params)
        return self

    # ------------------------------------------------------- delegation
    def transform(self, model: Any, copy: bool = True) -> Any:
        """``best_estimator_.transform(model, copy=copy)``."""
        check_is_fitted(self, "best_estimator_")
        return self.best_estimator_.transform(model, copy=copy)

    def fit_transform(self, model: Any, X_val: Any, y_val: Any = None,
                      **fit_params: Any) -> Any:
        """``fit(model, X_val, y_val, **fit_params).transform(model)``."""
        return self.fit(model, X_val, y_val, **fit_params).transform(model)

    def score(self, model: Any, X: Any, y: Any = None) -> float:
        """The search's ``scoring`` of ``best_estimator_`` on ``(X, y)``.

        As in scikit-learn's searches, the score is the one that was
        optimised; with the default scoring it equals
        ``best_estimator_.score(model, X, y)``.
        """
        check_is_fitted(self, "best_estimator_")
        return surgery_score(self.best_estimator_, model, X, y, self.scoring, self.std_penalty)

    # ---------------------------------------------------------- helpers
    def _validate_params(self) -> None:
        n = self.n_trials
        if n is not None and (not isinstance(n, Integral) or isinstance(n, bool) or n < 1):
            raise ValueError(f"n_trials must be a positive int or None; got {n!r}.")
        t = self.timeout
        if t is not None and (not isinstance(t, Real) or isinstance(t, bool) or not t > 0):
            raise ValueError(f"timeout must be a positive number or None; got {t!r}.")
        if n is None and t is None:
            raise ValueError("n_trials and timeout are both None; the study would never stop.")
        if not callable(self.scoring):
            _check_scoring(self.scoring, self.std_penalty)
        f = self.validation_fraction
        if not isinstance(f, Real) or isinstance(f, bool) or not 0 < f < 1:
            raise ValueError(f"validation_fraction must be in (0, 1); got {f!r}.")
        j = self.n_jobs
        if not isinstance(j, Integral) or isinstance(j, bool) or not (j >= 1 or j == -1):
            raise ValueError(f"n_jobs must be a positive int or -1; got {j!r}.")
        if self.param_distributions is not None and not isinstance(self.param_distributions,
                                                                   Mapping):
            raise TypeError("param_distributions must be a dict of parameter names to "
                            f"distributions; got {type(self.param_distributions).__name__}.")
        if self.study_name is not None and not isinstance(self.study_name, str):
            raise TypeError(f"study_name must be a str; got {type(self.study_name).__name__}.")
        r = self.retry_dead_trials
        if not isinstance(r, Integral) or isinstance(r, bool) or r < 0:
            raise ValueError(f"retry_dead_trials must be a non-negative int; got {r!r}.")
        h = self.heartbeat_interval
        if h is not None and (not isinstance(h, Real) or isinstance(h, bool) or not h > 0
                              or not math.isfinite(h)):
            raise ValueError(f"heartbeat_interval must be a positive number or None; got {h!r}.")

    def _splits(self, labels: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        n = labels.size
        if self.cv is None:
            return [_stratified_holdout(labels, self.validation_fraction, self.random_state)]
        if isinstance(self.cv, Integral) and not isinstance(self.cv, bool):
            if self.cv < 2:
                raise ValueError(f"cv must be at least 2 folds; got {self.cv}.")
            rs = self.random_state
            cv = StratifiedKFold(n_splits=int(self.cv), shuffle=True,
                                 random_state=rs if rs is not None else None)
        else:
            cv = check_cv(self.cv, labels, classifier=True)
        placeholder = np.zeros((n, 1))
        splits = [(np.asarray(f, dtype=np.int64), np.asarray(s, dtype=np.int64))
                  for f, s in cv.split(placeholder, labels)]
        for f, s in splits:
            if f.size == 0 or s.size == 0:
                raise ValueError("cv produced a fold with an empty fitting or scoring part.")
        return splits

    def _make_sampler(self) -> optuna.samplers.BaseSampler:
        if self.sampler is not None:
            if not isinstance(self.sampler, optuna.samplers.BaseSampler):
                raise TypeError("sampler must be an optuna sampler; got "
                                f"{type(self.sampler).__name__}.")
            return copy.deepcopy(self.sampler)
        # Optuna 5 changed TPE defaults (multivariate, constant liar): spell
        # them out so results do not depend on the installed version.
        return optuna.samplers.TPESampler(
            seed=self.random_state, n_startup_trials=10, multivariate=True, group=False,
            constant_liar=True)

    def _configure(self, surgeon: SpectralSurgeon, params: Mapping[str, Any]) -> SpectralSurgeon:
        """A clone of ``surgeon`` with ``params`` set (objects cloned, never shared)."""
        est = clone(surgeon)
        if est.random_state is None and self.random_state is not None:
            est.set_params(random_state=self.random_state)
        values = {k: (clone(v) if hasattr(v, "get_params") and not isinstance(v, type) else v)
                  for k, v in params.items()}
        top = {k: v for k, v in values.items() if "__" not in k}
        nested = {k: v for k, v in values.items() if "__" in k}
        est.set_params(**top)
        defaults = default_strategies()
        for prefix in {k.split("__", 1)[0] for k in nested}:
            if getattr(est, prefix, None) is None and prefix in defaults:
                setattr(est, prefix, defaults[prefix])
        est.set_params(**nested)
        return est

    def _model_pool(self, model: Any) -> queue.Queue:
        """One model per concurrent trial.

        ``torch.func.functional_call`` swaps a module's parameters in place
        for the duration of a forward pass, so two threads must never run
        the same module: with ``n_jobs > 1`` each thread borrows its own deep
        copy, made here before any thread starts.
        """
        n = self.n_jobs if self.n_jobs != -1 else (os.cpu_count() or 1)
        pool: queue.Queue = queue.Queue()
        pool.put(model)
        for _ in range(n - 1):
            pool.put(copy.deepcopy(unwrap_model(model)))
        return pool

    def _reference_budget(self, surgeon: SpectralSurgeon, model: Any, val: LabelledData,
                          fit_params: Mapping[str, Any]) -> float:
        if surgeon.budget is not None:
            return float(surgeon.budget)
        probe = self._configure(surgeon, {}).set_params(max_steps=0)
        return float(probe.fit(model, val, None, **fit_params).initial_budget_)

    def _evaluate(self, trial: optuna.Trial, surgeon: SpectralSurgeon, model: Any,
                  parts: list[tuple[LabelledData, LabelledData]], params: dict[str, Any],
                  fit_params: Mapping[str, Any]) -> float:
        scores, details = [], []
        for fit_data, score_data in parts:
            est = self._configure(surgeon, params).fit(model, fit_data, None, **fit_params)
            if callable(self.scoring):
                X, y = _raw(score_data)
                scores.append(float(self.scoring(est, model, X, y)))
            else:
                acc = _changed_accuracy(est, model, score_data)
                scores.append(_named_score(acc, self.scoring, self.std_penalty))
                details.append((balanced_accuracy(acc), class_std(acc),
                                float(np.nanmin(acc))))
        if len(scores) > 1:
            trial.set_user_attr("fold_scores", scores)
        if details:
            means = np.mean(np.asarray(details), axis=0)
            trial.set_user_attr("balanced_accuracy", float(means[0]))
            trial.set_user_attr("class_std", float(means[1]))
            trial.set_user_attr("worst_class_accuracy", float(means[2]))
        return float(np.mean(scores))


# ---------------------------------------------------------------- internals
def _check_scoring(scoring: Any, std_penalty: Any) -> None:
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS} or a callable; got {scoring!r}.")
    if (not isinstance(std_penalty, Real) or isinstance(std_penalty, bool)
            or not std_penalty >= 0 or not math.isfinite(std_penalty)):
        raise ValueError(f"std_penalty must be a non-negative number; got {std_penalty!r}.")


def _changed_accuracy(surgeon: SpectralSurgeon, model: Any, data: LabelledData) -> np.ndarray:
    """Per-class accuracy of ``θ₀ + perturbation_`` without copying the model."""
    check_is_fitted(surgeon, "perturbation_")
    names = set(surgeon.parameter_names_)
    space = ParameterSpace(model, lambda n, p: n in names)
    fmodel = FunctionalModel(model, space, surgeon.output_to_logits)
    theta = fmodel.initial_theta() + surgeon.perturbation_.to(fmodel.device, fmodel.dtype)
    logits, labels = predict_logits(fmodel, theta, data, surgeon.batch_size)
    return per_class_accuracy(labels, logits.argmax(1), logits.shape[1])


def _named_score(acc: np.ndarray, scoring: str, std_penalty: float) -> float:
    if scoring == "balanced_accuracy":
        return balanced_accuracy(acc)
    if scoring == "balanced_accuracy_minus_std":
        return balanced_accuracy(acc) - float(std_penalty) * class_std(acc)
    return float(np.nanmin(acc))


def _raw(data: LabelledData) -> tuple[Any, Any]:
    if data.in_memory:
        return data.X, data.y
    return data.dataset, None


def _stratified_holdout(labels: np.ndarray, fraction: float,
                        random_state: int | None) -> tuple[np.ndarray, np.ndarray]:
    kept, held = stratified_holdout(labels, fraction, random_state)
    if held.size == 0:
        raise ValueError("X_val has no class with two samples; it cannot be split into a "
                         "fitting and a scoring part.")
    return kept, held


def _resolve_storage(storage: Any, heartbeat_interval: float | None = None,
                     retries: int = 0) -> Any:
    if storage is None or isinstance(storage, optuna.storages.BaseStorage):
        return storage
    if isinstance(storage, str) and "://" in storage and heartbeat_interval is not None:
        # A database: Optuna's heartbeat, which fails stale trials at the
        # start of every trial (its grace period: twice the interval).
        def on_stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            _retry(study, trial, retries)

        from ._process_state import PROCESS_STATE_LOCK

        # The heartbeat is an "experimental" argument to Optuna; that is its
        # warning, not the user's concern. Warning filters are process-wide.
        with PROCESS_STATE_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                storage, heartbeat_interval=max(1, math.ceil(heartbeat_interval)),
                heartbeat_stale_trial_callback=on_stale)
    if isinstance(storage, os.PathLike) or (isinstance(storage, str) and "://" not in storage):
        path = os.fspath(storage)
        if not path.endswith(_JOURNAL_SUFFIXES):
            raise ValueError(
                f"storage {path!r} is neither a database URL (e.g. 'postgresql://user:pw@host/db',"
                f" 'sqlite:///study.db') nor a journal file ending in {_JOURNAL_SUFFIXES}.")
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(path))
    if isinstance(storage, str):
        return storage
    raise TypeError("storage must be None, a URL or journal path, or an optuna storage; got "
                    f"{type(storage).__name__}.")


_PRIMITIVE = (type(None), bool, int, float, str)


def _encode_space(raw: Mapping[str, Any]) -> tuple[dict[str, BaseDistribution],
                                                    dict[str, dict[Any, Any]]]:
    """Optuna distributions for ``raw``; object choices become string labels."""
    space: dict[str, BaseDistribution] = {}
    decoders: dict[str, dict[Any, Any]] = {}
    for name, dist in raw.items():
        if not isinstance(name, str):
            raise TypeError(f"param_distributions keys must be str; got {name!r}.")
        if isinstance(dist, CategoricalDistribution):
            choices = list(dist.choices)
        elif isinstance(dist, (FloatDistribution, IntDistribution)):
            space[name] = dist
            continue
        elif isinstance(dist, BaseDistribution):
            raise TypeError(f"param_distributions['{name}']: {type(dist).__name__} is not "
                            "supported; use FloatDistribution, IntDistribution or "
                            "CategoricalDistribution.")
        elif isinstance(dist, (list, tuple)):
            choices = list(dist)
        else:
            raise TypeError(
                f"param_distributions['{name}'] must be an optuna distribution or a list of "
                f"choices; got {type(dist).__name__}.")
        if not choices:
            raise ValueError(f"param_distributions['{name}'] has no choices.")
        if all(isinstance(c, _PRIMITIVE) for c in choices):
            space[name] = CategoricalDistribution(choices)
            continue
        labels, decoder = [], {}
        for c in choices:
            label = c if isinstance(c, _PRIMITIVE) else repr(c)
            if label in decoder:
                label = f"{label} #{len(labels)}"
            labels.append(label)
            decoder[label] = c
        space[name] = CategoricalDistribution(labels)
        decoders[name] = decoder
    return space, decoders


def _decode(params: Mapping[str, Any], decoders: Mapping[str, Mapping[Any, Any]]) -> dict:
    out = {}
    for name, value in params.items():
        decoder = decoders.get(name, {})
        out[name] = decoder[value] if value in decoder else value
    return out


def _check_space_names(surgeon: SpectralSurgeon, space: Mapping[str, Any]) -> None:
    probe = clone(surgeon)
    for name, strategy in default_strategies().items():
        if getattr(probe, name) is None:
            setattr(probe, name, strategy)
    valid = set(probe.get_params(deep=True))
    for name in space:
        if name not in valid:
            raise ValueError(
                f"param_distributions has '{name}', which is not a parameter of "
                f"{type(surgeon).__name__} (see surgeon.get_params(deep=True)).")


def _suggest(trial: optuna.Trial, name: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_categorical(name, dist.choices)


# ------------------------------------------------------------ dead workers
def _boot_id() -> str | None:
    """This boot of this machine (Linux); process ids restart at each boot."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _process_state(pid: int) -> tuple[str, int] | None:
    """``(state letter, start time in clock ticks)`` of a process, from /proc
    (Linux), or None where that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            raw = fh.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split
    # after its closing one. Field 3 is the state, field 22 the start time.
    fields = raw[raw.rfind(")") + 2:].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _worker_info(heartbeat_interval: float | None) -> dict[str, Any]:
    state = _process_state(os.getpid())
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(),
            "start": None if state is None else state[1],
            "heartbeat_interval": heartbeat_interval}


def _death_reason(trial: optuna.trial.FrozenTrial, now: float) -> str | None:
    """Why ``trial``'s worker is known to be dead, or None if it may be alive."""
    info = trial.user_attrs.get(WORKER_ATTR)
    if not isinstance(info, dict):
        return None  # not started by this search, or killed before it said who it is
    who = f"worker {info.get('host')}:{info.get('pid')}"
    if info.get("host") != socket.gethostname():
        # Another machine: only a heartbeat can tell. (On this machine the
        # process check below is exact, and a busy worker whose heartbeat
        # thread was held up is not declared dead.)
        interval = info.get("heartbeat_interval")
        if not isinstance(interval, (int, float)) or not interval > 0:
            return None
        last = trial.user_attrs.get(HEARTBEAT_ATTR)
        if not isinstance(last, (int, float)):
            last = trial.datetime_start.timestamp() if trial.datetime_start else None
        if last is not None and now - last > 2 * interval:
            return f"{who} sent no heartbeat for {now - last:.0f} s (interval {interval:g} s)"
        return None
    boot = _boot_id()
    if info.get("boot") is not None and boot is not None and info["boot"] != boot:
        return f"{who} ran before this machine restarted"
    pid = info.get("pid")
    if not isinstance(pid, int):
        return None
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return f"{who} no longer exists"
    except PermissionError:
        pass  # exists, under another user
    except OSError:
        return None
    state = _process_state(pid)
    if state is not None:
        if state[0] in ("Z", "X"):
            return f"{who} has exited (zombie)"
        if info.get("start") is not None and state[1] != info["start"]:
            return f"{who} no longer exists (its process id was reused)"
    return None


def fail_dead_trials(study: optuna.Study, retries: int = 0) -> list[int]:
    """Mark ``FAIL`` the running trials of ``study`` whose worker is dead.

    Run by :class:`SpectralSurgeonSearch` at the start of ``fit`` and of each
    trial (see its Notes for what counts as dead); public so that a study can
    be cleaned up without running trials. With ``retries > 0`` the
    parameters of each trial failed here are enqueued again, unless it is
    already a ``retries``-th retry.

    Parameters
    ----------
    study : optuna.Study
    retries : int, default=0

    Returns
    -------
    list of int
        The numbers of the trials this call failed (a trial another worker
        failed first is not counted, nor retried twice).
    """
    failed = []
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = _death_reason(trial, now)
        if reason is None:
            continue
        # The storage API, as Optuna's own fail_stale_trials uses it: tell()
        # would refuse a trial this process did not ask for.
        storage = study._storage
        try:
            storage.set_trial_user_attr(trial._trial_id, "error", f"WorkerDied: {reason}")
            if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first (and retries it)
        failed.append(trial.number)
        _retry(study, storage.get_trial(trial._trial_id), retries)
    return failed


def _retry(study: optuna.Study, trial: optuna.trial.FrozenTrial, retries: int) -> None:
    """Enqueue ``trial``'s parameters again, at most ``retries`` times per original."""
    done = trial.user_attrs.get(RETRY_ATTR, 0)
    if retries <= 0 or not isinstance(done, int) or done >= retries or not trial.params:
        return
    original = trial.user_attrs.get(RETRY_OF_ATTR, trial.number)
    study.enqueue_trial(dict(trial.params),
                        user_attrs={RETRY_OF_ATTR: original, RETRY_ATTR: done + 1})


class _Heartbeat:
    """Writes the time into the trial's ``hessrebal_heartbeat`` user attribute
    every ``interval`` seconds while the trial runs (a daemon thread)."""

    def __init__(self, study: optuna.Study, trial_id: int, interval: float) -> None:
        self.study, self.trial_id, self.interval = study, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="hessrebal-heartbeat")

    def _beat(self) -> None:
        self.study._storage.set_trial_user_attr(self.trial_id, HEARTBEAT_ATTR, time.time())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except Exception:
                return  # the trial has finished (or the storage is gone): stop beating

    def __enter__(self) -> _Heartbeat:
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
