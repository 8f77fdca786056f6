"""``hessrebal fit``: rebalance a saved model from the shell.

Loads a model as ``hessrebal spectrum`` does, runs one of :data:`FIT_METHODS`
on a validation ``.npz``, and writes to ``--output-dir`` the changed model in
the input's format, the fitted estimator(s) and ``report.md`` with figures.
Every file goes through :func:`~hessrebal._persistence.atomic_path`.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

#: ``--method`` names (the same names as ``hessrebal bench``) and what they run.
FIT_METHODS: dict[str, str] = {
    "spectral_surgery": "SpectralSurgeon",
    "logit_adjustment": "LogitAdjustment (training prior from --curvature, else estimated)",
    "logit_adjustment+spectral_surgery": "LogitAdjustment, then SpectralSurgeon on its model",
    "last_layer_retraining": "LastLayerRetraining (the final linear layer refitted)",
    "last_layer_retraining+spectral_surgery":
        "LastLayerRetraining, then SpectralSurgeon on its model",
    "tau_normalization": "TauNormalization (final-layer rows divided by their norm^τ)",
    "class_bias": "ClassBiasTuning (one logit offset per class)",
}

#: ``--config`` sections for the baselines; every other key goes to the surgeon.
_BASELINE_SECTIONS = ("logit_adjustment", "last_layer_retraining", "tau_normalization",
                      "class_bias")


def model_format(path: str | Path) -> str:
    """``"torchscript"``, ``"safetensors"`` or ``"state_dict"``: how to write the output."""
    from .cli import _load_scripted

    p = Path(path)
    if _load_scripted(p) is not None:
        return "torchscript"
    return "safetensors" if p.suffix == ".safetensors" else "state_dict"


def read_config(text: str | None) -> dict[str, Any]:
    """``--config``: a JSON object, inline or in a file."""
    if text is None:
        return {}
    source = "--config"
    stripped = text.strip()
    if not stripped.startswith(("{", "[")):
        p = Path(text)
        if not p.is_file():
            raise FileNotFoundError(f"--config {text!r} is neither a JSON object nor a file.")
        stripped, source = p.read_text(encoding="utf-8"), f"--config file {text!r}"
    try:
        config = json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{source} must be a JSON object of parameter names to values.")
    return config


def _strategy(value: Any, key: str) -> Any:
    """``{"class": "PowerIterationSpectrum", "params": {...}}`` → a strategy object,
    only from the classes ``SpectralSurgeon.load`` may build."""
    from .surgeon import _STRATEGY_CLASSES

    if isinstance(value, dict) and "class" in value:
        cls = _STRATEGY_CLASSES.get(value["class"])
        if cls is None:
            raise ValueError(f"--config {key}: unknown strategy class {value['class']!r}; "
                             f"choose from {', '.join(sorted(_STRATEGY_CLASSES))}.")
        params = value.get("params", {})
        if not isinstance(params, dict):
            raise ValueError(f"--config {key}: 'params' must be an object.")
        try:
            return cls(**{k: _strategy(v, f"{key}.{k}") for k, v in params.items()})
        except TypeError as exc:
            raise ValueError(f"--config {key}: {exc}") from exc
    return value


def build_estimators(method: str, config: dict[str, Any], args: argparse.Namespace,
                     class_prior: np.ndarray | None) -> list[tuple[str, Any]]:
    """The fitted-in-order estimators of ``method`` as ``(file stem, estimator)``."""
    from .baselines import (
        ClassBiasTuning,
        LastLayerRetraining,
        LogitAdjustment,
        TauNormalization,
    )
    from .surgeon import SpectralSurgeon

    if method not in FIT_METHODS:
        raise ValueError(f"--method {method!r} is not one of {', '.join(FIT_METHODS)}.")
    surgeon_params = {k: _strategy(v, k) for k, v in config.items()
                      if k not in _BASELINE_SECTIONS}
    sections = {k: config.get(k, {}) for k in _BASELINE_SECTIONS}
    for name, section in sections.items():
        if not isinstance(section, dict):
            raise ValueError(f"--config {name} must be an object of {name} parameters.")
    flags = {"n_components": args.n_components, "max_steps": args.max_steps}
    surgeon_params.update({k: v for k, v in flags.items() if v is not None})
    surgeon_params.setdefault("random_state", args.seed)
    if args.device is not None:
        surgeon_params.setdefault("device", args.device)
    surgeon_params.setdefault("progress", not args.quiet)

    def made(cls: type, params: dict[str, Any], name: str) -> Any:
        try:
            est = cls()
            est.set_params(**params)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"--config ({name}): {exc}") from exc
        return est

    la_params = dict(sections["logit_adjustment"])
    if class_prior is not None:
        la_params.setdefault("class_prior", class_prior)
    llr_params = dict(sections["last_layer_retraining"])
    llr_params.setdefault("random_state", args.seed)
    builders = {
        "spectral_surgery": lambda: made(SpectralSurgeon, surgeon_params, "surgeon"),
        "logit_adjustment": lambda: made(LogitAdjustment, la_params, "logit_adjustment"),
        "last_layer_retraining": lambda: made(LastLayerRetraining, llr_params,
                                              "last_layer_retraining"),
        "tau_normalization": lambda: made(TauNormalization, sections["tau_normalization"],
                                          "tau_normalization"),
        "class_bias": lambda: made(ClassBiasTuning, sections["class_bias"], "class_bias"),
    }
    stems = {"spectral_surgery": "surgeon"}
    return [(stems.get(part, part), builders[part]()) for part in method.split("+")]


# ------------------------------------------------------------------ export
def _fold_offsets(model: nn.Module, X_check: Any) -> nn.Module:
    """A ``LogitAdjustedModel`` (logits − offsets) as its base model with the
    offsets subtracted from the output bias, so the result has the input's
    architecture (and can be written as its state dict). Checked on data."""
    from .baselines import LogitAdjustedModel

    if not isinstance(model, LogitAdjustedModel):
        return model
    if model.log_input:
        raise ValueError("the model outputs probabilities, so the adjustment takes their log "
                         "first and cannot be folded into its weights; remove the final "
                         "softmax from the model.")
    base = _fold_offsets(model.base, X_check)  # a composition wraps twice
    offsets = model.offsets
    folded = copy.deepcopy(base)
    bias = None
    for _, p in folded.named_parameters():
        if p.ndim == 1 and p.shape[0] == offsets.shape[0]:
            bias = p  # the last such parameter: the output layer's bias
    if bias is None:
        raise ValueError("the model has no output bias to absorb the per-class logit offsets; "
                         "save it as TorchScript of a model with a biased final layer.")
    with torch.no_grad():
        bias.sub_(offsets.to(dtype=bias.dtype, device=bias.device))
        from ._data import move_inputs
        from ._model import call_module, default_output_to_logits

        x = move_inputs(X_check, next(folded.parameters()).device, bias.dtype)
        want, got = call_module(model.eval(), x), call_module(folded.eval(), x)

        got = default_output_to_logits(got)
        scale = float(want.abs().max()) or 1.0
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5 * scale):
        raise ValueError("the per-class logit offsets cannot be folded into the model's last "
                         "bias (its output is not a biased linear layer); --method "
                         "logit_adjustment needs a model whose final layer is nn.Linear with "
                         "a bias.")
    return folded


def write_model(model: nn.Module, source: Path, fmt: str, output_dir: Path) -> Path:
    """Write ``model`` to ``output_dir`` in the format of ``source`` (atomically)."""
    from ._persistence import atomic_path
    from .cli import _load_scripted

    state = {k: v.detach().to("cpu").clone().contiguous()
             for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = output_dir / "model.safetensors"
        with atomic_path(path) as tmp:
            save_file(state, str(tmp))
        return path
    path = output_dir / "model.pt"
    if fmt == "state_dict":
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        return path
    # TorchScript: the input's own scripted module, its tensors overwritten by name.
    scripted = _load_scripted(source)
    own = dict(scripted.named_parameters()) | dict(scripted.named_buffers())
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"cannot write the result as TorchScript: the changed model has no "
                         f"tensor {missing[0]!r}.")
    with torch.no_grad():
        for name, t in own.items():
            t.copy_(state[name].to(dtype=t.dtype))
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        torch.jit.save(scripted, str(tmp))
    return path


# ------------------------------------------------------------------ run
def evaluate(model: nn.Module, X: Any, y: Any, n_classes: int) -> dict[str, Any]:
    """Per-class accuracy and summaries of ``model`` on ``(X, y)``."""
    from ._data import as_data
    from ._model import model_logits
    from .metrics import balanced_accuracy, class_std, per_class_accuracy

    logits = model_logits(model, as_data(X, y), 512)
    pred = logits.argmax(1)
    y_t = torch.as_tensor(y)
    pc = per_class_accuracy(y_t, pred, n_classes)
    present = np.isfinite(pc)
    return {"per_class_accuracy": pc, "balanced_accuracy": balanced_accuracy(pc),
            "class_std": class_std(pc), "accuracy": float((pred == y_t).double().mean()),
            "worst_class_accuracy": float(np.min(pc[present])),
            "worst_class": int(np.flatnonzero(present)[np.argmin(pc[present])])}


def run_fit(args: argparse.Namespace) -> int:
    """The ``fit`` command (see ``hessrebal fit --help``)."""
    from .cli import _check_output_dir, _first_line, load_model, load_npz, set_threads
    from .report import write_fit_report

    set_threads(args.threads, args.device)

    for name in ("n_components", "max_steps"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "n_components" else 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a "
                             f"{'positive' if name == 'n_components' else 'non-negative'} "
                             f"integer; got {value}.")
    if args.method not in FIT_METHODS:
        raise ValueError(f"--method {args.method!r} is not one of {', '.join(FIT_METHODS)}.")
    config = read_config(args.config)
    out = _check_output_dir(args.output_dir)
    t0 = time.perf_counter()
    model, kind = load_model(args.model, args.factory)
    fmt = model_format(args.model)
    X_val, y_val = load_npz(args.val)
    curv = load_npz(args.curvature) if args.curvature else None
    test = load_npz(args.test) if args.test else None
    if args.device is not None:
        try:
            model = model.to(torch.device(args.device))
        except RuntimeError as exc:
            raise ValueError(f"--device: {_first_line(exc)}") from exc
    prior = None
    with torch.no_grad():
        from ._data import as_inputs, describe, move_inputs, take_rows

        params = list(model.parameters())
        probe = move_inputs(as_inputs(take_rows(X_val, slice(0, 2))),
                            params[0].device if params else None,
                            params[0].dtype if params else None)
        try:
            from ._model import call_module, default_output_to_logits

            C = int(default_output_to_logits(call_module(model, probe)).shape[1])
        except (RuntimeError, IndexError, TypeError) as exc:
            raise ValueError(f"the model cannot take X {describe(as_inputs(X_val))}: "
                             f"{_first_line(exc)}") from exc
    if curv is not None:
        counts = np.bincount(curv[1], minlength=C)[:C].astype(np.float64)
        prior = np.maximum(counts, 1.0) / np.maximum(counts, 1.0).sum()
    estimators = build_estimators(args.method, config, args, prior)
    timings = {"load": time.perf_counter() - t0}

    current: Any = model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for stem, est in estimators:
            t = time.perf_counter()
            if stem == "surgeon":
                est.fit(current, X_val, y_val,
                        curvature_data=None if curv is None else (curv[0], curv[1]))
            else:
                est.fit(current, X_val, y_val)
            current = est.transform(current)
            timings[stem.replace("_", " ")] = time.perf_counter() - t
    seen = set()
    for w in caught:
        text = _first_line(w.message)
        if not issubclass(w.category, (DeprecationWarning, FutureWarning)) and text not in seen:
            seen.add(text)
            print(f"hessrebal fit: warning: {text}", file=sys.stderr)
    X_check = as_inputs(take_rows(X_val, slice(0, 256)))
    result = _fold_offsets(current, X_check)

    eval_X, eval_y = (test if test is not None else (X_val, y_val))
    before = evaluate(model, eval_X, eval_y, C)
    after = evaluate(result, eval_X, eval_y, C)
    written = {"model": write_model(result.to("cpu"), Path(args.model), fmt, out)}
    for stem, est in estimators:
        written[stem] = est.save(out / f"{stem}.hrs")
    info = {
        "model": str(args.model), "kind": kind, "format": fmt, "method": args.method,
        "val": str(args.val), "n_val": int(len(y_val)),
        "curvature": None if curv is None else str(args.curvature),
        "n_curvature": None if curv is None else int(len(curv[1])),
        "test": None if test is None else str(args.test),
        "n_eval": int(len(eval_y)), "eval_counts": np.bincount(eval_y, minlength=C)[:C],
        "n_classes": C, "seed": args.seed, "threads": torch.get_num_threads(),
        "config": config, "timings": timings,
        "n_parameters": sum(p.numel() for p in model.parameters()),
    }
    report = write_fit_report(out, info, estimators, before, after, written)
    where = "test data" if test is not None else "validation data (optimistic: fitted on it)"
    print(f"{args.method} on {args.model} ({kind}); per-class accuracy on the {where}")
    print(f"balanced accuracy {before['balanced_accuracy']:.3f} -> "
          f"{after['balanced_accuracy']:.3f}, class std {before['class_std']:.3f} -> "
          f"{after['class_std']:.3f}, worst class {before['worst_class_accuracy']:.3f} -> "
          f"{after['worst_class_accuracy']:.3f}")
    for key, path in written.items():
        print(f"{key}: {path}")
    print(f"report: {report}")
    return 0


def add_fit_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``hessrebal fit`` to an ``argparse`` subparsers object."""
    p = sub.add_parser(
        "fit", help="rebalance a saved model; write the changed model, the estimator, a report",
        description="Rebalance the per-class accuracy of a saved classifier on labelled "
                    "validation data and write, to --output-dir, the changed model in the "
                    "input's format (model.pt as TorchScript or a state dict, or "
                    "model.safetensors), the fitted estimator(s) (surgeon.hrs, "
                    "logit_adjustment.hrs, ...; load them with the class's load()), and "
                    "report.md with figures: per-class accuracy before and after on --test, "
                    "or on the validation data (labelled as such) without it. The model is "
                    "loaded as by `hessrebal spectrum`. Methods: "
                    + "; ".join(f"{k}: {v}" for k, v in FIT_METHODS.items()) + ".",
        epilog="example: hessrebal fit --model net.pt --val val.npz --curvature train.npz "
               "--test test.npz --output-dir fixed\n"
               "         hessrebal fit --model weights.pt --factory mynets:make_net "
               "--val val.npz --method logit_adjustment+spectral_surgery --output-dir fixed",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="FILE",
                   help="TorchScript file, or a state dict / .safetensors with --factory")
    p.add_argument("--factory", default=None, metavar="package.module:factory",
                   help="callable with no arguments that builds the model of the state dict")
    p.add_argument("--val", required=True, metavar="FILE.npz",
                   help="validation data: an .npz with X and y (integer labels 0..C-1)")
    p.add_argument("--curvature", default=None, metavar="FILE.npz",
                   help="data the surgeon's Hessian is taken on (the paper: 128-256 training "
                        "images); its class counts are logit adjustment's prior. Default: "
                        "the validation data, and an estimated prior")
    p.add_argument("--test", default=None, metavar="FILE.npz",
                   help="held-out data for the report's before/after table")
    p.add_argument("--output-dir", required=True, metavar="DIR",
                   help="where the model, the estimator(s) and report.md go (created)")
    p.add_argument("--method", default="spectral_surgery", choices=tuple(FIT_METHODS),
                   metavar="METHOD", help="one of: " + ", ".join(FIT_METHODS)
                   + " (default spectral_surgery)")
    p.add_argument("--n-components", type=int, default=None, metavar="K",
                   help="spikes used by the surgeon (default C-1)")
    p.add_argument("--max-steps", type=int, default=None, metavar="T",
                   help="the surgeon's steps (default 10)")
    p.add_argument("--config", default=None, metavar="JSON",
                   help="a JSON object (inline or a file) of SpectralSurgeon parameters, "
                        "nested names included ({\"amplitude__gamma\": 0.5}); a strategy as "
                        "{\"class\": \"PowerIterationSpectrum\", \"params\": {...}}; baseline "
                        "parameters in sections named logit_adjustment, "
                        "last_layer_retraining, tau_normalization, class_bias")
    p.add_argument("--seed", type=int, default=0,
                   help="random_state of the surgeon and of last-layer retraining (default 0)")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    from .cli import add_threads_option

    add_threads_option(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_fit)
    return p
