"""Pictures of a surgery, in scikit-learn's Display style.

Each display takes computed arrays in ``__init__``, draws them with
``plot(ax=None, **kwargs)`` (returning ``self`` with ``figure_`` and ``ax_``
set) and has ``from_*`` class methods that compute the arrays from a fitted
:class:`~hessrebal.SpectralSurgeon`:

- :class:`SpectrumDisplay`: the top Hessian eigenvalues (log scale) and the
  stochastic-Lanczos density, spikes marked, the bulk edge and the ``C − 1``
  line drawn;
- :class:`PerClassAccuracyDisplay`: per-class accuracy before and after the
  surgery and after any baselines, classes ordered by training frequency;
- :class:`SensitivityDisplay`: the ``C × k`` spike–class sensitivity matrix
  as a heat map with a diverging colour map centred at 0;
- :class:`HistoryDisplay`: budget and σ / balanced accuracy per amplitude
  step, accepted and rolled-back steps marked.

matplotlib is imported only when something is drawn, so ``import
hessrebal.plotting`` is cheap and works without a display (Agg).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .metrics import balanced_accuracy, class_std, per_class_accuracy
from .spectrum import LanczosSpectrum, count_spikes, slq_density

__all__ = [
    "HistoryDisplay",
    "PerClassAccuracyDisplay",
    "SensitivityDisplay",
    "SpectrumDisplay",
    "spectrum_summary",
]

_ACCEPT_COLOR = "tab:green"
_REJECT_COLOR = "tab:red"
_SPIKE_COLOR = "tab:red"
_BULK_COLOR = "0.45"


# ------------------------------------------------------------------ helpers
def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def _new_axes(n: int, figsize: tuple[float, float], sharex: bool = False):
    plt = _pyplot()
    fig, axes = plt.subplots(1 if not sharex else n, n if not sharex else 1, figsize=figsize,
                             sharex=sharex, squeeze=False, layout="constrained")
    return fig, list(axes.ravel())


def _axes_list(ax: Any, n: int, figsize: tuple[float, float], sharex: bool = False):
    """``ax`` as a list of at most ``n`` Axes: new ones when None, else the
    given Axes (one) or sequence of Axes (up to ``n``)."""
    if ax is None:
        return _new_axes(n, figsize, sharex)
    if isinstance(ax, np.ndarray):
        ax = list(ax.ravel())
    if isinstance(ax, (list, tuple)):
        if not 1 <= len(ax) <= n:
            raise ValueError(f"ax must be one Axes or a sequence of at most {n}; "
                             f"got {len(ax)}.")
        axes = list(ax)
    else:
        axes = [ax]
    for a in axes:
        if not hasattr(a, "figure") or not hasattr(a, "plot"):
            raise TypeError(f"ax must be a matplotlib Axes; got {type(a).__name__}.")
    return axes[0].figure, axes


def _as_vector(values: Any, name: str, allow_nan: bool = False) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().to(torch.float64).numpy()
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a 1-D array of numbers.") from exc
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array; got shape {arr.shape}.")
    bad = ~np.isfinite(arr) if not allow_nan else np.isinf(arr)
    if np.any(bad):
        raise ValueError(f"{name} contains {'infinite' if allow_nan else 'non-finite'} values.")
    return arr


def _class_labels(n: int, class_names: Sequence[Any] | None) -> list[str]:
    if class_names is None:
        return [str(c) for c in range(n)]
    names = [str(c) for c in class_names]
    if len(names) != n:
        raise ValueError(f"class_names has {len(names)} entries for {n} classes.")
    return names


def _class_order(n: int, class_counts: Any) -> np.ndarray:
    """Classes by decreasing training count (stable), or label order."""
    if class_counts is None:
        return np.arange(n)
    counts = _as_vector(class_counts, "class_counts")
    if counts.size != n:
        raise ValueError(f"class_counts has {counts.size} entries for {n} classes.")
    return np.argsort(-counts, kind="stable")


def _check_fitted(surgeon: Any) -> None:
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(surgeon, "perturbation_")


def _measures_model(model: Any, X: Any, what: str) -> bool:
    """Whether a ``from_surgeon`` measures ``model`` on ``X`` (both given) rather
    than plotting the surgeon's own numbers (neither given); one alone is an error."""
    if model is None:
        if X is not None:
            raise ValueError("X is given without model; pass both or neither.")
        return False
    if X is None:
        raise ValueError(f"model is given without X; pass {what} X (and y).")
    return True


def _model_accuracy(model: Any, X: Any, y: Any, n_classes: int, batch_size: int) -> np.ndarray:
    # The baselines' forward helper: eval mode, no grad, any model hessrebal can run.
    from ._data import as_data
    from ._model import model_logits

    data = as_data(X, y)
    logits = model_logits(model, data, batch_size)
    return per_class_accuracy(data.labels(), logits.argmax(1), n_classes)


class _CountingOperator:
    """An operator that counts its products and ticks an optional progress bar."""

    def __init__(self, operator: Any) -> None:
        self.operator = operator
        self.shape = operator.shape
        self.dtype = operator.dtype
        self.device = operator.device
        self.n_matvec = 0
        self.bar: Any = None

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        out = self.operator.matvec(v)
        self.n_matvec += 1
        if self.bar is not None:
            self.bar.update(1)
        return out


# ---------------------------------------------------------------- spectrum
def spectrum_summary(
    operator: Any,
    n_components: int,
    *,
    init: torch.Tensor | None = None,
    tol: float = 1e-3,
    max_iter: int | None = None,
    density: bool = True,
    n_probes: int = 4,
    n_steps: int = 40,
    random_state: int | None = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Top eigenpairs and the SLQ density of an operator, ready to plot.

    Parameters
    ----------
    operator : operator
        Symmetric; ``shape``, ``dtype``, ``device``, ``matvec`` (for example a
        :class:`~hessrebal.curvature.HessianOperator`).
    n_components : int
        Eigenvalues to compute; about ``2C`` for ``C`` classes shows the
        spikes and the top of the bulk.
    init : torch.Tensor of shape (D, m), optional
        Warm start for the eigenvectors (for example a fitted surgeon's
        ``eigenvectors_``, whose pairs then cost almost nothing).
    tol : float, default=1e-3
        Relative residual tolerance of :class:`~hessrebal.spectrum.LanczosSpectrum`.
        The top of the bulk is a tight cluster: a looser tolerance there
        gives Ritz values that fall off smoothly instead of a flat bulk edge
        (measured on the demo's MNIST MLP: 1e-2 put λ₂₀ at 2.9 instead of 4.9).
    max_iter : int, optional
        Most products for the eigenpairs (default: the backend's); pairs
        not converged by then are returned with their residuals (and a
        ``ConvergenceWarning``).
    density : bool, default=True
        Also estimate the spectral density (``n_probes × n_steps`` products).
    n_probes, n_steps : int, default=4, 40
        Settings of :func:`~hessrebal.spectrum.slq_density`.
    random_state : int or None, default=0
    progress : bool, default=False
        Show a progress bar over the Hessian-vector products.

    Returns
    -------
    dict
        ``eigenvalues``, ``residuals``, ``converged``, ``density_grid`` and
        ``density`` (None without ``density``), ``n_spikes`` (by
        :func:`~hessrebal.spectrum.count_spikes`) and ``n_matvec``. The keys
        ``eigenvalues``, ``residuals``, ``density_grid``, ``density`` and
        ``n_spikes`` are :class:`SpectrumDisplay` arguments.
    """
    op = _CountingOperator(operator)
    if progress:
        from tqdm.auto import tqdm

        op.bar = tqdm(desc="top eigenpairs", unit="HVP", leave=False)
    try:
        spec = LanczosSpectrum(tol=tol, max_iter=max_iter, random_state=random_state).compute(
            op, n_components, init=init)
        eigenvalues = spec.eigenvalues.detach().cpu().to(torch.float64).numpy()
        grid = dens = None
        if density:
            if progress:
                op.bar.close()
                op.bar = tqdm(total=n_probes * min(n_steps, op.shape[0]),
                              desc="spectral density", unit="HVP", leave=False)
            grid, dens = slq_density(op, n_probes=n_probes, n_steps=n_steps,
                                     random_state=random_state)
    finally:
        if op.bar is not None:
            op.bar.close()
    return {
        "eigenvalues": eigenvalues,
        "residuals": np.asarray(spec.residuals, dtype=np.float64),
        "converged": np.asarray(spec.converged, dtype=bool),
        "density_grid": grid,
        "density": dens,
        "n_spikes": count_spikes(eigenvalues),
        "n_matvec": op.n_matvec,
    }


class SpectrumDisplay:
    """Top Hessian eigenvalues and spectral density, spikes marked.

    The left panel shows the top eigenvalues against their index on a log
    scale: the spikes filled, the rest (the top of the bulk) hollow, the
    bulk edge as a horizontal line and the ``C − 1`` position (where the
    theory expects the last spike) as a vertical line. The right panel, when
    a density is given, shows the stochastic-Lanczos estimate of the whole
    spectral density on a log scale, with the spikes as a rug: the bulk is a
    tall peak near 0, each spike carries mass ``1/D``.

    Parameters
    ----------
    eigenvalues : array-like of shape (n,)
        Top eigenvalues (sorted here, descending).
    residuals : array-like of shape (n,), optional
        Relative residuals ``‖Hq − λq‖ / |λ₁|`` (reported in the title when
        given).
    density_grid, density : array-like of shape (m,), optional
        The SLQ density (see :func:`~hessrebal.spectrum.slq_density`).
    n_spikes : int, optional
        Number of spikes; default :func:`~hessrebal.spectrum.count_spikes`
        of ``eigenvalues``.
    bulk_edge : float, optional
        Upper edge of the bulk; default the largest eigenvalue that is not a
        spike (none when every eigenvalue given is a spike, or none is).
    n_classes : int, optional
        ``C``; draws the ``C − 1`` line.

    Attributes
    ----------
    figure_ : matplotlib Figure
    ax_ : matplotlib Axes
        The eigenvalue panel.
    axes_ : list of Axes
        All panels drawn (eigenvalues, then density).
    n_spikes_ : int
    bulk_edge_ : float or None
    spike_line_, bulk_line_, class_line_, density_line_ : matplotlib artists or None

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from hessrebal.plotting import SpectrumDisplay
    >>> disp = SpectrumDisplay([40.0, 25.0, 12.0, 3.0, 2.9, 2.8], n_classes=4).plot()
    >>> disp.n_spikes_, disp.bulk_edge_
    (3, 3.0)
    """

    def __init__(
        self,
        eigenvalues: Any,
        *,
        residuals: Any = None,
        density_grid: Any = None,
        density: Any = None,
        n_spikes: int | None = None,
        bulk_edge: float | None = None,
        n_classes: int | None = None,
    ) -> None:
        self.eigenvalues = eigenvalues
        self.residuals = residuals
        self.density_grid = density_grid
        self.density = density
        self.n_spikes = n_spikes
        self.bulk_edge = bulk_edge
        self.n_classes = n_classes

    def plot(self, ax: Any = None, *, title: str | None = None, **kwargs: Any) -> SpectrumDisplay:
        """Draw the eigenvalue panel and, with a density, the density panel.

        Parameters
        ----------
        ax : Axes or sequence of two Axes, optional
            Where to draw. None creates a figure (two panels when a density
            is given); one Axes receives only the eigenvalue panel.
        title : str, optional
            Figure title (default: "Hessian spectrum").
        **kwargs
            Passed to the eigenvalue markers (``Axes.plot``).

        Returns
        -------
        self
        """
        lam = -np.sort(-_as_vector(self.eigenvalues, "eigenvalues"))
        has_density = self.density is not None and self.density_grid is not None
        if (self.density is None) != (self.density_grid is None):
            raise ValueError("density and density_grid must be given together.")
        n_spikes = count_spikes(lam) if self.n_spikes is None else int(self.n_spikes)
        if not 0 <= n_spikes <= lam.size:
            raise ValueError(f"n_spikes must be in [0, {lam.size}]; got {n_spikes}.")
        bulk_edge = self.bulk_edge
        if bulk_edge is None and 0 < n_spikes < lam.size:
            bulk_edge = float(lam[n_spikes])
        n_classes = self.n_classes
        if n_classes is not None and (not isinstance(n_classes, (int, np.integer))
                                      or n_classes < 2):
            raise ValueError(f"n_classes must be an int >= 2; got {n_classes!r}.")

        figsize = (11.0, 4.2) if has_density else (6.0, 4.2)
        fig, axes = _axes_list(ax, 2 if has_density else 1, figsize)
        ax0 = axes[0]
        idx = np.arange(1, lam.size + 1)
        positive = bool(np.all(lam > 0))
        ax0.set_yscale("log" if positive else "symlog",
                       **({} if positive else {"linthresh": 1e-3 * float(np.abs(lam).max() or 1)}))
        ax0.plot(idx, lam, color="0.8", lw=1, zorder=1)
        spike_kw = {"marker": "o", "ls": "none", "ms": 7, "color": _SPIKE_COLOR, "zorder": 3,
                    **kwargs}
        self.spike_line_ = None
        if n_spikes:
            (self.spike_line_,) = ax0.plot(idx[:n_spikes], lam[:n_spikes],
                                           label=f"spikes ({n_spikes})", **spike_kw)
        if n_spikes < lam.size:
            ax0.plot(idx[n_spikes:], lam[n_spikes:], marker="o", ls="none", ms=7, mfc="white",
                     color=_BULK_COLOR, zorder=3, label="top of the bulk")
        self.bulk_line_ = None
        if bulk_edge is not None:
            self.bulk_line_ = ax0.axhline(bulk_edge, color=_BULK_COLOR, ls=":", lw=1.2,
                                          label=f"bulk edge (λ = {bulk_edge:.3g})")
        self.class_line_ = None
        if n_classes is not None:
            self.class_line_ = ax0.axvline(n_classes - 0.5, color="tab:blue", ls="--", lw=1.2,
                                           label=f"C − 1 = {n_classes - 1}")
        if positive:
            from matplotlib.ticker import FuncFormatter, LogLocator

            # Plain numbers ("20", "50") read better than "2×10¹" on a short range.
            ax0.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax0.yaxis.set_minor_locator(LogLocator(base=10, subs=(3.0, 4.0, 6.0, 7.0, 8.0, 9.0)))
            ax0.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax0.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax0.set_xlabel("index i")
        ax0.set_ylabel("eigenvalue λᵢ" + (" (log scale)" if positive else ""))
        ax0.set_xticks(idx if lam.size <= 25 else idx[:: int(np.ceil(lam.size / 20))])
        sub = "Top eigenvalues"
        if self.residuals is not None:
            res = _as_vector(self.residuals, "residuals")
            sub += f" (max residual {float(res.max()):.1e})"
        ax0.set_title(sub)
        ax0.legend(loc="best", fontsize="small")
        ax0.grid(True, which="major", axis="y", alpha=0.3)

        self.density_line_ = None
        if has_density and len(axes) > 1:
            ax1 = axes[1]
            grid = _as_vector(self.density_grid, "density_grid")
            dens = _as_vector(self.density, "density")
            if grid.shape != dens.shape:
                raise ValueError("density_grid and density must have the same shape.")
            floor = max(float(dens.max()), 1e-300) * 1e-9
            shown = np.maximum(dens, floor)
            (self.density_line_,) = ax1.plot(grid, shown, color="tab:blue", lw=1.2,
                                             label="SLQ density")
            ax1.fill_between(grid, floor, shown, color="tab:blue", alpha=0.15)
            ax1.set_yscale("log")
            ax1.set_ylim(floor, float(shown.max()) * 5)
            if n_spikes:
                ax1.plot(lam[:n_spikes], np.full(n_spikes, floor * 3), marker="|", ms=18,
                         mew=2, ls="none", color=_SPIKE_COLOR, label="spike eigenvalues")
            if bulk_edge is not None:
                ax1.axvline(bulk_edge, color=_BULK_COLOR, ls=":", lw=1.2, label="bulk edge")
            ax1.set_xlabel("eigenvalue λ")
            ax1.set_ylabel("density (log scale)")
            ax1.set_title("Spectral density (stochastic Lanczos quadrature)")
            ax1.legend(loc="upper right", fontsize="small")
        fig.suptitle(title if title is not None else "Hessian spectrum")
        self.figure_, self.ax_, self.axes_ = fig, ax0, axes
        self.n_spikes_, self.bulk_edge_ = n_spikes, bulk_edge
        return self

    @classmethod
    def from_spectrum(
        cls,
        eigenvalues: Any,
        density: tuple[Any, Any] | None = None,
        *,
        residuals: Any = None,
        n_spikes: int | None = None,
        bulk_edge: float | None = None,
        n_classes: int | None = None,
        ax: Any = None,
        **kwargs: Any,
    ) -> SpectrumDisplay:
        """Plot computed eigenvalues and an optional ``(grid, density)`` pair.

        ``eigenvalues`` may also be a :class:`~hessrebal.spectrum.Spectrum`
        (its residuals are then used). Other arguments as in the class;
        ``ax`` and ``**kwargs`` go to :meth:`plot`.
        """
        if hasattr(eigenvalues, "eigenvalues") and hasattr(eigenvalues, "residuals"):
            residuals = eigenvalues.residuals if residuals is None else residuals
            eigenvalues = eigenvalues.eigenvalues
        grid, dens = (None, None) if density is None else density
        return cls(eigenvalues, residuals=residuals, density_grid=grid, density=dens,
                   n_spikes=n_spikes, bulk_edge=bulk_edge, n_classes=n_classes,
                   ).plot(ax=ax, **kwargs)

    @classmethod
    def from_operator(
        cls,
        operator: Any,
        n_components: int,
        *,
        n_classes: int | None = None,
        init: torch.Tensor | None = None,
        density: bool = True,
        n_probes: int = 4,
        n_steps: int = 40,
        random_state: int | None = 0,
        progress: bool = False,
        ax: Any = None,
        **kwargs: Any,
    ) -> SpectrumDisplay:
        """Compute (:func:`spectrum_summary`) and plot the spectrum of an operator."""
        summary = spectrum_summary(operator, n_components, init=init, density=density,
                                   n_probes=n_probes, n_steps=n_steps,
                                   random_state=random_state, progress=progress)
        disp = cls(summary["eigenvalues"], residuals=summary["residuals"],
                   density_grid=summary["density_grid"], density=summary["density"],
                   n_spikes=summary["n_spikes"], n_classes=n_classes)
        disp.summary_ = summary
        return disp.plot(ax=ax, **kwargs)

    @classmethod
    def from_surgeon(
        cls,
        surgeon: Any,
        model: Any = None,
        X: Any = None,
        y: Any = None,
        *,
        n_components: int | None = None,
        density: bool = True,
        n_probes: int = 4,
        n_steps: int = 40,
        random_state: int | None = 0,
        progress: bool = False,
        ax: Any = None,
        **kwargs: Any,
    ) -> SpectrumDisplay:
        """The spectrum a fitted surgeon worked with.

        Without ``model``, plots the surgeon's own ``eigenvalues_`` (its
        ``n_components_`` spikes, no density). With ``model`` and the
        curvature data ``X, y`` it was fitted with, computes the top
        ``n_components`` (default ``2C``) eigenvalues of the same operator
        (warm-started from ``eigenvectors_``) and the SLQ density.

        Parameters
        ----------
        surgeon : fitted SpectralSurgeon
        model : nn.Module, optional
            The model the surgeon was fitted on (not the transformed one).
        X, y : data, optional
            The curvature data (the validation data unless ``curvature_data``
            was given to ``fit``).
        n_components : int, optional
        density, n_probes, n_steps, random_state, progress
            As in :func:`spectrum_summary`.
        ax, **kwargs
            Passed to :meth:`plot`.
        """
        _check_fitted(surgeon)
        C = int(surgeon.n_classes_)
        if not _measures_model(model, X, "the curvature data"):
            return cls(surgeon.eigenvalues_, n_spikes=int(surgeon.n_components_),
                       n_classes=C).plot(ax=ax, **kwargs)
        from .curvature import HessianOperator

        op = HessianOperator(model, X, y, params=surgeon.params, curvature=surgeon.curvature,
                             batch_size=surgeon.batch_size,
                             output_to_logits=surgeon.output_to_logits)
        k = min(2 * C if n_components is None else int(n_components), op.shape[0])
        init = surgeon.eigenvectors_ if surgeon.eigenvectors_.shape[0] == op.shape[0] else None
        return cls.from_operator(op, k, n_classes=C, init=init, density=density,
                                 n_probes=n_probes, n_steps=n_steps, random_state=random_state,
                                 progress=progress, ax=ax, **kwargs)


# --------------------------------------------------------- per-class accuracy
class PerClassAccuracyDisplay:
    """Per-class accuracy before and after the surgery (and any baselines).

    Grouped bars, one group per class, classes ordered by decreasing
    training frequency when ``class_counts`` is given (head on the left,
    tail on the right). Each legend entry carries the balanced accuracy and
    the standard deviation σ of the per-class accuracies.

    Parameters
    ----------
    before, after : array-like of shape (C,)
        Per-class accuracy of the model and of the transformed model
        (``nan`` for a class with no sample).
    baselines : mapping of str to array-like of shape (C,), optional
        Further methods to compare, e.g. ``{"logit adjustment": acc}``.
    class_counts : array-like of shape (C,), optional
        Training samples per class: orders the classes and labels the ticks.
    class_names : sequence of str, optional
    before_label, after_label : str
        Legend names of the first two series.

    Attributes
    ----------
    figure_, ax_ : matplotlib Figure and Axes
    bars_ : dict of str to BarContainer
        One container per series, bars in plotted order.
    order_ : ndarray of shape (C,)
        The class indices in plotted order.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from hessrebal.plotting import PerClassAccuracyDisplay
    >>> disp = PerClassAccuracyDisplay([0.9, 0.2], [0.85, 0.6], class_counts=[10, 90]).plot()
    >>> disp.order_.tolist(), len(disp.ax_.patches)
    ([1, 0], 4)
    """

    def __init__(
        self,
        before: Any,
        after: Any,
        *,
        baselines: Mapping[str, Any] | None = None,
        class_counts: Any = None,
        class_names: Sequence[Any] | None = None,
        before_label: str = "before",
        after_label: str = "spectral surgery",
    ) -> None:
        self.before = before
        self.after = after
        self.baselines = baselines
        self.class_counts = class_counts
        self.class_names = class_names
        self.before_label = before_label
        self.after_label = after_label

    def plot(self, ax: Any = None, *, title: str | None = None,
             **kwargs: Any) -> PerClassAccuracyDisplay:
        """Draw the grouped bars.

        Parameters
        ----------
        ax : Axes, optional
        title : str, optional
            Default "Per-class accuracy".
        **kwargs
            Passed to every ``Axes.bar`` call.

        Returns
        -------
        self
        """
        series: dict[str, np.ndarray] = {
            self.before_label: _as_vector(self.before, "before", allow_nan=True),
            self.after_label: _as_vector(self.after, "after", allow_nan=True),
        }
        for name, acc in (self.baselines or {}).items():
            series[str(name)] = _as_vector(acc, f"baselines[{name!r}]", allow_nan=True)
        C = series[self.before_label].size
        for name, acc in series.items():
            if acc.size != C:
                raise ValueError(f"'{name}' has {acc.size} classes; 'before' has {C}.")
        order = _class_order(C, self.class_counts)
        names = _class_labels(C, self.class_names)
        counts = None if self.class_counts is None else _as_vector(self.class_counts,
                                                                   "class_counts")

        width_per_class = 0.55 + 0.12 * len(series)
        fig, axes = _axes_list(ax, 1, (max(6.5, width_per_class * C), 4.6))
        ax0 = axes[0]
        colors = ["0.6", "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown"]
        width = 0.8 / len(series)
        x = np.arange(C)
        self.bars_ = {}
        for s, (name, acc) in enumerate(series.items()):
            label = (f"{name} (bal. acc. {balanced_accuracy(acc):.3f}, "
                     f"σ {class_std(acc):.3f})")
            bar_kw = {"color": colors[s % len(colors)], "edgecolor": "white", "lw": 0.5,
                      **kwargs}
            self.bars_[name] = ax0.bar(x - 0.4 + width * (s + 0.5), np.nan_to_num(acc[order]),
                                       width, label=label, **bar_kw)
        ticks = [names[c] if counts is None else f"{names[c]}\nn={int(counts[c])}"
                 for c in order]
        ax0.set_xticks(x, ticks)
        ax0.set_xlim(-0.6, C - 0.4)
        ax0.set_ylim(0, 1.0)
        ax0.set_ylabel("accuracy")
        ax0.set_xlabel("class (by decreasing training count)" if counts is not None
                       else "class")
        ax0.grid(True, axis="y", alpha=0.3)
        ax0.set_axisbelow(True)
        ax0.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22 if counts is not None
                                                        else -0.14),
                   ncol=min(len(series), 3 if C >= 8 else 2), fontsize="small",
                   frameon=False)
        ax0.set_title(title if title is not None else "Per-class accuracy")
        self.figure_, self.ax_, self.order_ = fig, ax0, order
        return self

    @classmethod
    def from_surgeon(
        cls,
        surgeon: Any,
        model: Any = None,
        X: Any = None,
        y: Any = None,
        *,
        baselines: Mapping[str, Any] | None = None,
        class_counts: Any = None,
        class_names: Sequence[Any] | None = None,
        ax: Any = None,
        **kwargs: Any,
    ) -> PerClassAccuracyDisplay:
        """Per-class accuracy of a fitted surgeon's model before and after.

        Without data, plots the surgeon's ``per_class_accuracy_before_`` and
        ``per_class_accuracy_after_`` (measured on the selection data during
        ``fit``). With ``model`` and held-out ``X, y``, measures ``model``
        and ``surgeon.transform(model)`` there.

        Parameters
        ----------
        surgeon : fitted SpectralSurgeon
        model : nn.Module, optional
        X, y : data, optional
            Held-out data (a test split).
        baselines : mapping of str to model or array-like, optional
            Models (for example a fitted ``LogitAdjustment().transform(model)``)
            are measured on ``X, y``; arrays are per-class accuracies.
        class_counts, class_names, ax, **kwargs
            As in the class and :meth:`plot`.
        """
        _check_fitted(surgeon)
        C = int(surgeon.n_classes_)
        if not _measures_model(model, X, "held-out data"):
            before, after = surgeon.per_class_accuracy_before_, surgeon.per_class_accuracy_after_
        else:
            before = _model_accuracy(model, X, y, C, surgeon.batch_size)
            after = _model_accuracy(surgeon.transform(model), X, y, C, surgeon.batch_size)
        measured: dict[str, Any] = {}
        for name, value in (baselines or {}).items():
            if isinstance(value, torch.nn.Module) or hasattr(value, "module_"):
                if X is None:
                    raise ValueError(f"baseline '{name}' is a model; pass X, y to measure it.")
                measured[name] = _model_accuracy(value, X, y, C, surgeon.batch_size)
            else:
                measured[name] = value
        return cls(before, after, baselines=measured, class_counts=class_counts,
                   class_names=class_names).plot(ax=ax, **kwargs)


# ------------------------------------------------------------- sensitivity
class SensitivityDisplay:
    """The spike–class sensitivity matrix ``S`` (``C × k``) as a heat map.

    ``S_ji`` is the change of class ``j``'s (surrogate) accuracy per unit
    step along spike ``i``. The diverging colour map is centred at 0: blue
    cells are classes that gain along ``+q_i``, red cells classes that lose.

    Parameters
    ----------
    sensitivity : array-like of shape (C, k)
    eigenvalues : array-like of shape (k,), optional
        Label the columns with the spike eigenvalues.
    class_counts : array-like of shape (C,), optional
        Order the rows by decreasing training count and label them.
    class_names : sequence of str, optional

    Attributes
    ----------
    figure_, ax_ : matplotlib Figure and Axes
    im_ : AxesImage
        Its ``norm`` has ``vmin = −vmax``.
    colorbar_ : Colorbar or None
    text_ : ndarray of Text or None
        Cell annotations.
    order_ : ndarray of shape (C,)

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from hessrebal.plotting import SensitivityDisplay
    >>> disp = SensitivityDisplay([[0.5, -1.0], [0.2, 0.1]]).plot()
    >>> disp.im_.norm.vmin, disp.im_.norm.vmax
    (-1.0, 1.0)
    """

    def __init__(
        self,
        sensitivity: Any,
        *,
        eigenvalues: Any = None,
        class_counts: Any = None,
        class_names: Sequence[Any] | None = None,
    ) -> None:
        self.sensitivity = sensitivity
        self.eigenvalues = eigenvalues
        self.class_counts = class_counts
        self.class_names = class_names

    def plot(self, ax: Any = None, *, cmap: str = "RdBu", annotate: bool | None = None,
             colorbar: bool = True, title: str | None = None,
             **kwargs: Any) -> SensitivityDisplay:
        """Draw the heat map.

        Parameters
        ----------
        ax : Axes, optional
        cmap : str or Colormap, default="RdBu"
            A diverging map (red negative, blue positive).
        annotate : bool, optional
            Write each value in its cell; default when ``C·k ≤ 200``.
        colorbar : bool, default=True
        title : str, optional
        **kwargs
            Passed to ``Axes.imshow``.

        Returns
        -------
        self
        """
        from matplotlib.colors import Normalize

        S = self.sensitivity
        if isinstance(S, torch.Tensor):
            S = S.detach().cpu().to(torch.float64).numpy()
        S = np.asarray(S, dtype=np.float64)
        if S.ndim != 2 or S.size == 0:
            raise ValueError(f"sensitivity must be a non-empty 2-D array; got shape {S.shape}.")
        if not np.all(np.isfinite(S)):
            raise ValueError("sensitivity contains non-finite values.")
        C, k = S.shape
        order = _class_order(C, self.class_counts)
        names = _class_labels(C, self.class_names)
        counts = None if self.class_counts is None else _as_vector(self.class_counts,
                                                                   "class_counts")
        lam = None if self.eigenvalues is None else _as_vector(self.eigenvalues, "eigenvalues")
        if lam is not None and lam.size != k:
            raise ValueError(f"eigenvalues has {lam.size} entries for {k} spikes.")

        fig, axes = _axes_list(ax, 1, (max(5.5, 0.75 * k + 3.0), max(4.0, 0.42 * C + 1.6)))
        ax0 = axes[0]
        vlim = float(np.abs(S).max()) or 1.0
        shown = S[order]
        self.im_ = ax0.imshow(shown, cmap=cmap, norm=Normalize(-vlim, vlim), aspect="auto",
                              interpolation="nearest", **kwargs)
        ax0.set_xticks(np.arange(k), [f"q{i + 1}" if lam is None else f"q{i + 1}\n{lam[i]:.3g}"
                                      for i in range(k)])
        ax0.set_yticks(np.arange(C), [names[c] if counts is None
                                      else f"{names[c]} (n={int(counts[c])})" for c in order])
        ax0.set_xlabel("spike i" + ("" if lam is None else " (eigenvalue λᵢ)"))
        ax0.set_ylabel("class" + ("" if counts is None else " (by decreasing training count)"))
        self.text_ = None
        if annotate or (annotate is None and C * k <= 200):
            self.text_ = np.empty((C, k), dtype=object)
            for r in range(C):
                for c in range(k):
                    v = shown[r, c]
                    self.text_[r, c] = ax0.text(
                        c, r, f"{v:.2g}", ha="center", va="center", fontsize="x-small",
                        color="white" if abs(v) > 0.6 * vlim else "black")
        self.colorbar_ = None
        if colorbar:
            self.colorbar_ = fig.colorbar(self.im_, ax=ax0)
            self.colorbar_.set_label("sensitivity Sⱼᵢ (Δ class score per unit αᵢ)")
        ax0.set_title(title if title is not None else "Spike–class sensitivity")
        self.figure_, self.ax_, self.order_ = fig, ax0, order
        return self

    @classmethod
    def from_surgeon(
        cls,
        surgeon: Any,
        *,
        class_counts: Any = None,
        class_names: Sequence[Any] | None = None,
        ax: Any = None,
        **kwargs: Any,
    ) -> SensitivityDisplay:
        """The first sensitivity matrix of a fitted surgeon (``sensitivity_``)."""
        _check_fitted(surgeon)
        if surgeon.sensitivity_ is None:
            raise ValueError("the surgeon took no step (max_steps=0), so it has no "
                             "sensitivity matrix.")
        return cls(surgeon.sensitivity_, eigenvalues=surgeon.eigenvalues_,
                   class_counts=class_counts, class_names=class_names).plot(ax=ax, **kwargs)


# ----------------------------------------------------------------- history
class HistoryDisplay:
    """The amplitude-control loop step by step.

    Top panel: the budget ``α_max`` used at each step. Bottom panel: σ and
    the balanced accuracy after each decision, and σ of every candidate;
    accepted steps are green dots, rolled-back steps red crosses. Steps are
    numbered from 0, as ``history_["step"]`` and the report's step table;
    the model before the surgery sits left of step 0, labelled "before".

    Parameters
    ----------
    budget : array-like of shape (T,)
    class_std : array-like of shape (T,)
        σ after each step's decision.
    accepted : array-like of bool, shape (T,)
    balanced_accuracy : array-like of shape (T,), optional
    candidate_class_std : array-like of shape (T,), optional
        σ of each step's candidate (``nan`` for a zero step).
    initial_class_std, initial_balanced_accuracy : float, optional
        Values before the first step (plotted at x = −1, labelled "before").

    Attributes
    ----------
    figure_ : matplotlib Figure
    ax_ : matplotlib Axes
        The budget panel.
    axes_ : list of Axes
        Budget panel, then score panel (when drawn).
    accepted_markers_, rejected_markers_ : Line2D
        Markers on the budget panel.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from hessrebal.plotting import HistoryDisplay
    >>> disp = HistoryDisplay([0.1, 0.1, 0.07], [0.3, 0.3, 0.25], [False, False, True]).plot()
    >>> len(disp.accepted_markers_.get_xdata()), len(disp.rejected_markers_.get_xdata())
    (1, 2)
    """

    def __init__(
        self,
        budget: Any,
        class_std: Any,
        accepted: Any,
        *,
        balanced_accuracy: Any = None,
        candidate_class_std: Any = None,
        initial_class_std: float | None = None,
        initial_balanced_accuracy: float | None = None,
    ) -> None:
        self.budget = budget
        self.class_std = class_std
        self.accepted = accepted
        self.balanced_accuracy = balanced_accuracy
        self.candidate_class_std = candidate_class_std
        self.initial_class_std = initial_class_std
        self.initial_balanced_accuracy = initial_balanced_accuracy

    def plot(self, ax: Any = None, *, title: str | None = None,
             **kwargs: Any) -> HistoryDisplay:
        """Draw the budget and score panels.

        Parameters
        ----------
        ax : Axes or sequence of two Axes, optional
            None creates a figure with two stacked panels; one Axes receives
            only the budget panel.
        title : str, optional
            Default "Amplitude control".
        **kwargs
            Passed to the budget line (``Axes.step``).

        Returns
        -------
        self
        """
        budget = _as_vector(self.budget, "budget")
        T = budget.size
        sigma = _as_vector(self.class_std, "class_std")
        accepted = np.asarray(self.accepted, dtype=bool).reshape(-1)
        for name, arr in (("class_std", sigma), ("accepted", accepted)):
            if arr.size != T:
                raise ValueError(f"{name} has {arr.size} entries; budget has {T}.")
        bal = (None if self.balanced_accuracy is None
               else _as_vector(self.balanced_accuracy, "balanced_accuracy"))
        cand = (None if self.candidate_class_std is None
                else _as_vector(self.candidate_class_std, "candidate_class_std", allow_nan=True))
        for name, arr in (("balanced_accuracy", bal), ("candidate_class_std", cand)):
            if arr is not None and arr.size != T:
                raise ValueError(f"{name} has {arr.size} entries; budget has {T}.")

        fig, axes = _axes_list(ax, 2, (7.5, 6.0), sharex=True)
        steps = np.arange(T)  # history_["step"]
        ax0 = axes[0]
        ax0.step(steps, budget, where="mid", color="0.4", lw=1.2, label="budget α_max",
                 **kwargs)
        (self.accepted_markers_,) = ax0.plot(steps[accepted], budget[accepted], "o",
                                             color=_ACCEPT_COLOR, ms=8,
                                             label=f"accepted ({int(accepted.sum())})")
        (self.rejected_markers_,) = ax0.plot(steps[~accepted], budget[~accepted], "x",
                                             color=_REJECT_COLOR, ms=9, mew=2,
                                             label=f"rolled back ({int((~accepted).sum())})")
        ax0.set_ylabel("budget α_max")
        ax0.set_ylim(0, float(budget.max()) * 1.15 or 1.0)
        ax0.legend(loc="upper right", fontsize="small")
        ax0.grid(True, alpha=0.3)
        ax0.set_title(title if title is not None else "Amplitude control")
        if len(axes) == 1:
            ax0.set_xlabel("step")
        else:
            ax1 = axes[1]
            xs = np.arange(-1, T) if self.initial_class_std is not None else steps
            sig = (np.r_[float(self.initial_class_std), sigma]
                   if self.initial_class_std is not None else sigma)
            ax1.plot(xs, sig, "-", color="tab:purple", lw=1.8, label="σ (class std) after step")
            if cand is not None:
                ax1.plot(steps[accepted], cand[accepted], "o", color=_ACCEPT_COLOR, ms=7,
                         label="candidate σ, accepted")
                ax1.plot(steps[~accepted], cand[~accepted], "x", color=_REJECT_COLOR, ms=8,
                         mew=2, label="candidate σ, rolled back")
            if bal is not None:
                xb = (np.r_[-1, steps] if self.initial_balanced_accuracy is not None
                      else steps)
                bv = (np.r_[float(self.initial_balanced_accuracy), bal]
                      if self.initial_balanced_accuracy is not None else bal)
                ax1.plot(xb, bv, "--", color="tab:blue", lw=1.8, label="balanced accuracy")
            ax1.set_xlabel("step")
            ax1.set_ylabel("on the selection data")
            ax1.set_ylim(0, 1.0)
            ax1.grid(True, alpha=0.3)
            ax1.legend(loc="center right", fontsize="small")
            before = self.initial_class_std is not None or bal is not None and \
                self.initial_balanced_accuracy is not None
            ticks = np.arange(-1 if before else 0, T)
            ax1.set_xticks(ticks)
            ax1.set_xticklabels(["before" if t < 0 else str(t) for t in ticks])
        self.figure_, self.ax_, self.axes_ = fig, ax0, axes
        return self

    @classmethod
    def from_surgeon(cls, surgeon: Any, *, ax: Any = None, **kwargs: Any) -> HistoryDisplay:
        """The ``history_`` of a fitted surgeon."""
        _check_fitted(surgeon)
        h = surgeon.history_
        if not h:
            raise ValueError("the surgeon's history_ is empty (max_steps=0).")

        def col(key):
            return [np.nan if e.get(key) is None else e[key] for e in h]

        before = np.asarray(surgeon.per_class_accuracy_before_, dtype=np.float64)
        return cls(col("budget"), col("class_std"), [bool(e["accepted"]) for e in h],
                   balanced_accuracy=col("balanced_accuracy"),
                   candidate_class_std=col("candidate_class_std"),
                   initial_class_std=class_std(before),
                   initial_balanced_accuracy=balanced_accuracy(before),
                   ).plot(ax=ax, **kwargs)
