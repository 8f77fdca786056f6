"""The user's model seen as a pure function of its selected parameters.

Every forward pass of hessrebal goes through :class:`FunctionalModel`: it runs
the module in eval mode (BatchNorm on running statistics, dropout off) with
``torch.func.functional_call``, so the user's parameters, buffers and
train/eval flags are never touched, whatever happens during the call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .parameters import LOW_PRECISION_DTYPES, ParameterSpace, compute_dtype, unwrap_model

OutputToLogits = Callable[[Any], torch.Tensor]


def default_output_to_logits(output: Any) -> torch.Tensor:
    """Logits from the usual forward outputs: a tensor, a tuple/list (first
    element), a dict with ``"logits"``, or an object with ``.logits``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        if "logits" in output:
            return output["logits"]
        raise TypeError(
            f"The model returned a dict without 'logits' (keys: {sorted(output)}); "
            "pass output_to_logits= to say which entry holds the logits."
        )
    if hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"Cannot find logits in a model output of type {type(output).__name__}; "
        "pass output_to_logits=."
    )


@contextlib.contextmanager
def evaluation_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then every submodule's flag as it was,
    even on an exception or KeyboardInterrupt."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield
    finally:
        for m, training in flags:
            m.training = training


def _widened(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 if it is float16/bfloat16 (a copy), else ``t`` itself."""
    return t.to(compute_dtype(t.dtype)) if t.dtype in LOW_PRECISION_DTYPES else t


class FunctionalModel:
    """``logits = f(theta, x)`` for the flat vector ``theta`` of selected parameters.

    Parameters outside the selection are used detached; buffers are private
    copies, so even a forward that writes to its buffers cannot change the
    user's model.

    A model stored in float16 or bfloat16 is run in float32 for everything
    that differentiates or perturbs (curvature, sensitivities): float32 copies
    of its low-precision parameters and buffers stand in for them, and
    ``theta`` is float32 (:attr:`dtype`). ``logits(..., native=True)`` runs
    it as the user will, in its own dtype at ``theta`` rounded to it; the
    accept/rollback evaluation and scores use that. The user's module is
    never cast.
    """

    def __init__(
        self,
        model: Any,
        space: ParameterSpace,
        output_to_logits: OutputToLogits | None = None,
    ) -> None:
        self.module = unwrap_model(model)
        self.space = space
        self.output_to_logits = output_to_logits or default_output_to_logits
        fixed = {
            name: p.detach() for name, p in self.module.named_parameters() if name not in space
        }
        buffers = {name: b.detach().clone() for name, b in self.module.named_buffers()}
        self._fixed = {name: _widened(t) for name, t in fixed.items()}
        self._buffers = {name: _widened(t) for name, t in buffers.items()}
        # The model as stored, for native evaluation; the same dicts when
        # nothing had to be widened (float32/float64 models).
        self.widened = space.compute_dtype != space.dtype or any(
            t.dtype in LOW_PRECISION_DTYPES for t in (*fixed.values(), *buffers.values()))
        self._native = (fixed, buffers) if self.widened else (self._fixed, self._buffers)

    @property
    def device(self) -> torch.device:
        return self.space.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of ``theta`` and of the inputs: float32 for a
        float16/bfloat16 model, else the parameters' dtype."""
        return self.space.compute_dtype

    @property
    def native_dtype(self) -> torch.dtype:
        """The selected parameters' dtype as stored in the model."""
        return self.space.dtype

    def initial_theta(self) -> torch.Tensor:
        """The model's current selected parameters, flattened (a copy)."""
        return self.space.gather(self.module)

    def logits(self, theta: torch.Tensor, x: torch.Tensor, native: bool = False) -> torch.Tensor:
        """Logits at ``theta`` (in :attr:`dtype`).

        ``native=True`` runs a float16/bfloat16 model in its own dtype, at
        ``theta`` rounded to it, as ``transform`` will leave it; the logits
        come back in :attr:`dtype`. Not differentiable in a useful way.
        """
        fixed, buffers = self._native if native else (self._fixed, self._buffers)
        if native and self.widened:
            theta = theta.to(self.native_dtype)
            if x.is_floating_point():
                x = x.to(self.native_dtype)
        tensors = dict(fixed)
        tensors.update(self.space.unflatten(theta))
        tensors.update(buffers)
        with evaluation_mode(self.module):
            out = functional_call(self.module, tensors, (x,))
        logits = self.output_to_logits(out)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise ValueError(
                f"The model's logits must have shape (n_samples, n_classes); got {shape}."
            )
        if native and self.widened and logits.is_floating_point():
            logits = logits.to(self.dtype)
        return logits

    def probe(self, x: torch.Tensor, name: str = "X") -> int:
        """Run one chunk through the model and return its number of outputs,
        turning a shape error deep inside the model into one clear message."""
        try:
            with torch.no_grad():
                logits = self.logits(self.initial_theta(), x)
        except (RuntimeError, IndexError, ValueError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(
                f"The model cannot take {name} of shape {tuple(x.shape)} "
                f"(dtype {x.dtype}): {first}"
            ) from exc
        if logits.shape[1] < 2:
            raise ValueError(
                f"The model has {logits.shape[1]} output; a classifier needs at least 2."
            )
        return int(logits.shape[1])


def check_finite_parameters(model: Any, name: str = "model") -> None:
    module = unwrap_model(model)
    for pname, p in module.named_parameters():
        if (p.is_floating_point() or p.is_complex()) and not torch.isfinite(p).all():
            raise ValueError(f"{name} has NaN or infinite values in parameter '{pname}'.")


def predict_logits(
    fmodel: FunctionalModel,
    theta: torch.Tensor,
    data,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of all of ``data`` at ``theta`` (CPU tensors).

    The model runs natively (a float16/bfloat16 model in its own dtype, at
    ``theta`` rounded to it): these logits decide accepted steps and scores,
    so they must be the ones the changed model will produce.
    """
    outs, ys = [], []
    with torch.no_grad():
        for x, y in data.chunks(batch_size, fmodel.device, fmodel.dtype):
            outs.append(fmodel.logits(theta, x, native=True).cpu())
            ys.append(y.cpu())
    return torch.cat(outs), torch.cat(ys)


def predictions_many(
    fmodel: FunctionalModel,
    thetas: torch.Tensor,
    data,
    batch_size: int,
    max_models_per_pass: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes ``(m, n)`` of ``m`` parameter vectors on all of ``data``.

    The ``m`` models run together through ``torch.func.vmap`` (one batched
    forward per chunk, not ``m``), in groups that keep ``group × batch``
    activations about the size of one ``batch_size`` chunk times 32.
    """
    from torch.func import vmap

    m = thetas.shape[0]
    group = max_models_per_pass or max(1, min(m, 32))
    preds, ys = [], []

    def one(theta, x):
        return fmodel.logits(theta, x).argmax(dim=1)

    with torch.no_grad():
        for x, y in data.chunks(batch_size, fmodel.device, fmodel.dtype):
            parts = []
            for start in range(0, m, group):
                block = thetas[start : start + group]
                try:
                    parts.append(vmap(one, in_dims=(0, None))(block, x))
                except (RuntimeError, NotImplementedError):
                    # Some modules (custom autograd functions, in-place ops on
                    # buffers) cannot be vmapped; fall back to a loop.
                    parts.append(torch.stack([one(t, x) for t in block]))
            preds.append(torch.cat(parts).cpu())
            ys.append(y.cpu())
    return torch.cat(preds, dim=1), torch.cat(ys)
