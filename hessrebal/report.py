"""The demo's Markdown report and its figures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ._persistence import save_figure_atomic, write_text_atomic
from .metrics import balanced_accuracy, class_std

__all__ = ["FIGURES", "render_fit_report", "render_report", "write_figures", "write_fit_report",
           "write_report"]

#: The figures :func:`write_report` writes next to ``report.md``.
FIGURES = {
    "per_class": "per_class_accuracy.png",
    "spectrum": "spectrum.png",
    "sensitivity": "sensitivity.png",
    "history": "history.png",
}

_METHODS = (("before", "before"), ("after", "spectral surgery"),
            ("logit_adjustment", "logit adjustment"),
            ("last_layer_retraining", "last-layer retraining"))


def _figure(figsize: tuple[float, float]):
    # A bare Figure, not pyplot: no GUI backend, no global state to leak.
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def _save(fig: Any, path: Path) -> None:
    # Atomic: a run stopped mid-write keeps the previous report's figure.
    save_figure_atomic(fig, path, dpi=110, bbox_inches="tight")


def write_figures(result: Any, output_dir: Path) -> dict[str, Path]:
    """Draw the four figures of a :class:`~hessrebal.demo.DemoResult`.

    Returns the paths by key of :data:`FIGURES`.
    """
    from .plotting import (
        HistoryDisplay,
        PerClassAccuracyDisplay,
        SensitivityDisplay,
        SpectrumDisplay,
    )

    s = result.surgeon
    C = len(result.classes)
    paths = {key: output_dir / name for key, name in FIGURES.items()}

    fig = _figure((max(6.5, 0.91 * C), 4.6))
    PerClassAccuracyDisplay(
        result.before["per_class_accuracy"], result.after["per_class_accuracy"],
        baselines={"logit adjustment": result.logit_adjustment["per_class_accuracy"],
                   "last-layer retraining": result.last_layer_retraining["per_class_accuracy"]},
        class_counts=result.class_counts, class_names=result.classes,
    ).plot(ax=fig.subplots(), title="Per-class accuracy on the held-out test split")
    _save(fig, paths["per_class"])

    spec = result.spectrum
    if spec is not None and spec.get("density") is not None:
        fig = _figure((11.0, 4.2))
        axes = list(fig.subplots(1, 2))
        SpectrumDisplay(spec["eigenvalues"], residuals=spec["residuals"],
                        density_grid=spec["density_grid"], density=spec["density"],
                        n_spikes=spec.get("n_spikes"), n_classes=C).plot(ax=axes)
    else:
        fig = _figure((6.0, 4.2))
        eigenvalues = s.eigenvalues_ if spec is None else spec["eigenvalues"]
        SpectrumDisplay(eigenvalues, n_spikes=None if spec is not None else s.n_components_,
                        n_classes=C).plot(ax=fig.subplots())
    _save(fig, paths["spectrum"])

    k = s.sensitivity_.shape[1] if s.sensitivity_ is not None else 1
    fig = _figure((max(5.5, 0.75 * k + 3.0), max(4.0, 0.42 * C + 1.6)))
    if s.sensitivity_ is not None:
        SensitivityDisplay(s.sensitivity_, eigenvalues=s.eigenvalues_,
                           class_counts=result.class_counts, class_names=result.classes,
                           ).plot(ax=fig.subplots())
    else:
        fig.text(0.5, 0.5, "no step was taken (max_steps=0)", ha="center")
    _save(fig, paths["sensitivity"])

    fig = _figure((7.5, 6.0))
    if s.history_:
        HistoryDisplay.from_surgeon(s, ax=list(fig.subplots(2, 1, sharex=True)))
    else:
        fig.text(0.5, 0.5, "no step was taken (max_steps=0)", ha="center")
    _save(fig, paths["history"])
    return paths


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def render_report(result: Any) -> str:
    """The Markdown text of the demo report (figures referenced by file name)."""
    s = result.surgeon
    st = result.settings
    classes = result.classes
    counts = result.class_counts
    order = np.argsort(-counts, kind="stable")
    res = {key: getattr(result, key) for key, _ in _METHODS}
    n_test = st.get("n_test")
    out: list[str] = []
    out.append("# hessrebal demo report\n")
    out.append(
        f"The demo trains {st['model']} for {st['epochs']} epochs on `{st['dataset']}` "
        f"(imbalance ratio {st['imbalance_ratio']:g}: {int(counts.max())} training images in the "
        f"largest class, {int(counts.min())} in the smallest), then rebalances it with "
        "`SpectralSurgeon` on the balanced validation split. Post-hoc logit "
        "adjustment (training prior, τ tuned on the validation split) is the reference. "
        "Every number below is measured on the balanced **test** split"
        + (f" ({n_test} images)" if n_test else "")
        + ", which neither the training, the surgery nor the tuning of τ saw.\n")
    out.append(f"![Per-class accuracy before and after]({FIGURES['per_class']})\n")

    out.append("## Summary\n")
    rows = []
    for key, label in (("balanced_accuracy", "balanced accuracy"),
                       ("class_std", "class std σ"), ("worst_class_accuracy", "worst class"),
                       ("accuracy", "accuracy"), ("nll", "NLL")):
        row: list[Any] = [label]
        for m, _ in _METHODS:
            value = res[m].get(key)
            if key == "worst_class_accuracy":
                row.append(f"{value:.3f} (class {classes[res[m]['worst_class']]})")
            else:
                row.append(value)
        rows.append(row)
    out.append(_table(["metric", *[name for _, name in _METHODS]], rows) + "\n")

    out.append("## Per-class accuracy (test split)\n")
    out.append("Classes by decreasing training count.\n")
    rows = []
    for c in order:
        b = res["before"]["per_class_accuracy"][c]
        a = res["after"]["per_class_accuracy"][c]
        la = res["logit_adjustment"]["per_class_accuracy"][c]
        llr = res["last_layer_retraining"]["per_class_accuracy"][c]
        rows.append([classes[c], int(counts[c]), b, a, f"{a - b:+.3f}", la, llr])
    out.append(_table(["class", "n_train", "before", "spectral surgery", "change",
                       "logit adjustment", "last-layer retraining"], rows) + "\n")

    out.append("## The surgery\n")
    accepted = sum(bool(h["accepted"]) for h in s.history_)
    lam = ", ".join(f"{v:.3g}" for v in s.eigenvalues_)
    before_sel, after_sel = s.per_class_accuracy_before_, s.per_class_accuracy_after_
    out.append(
        f"- spikes used: {s.n_components_} (eigenvalues {lam})\n"
        f"- initial budget α_max: {s.initial_budget_:.4g}"
        + (" (data-driven: √(2κ/λ₁), κ = 0.05)" if s.budget is None else "") + "\n"
        f"- steps: {accepted} of {len(s.history_)} accepted; {s.n_hvp_} Hessian-vector products\n"
        f"- predicted loss increase ½Σλᵢαᵢ²: {s.predicted_loss_increase_:.4f}\n"
        f"- on the selection (validation) data: σ {class_std(before_sel):.3f} → "
        f"{class_std(after_sel):.3f}, balanced accuracy {balanced_accuracy(before_sel):.3f} → "
        f"{balanced_accuracy(after_sel):.3f}\n")
    spec = result.spectrum
    if spec is not None:
        out.append(
            f"The top {len(spec['eigenvalues'])} eigenvalues of the Hessian the surgeon used "
            f"(the validation data) show {spec['n_spikes']} spikes by the eigengap rule "
            f"(C − 1 = {len(classes) - 1}); the right panel is the stochastic-Lanczos "
            "estimate of the whole spectral density.\n")
    out.append(f"![Hessian spectrum]({FIGURES['spectrum']})\n")
    out.append("How each class's (surrogate) accuracy responds to a step along each spike, "
               "at the trained model:\n")
    out.append(f"![Spike-class sensitivity]({FIGURES['sensitivity']})\n")
    out.append("### Steps\n")
    out.append("Numbered as in `history_[\"step\"]` and the figure, from 0.\n")
    rows = []
    for h in s.history_:
        rows.append([h["step"], f"{h['budget']:.4g}",
                     "accepted" if h["accepted"] else "rolled back", h["reason"],
                     h.get("candidate_class_std"), h["class_std"], h["balanced_accuracy"],
                     f"{h['predicted_loss_increase']:.4f}"])
    out.append(_table(["step", "budget", "decision", "reason", "candidate σ", "σ after",
                       "balanced accuracy after", "predicted loss increase"], rows,
                      align="rrllrrrr") + "\n")
    out.append(f"![Amplitude control]({FIGURES['history']})\n")

    out.append("## Settings\n")
    rows = [[k, st[k]] for k in ("dataset", "imbalance_ratio", "random_state", "epochs",
                                  "model", "n_train", "n_val", "n_test") if k in st]
    out.append(_table(["setting", "value"], rows, align="ll") + "\n")
    out.append("SpectralSurgeon parameters:\n")
    out.append(_table(["parameter", "value"],
                      [[k, f"`{v}`"] for k, v in st.get("surgeon", {}).items()],
                      align="ll") + "\n")

    out.append("## Timings\n")
    rows = [[k.replace("_", " "), f"{v:.1f}"] for k, v in result.timings.items()]
    rows.append(["total", f"{sum(result.timings.values()):.1f}"])
    out.append(_table(["stage", "seconds"], rows) + "\n")
    return "\n".join(out)


def write_report(result: Any, output_dir: str | Path) -> Path:
    """Write ``report.md`` and its four figures for a demo result.

    Parameters
    ----------
    result : DemoResult
        From :func:`hessrebal.demo.run_demo` (with ``spectrum=True`` the
        spectrum figure includes the SLQ density and the top of the bulk).
    output_dir : str or Path
        Created if needed; existing files of the same names are replaced.

    Returns
    -------
    Path
        The path of ``report.md``.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"output directory {str(output_dir)!r} is a file.")
    output_dir.mkdir(parents=True, exist_ok=True)
    write_figures(result, output_dir)
    path = output_dir / "report.md"
    write_text_atomic(path, render_report(result))
    return path


# ------------------------------------------------------------ hessrebal fit
def _fit_figures(output_dir: Path, info: dict[str, Any], surgeon: Any, before: dict[str, Any],
                 after: dict[str, Any], where: str) -> dict[str, str]:
    from .plotting import HistoryDisplay, PerClassAccuracyDisplay, SensitivityDisplay

    C = int(info["n_classes"])
    names: dict[str, str] = {}
    fig = _figure((max(6.5, 0.91 * C), 4.6))
    PerClassAccuracyDisplay(before["per_class_accuracy"], after["per_class_accuracy"]).plot(
        ax=fig.subplots(), title=f"Per-class accuracy on the {where}")
    _save(fig, output_dir / FIGURES["per_class"])
    names["per_class"] = FIGURES["per_class"]
    if surgeon is not None and surgeon.sensitivity_ is not None:
        k = surgeon.sensitivity_.shape[1]
        fig = _figure((max(5.5, 0.75 * k + 3.0), max(4.0, 0.42 * C + 1.6)))
        SensitivityDisplay(surgeon.sensitivity_, eigenvalues=surgeon.eigenvalues_,
                           ).plot(ax=fig.subplots())
        _save(fig, output_dir / FIGURES["sensitivity"])
        names["sensitivity"] = FIGURES["sensitivity"]
    if surgeon is not None and surgeon.history_:
        fig = _figure((7.5, 6.0))
        HistoryDisplay.from_surgeon(surgeon, ax=list(fig.subplots(2, 1, sharex=True)))
        _save(fig, output_dir / FIGURES["history"])
        names["history"] = FIGURES["history"]
    return names


def render_fit_report(info: dict[str, Any], estimators: list[tuple[str, Any]],
                      before: dict[str, Any], after: dict[str, Any],
                      written: dict[str, Path], figures: dict[str, str]) -> str:
    """The Markdown text of ``hessrebal fit``'s report."""
    on_test = info.get("test") is not None
    out: list[str] = ["# hessrebal fit report\n"]
    out.append(
        f"`{info['method']}` on `{info['model']}` ({info['kind']}, {info['n_parameters']:,} "
        f"parameters, {info['n_classes']} classes), fitted on `{info['val']}` "
        f"({info['n_val']} samples)"
        + (f", Hessian on `{info['curvature']}` ({info['n_curvature']} samples)"
           if info.get("curvature") else "")
        + ". Every number below is measured on the **"
        + (f"test data** `{info['test']}`" if on_test else "validation data**")
        + f" ({info['n_eval']} samples)"
        + ("." if on_test else ": the method chose its changes on these samples, so the "
           "numbers are optimistic; pass --test with held-out data for an honest "
           "estimate.") + "\n")
    out.append(f"![Per-class accuracy before and after]({figures['per_class']})\n")
    out.append(f"## Summary ({'test' if on_test else 'validation'} data)\n")
    rows = []
    for key, label in (("balanced_accuracy", "balanced accuracy"),
                       ("class_std", "class std σ"), ("worst_class_accuracy", "worst class"),
                       ("accuracy", "accuracy")):
        b, a = before[key], after[key]
        if key == "worst_class_accuracy":
            rows.append([label, f"{b:.3f} (class {before['worst_class']})",
                         f"{a:.3f} (class {after['worst_class']})", f"{a - b:+.3f}"])
        else:
            rows.append([label, b, a, f"{a - b:+.3f}"])
    out.append(_table(["metric", "before", "after", "change"], rows) + "\n")
    out.append(f"## Per-class accuracy ({'test' if on_test else 'validation'} data)\n")
    counts = info["eval_counts"]
    rows = []
    for c in range(int(info["n_classes"])):
        b = before["per_class_accuracy"][c]
        a = after["per_class_accuracy"][c]
        rows.append([c, int(counts[c]), b, a, "–" if math.isnan(a - b) else f"{a - b:+.3f}"])
    out.append(_table(["class", "samples", "before", "after", "change"], rows) + "\n")
    lost = [(c, r[4]) for c, r in enumerate(rows) if r[4] != "–" and float(r[4]) < 0]
    if lost:
        out.append("Classes that lost accuracy: "
                   + ", ".join(f"{c} ({d})" for c, d in lost) + ".\n")

    surgeon = dict(estimators).get("surgeon")
    if surgeon is not None:
        s = surgeon
        out.append("## The surgery\n")
        accepted = sum(bool(h["accepted"]) for h in s.history_)
        lam = ", ".join(f"{v:.3g}" for v in s.eigenvalues_)
        out.append(
            f"- spikes used: {s.n_components_} (eigenvalues {lam})\n"
            f"- initial budget α_max: {s.initial_budget_:.4g}\n"
            f"- steps: {accepted} of {len(s.history_)} accepted; {s.n_hvp_} Hessian-vector "
            "products\n"
            f"- predicted loss increase ½Σλᵢαᵢ²: {s.predicted_loss_increase_:.4f}\n")
        if s.history_:
            out.append("### Steps\n")
            out.append("Numbered as in `history_[\"step\"]` (from 0).\n")
            rows = [[h["step"], f"{h['budget']:.4g}",
                     "accepted" if h["accepted"] else "rolled back", h["reason"],
                     h.get("candidate_class_std"), h["class_std"], h["balanced_accuracy"]]
                    for h in s.history_]
            out.append(_table(["step", "budget", "decision", "reason", "candidate σ",
                               "σ after", "balanced accuracy after"], rows,
                              align="rrllrrr") + "\n")
        for key, caption in (("sensitivity", "Spike-class sensitivity"),
                             ("history", "Amplitude control")):
            if key in figures:
                out.append(f"![{caption}]({figures[key]})\n")

    out.append("## Settings\n")
    for stem, est in estimators:
        params = {k: v for k, v in est.get_params(deep=False).items()}
        out.append(f"`{type(est).__name__}` ({stem}):\n")
        out.append(_table(["parameter", "value"],
                          [[k, f"`{v!r}`" if not isinstance(v, np.ndarray)
                            else "`array`"] for k, v in params.items()],
                          align="ll") + "\n")
    out.append(f"Seed {info['seed']}, {info['threads']} torch thread(s).\n")
    out.append("## Outputs\n")
    out.append("\n".join(f"- {k}: `{Path(v).name}`" for k, v in written.items()) + "\n")
    out.append("## Timings\n")
    rows = [[k, f"{v:.1f}"] for k, v in info["timings"].items()]
    out.append(_table(["stage", "seconds"], rows) + "\n")
    return "\n".join(out)


def write_fit_report(output_dir: Path, info: dict[str, Any], estimators: list[tuple[str, Any]],
                     before: dict[str, Any], after: dict[str, Any],
                     written: dict[str, Path]) -> Path:
    """Write ``report.md`` and its figures for ``hessrebal fit``; returns its path."""
    surgeon = dict(estimators).get("surgeon")
    where = "test data" if info.get("test") is not None else "validation data"
    figures = _fit_figures(Path(output_dir), info, surgeon, before, after, where)
    path = Path(output_dir) / "report.md"
    write_text_atomic(path, render_fit_report(info, estimators, before, after, written,
                                              figures))
    return path
